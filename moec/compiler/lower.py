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


def save_weights(ep: torch.export.ExportedProgram, weights_path: Path) -> list[str]:
    """Write the program's parameters, buffers and lifted constants under their FQNs, the names the
    compiled graph asks `load_constants` for. Inductor may fold a few small constants (RoPE
    frequencies) into the library; the runtime passes only what the graph still asks for."""
    tensors, seen = {}, set()
    for name, value in {**ep.state_dict, **ep.constants}.items():
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach()
        if t.data_ptr() in seen or not t.is_contiguous():  # tied or strided: safetensors wants its own copy
            t = t.contiguous().clone()
        seen.add(t.data_ptr())
        tensors[name] = t.to("cpu")
    save_file(tensors, str(weights_path), metadata={"format": "pt", "producer": "moec"})
    return list(tensors)
