"""Stage 4, lower: AOTInductor compiles the program into a `.pt2` with no weights inside.

Weights stay out of the shared library (`package_constants_in_so=False`): the artifact keeps
them in safetensors, the runtime memory-maps them and hands them to the compiled model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}


def compile_graph(ep: torch.export.ExportedProgram, package_path: Path) -> Path:
    torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=INDUCTOR_CONFIGS)
    return package_path


def save_weights(ep: torch.export.ExportedProgram, package_path: Path, weights_path: Path) -> list[str]:
    """Write exactly the constants the compiled graph asks for, by the names it asks for them."""
    compiled = torch._inductor.aoti_load_package(str(package_path))
    wanted = compiled.get_constant_fqns()
    available = {**ep.state_dict, **ep.constants}
    missing = [name for name in wanted if name not in available]
    if missing:
        raise RuntimeError(f"compiled graph needs constants the program does not hold: {missing[:5]}")
    tensors, seen = {}, set()
    for name in wanted:
        t = available[name].detach()
        if t.data_ptr() in seen or not t.is_contiguous():  # tied or strided: safetensors wants its own copy
            t = t.contiguous().clone()
        seen.add(t.data_ptr())
        tensors[name] = t.to("cpu")
    save_file(tensors, str(weights_path), metadata={"format": "pt", "producer": "moec"})
    return list(wanted)
