"""Stage 4, lower: AOTInductor compiles the program into a `.pt2` with no weights inside.

Weights stay out of the shared library (`package_constants_in_so=False`): the artifact keeps
them in safetensors, the runtime memory-maps them and hands them to the compiled model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}


@contextlib.contextmanager
def int_arrays_declared_at_each_use() -> Iterator[None]:
    """Work around an AOTInductor bug that can make the C++ wrapper fail to compile.

    The wrapper declares each size/stride array once and caches its name, keyed by the id of
    the writeline callable it was written with (in some releases the bound method itself, made
    afresh at each attribute access; in 2.13 the buffer it belongs to). Ids are recycled, so a
    later call can get back a name whose declaration went into another buffer.
    The 8-layer Mixtral for CUDA hit it on an H200 (torch 2.11, 2026-12-03): "'int_array_216' was
    not declared in this scope". pytorch/pytorch#193621 and #193628 fix it upstream.

    While this is active, every use declares its own array under a fresh name. That is always
    valid C++ and costs a few lines of wrapper."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    cached = CppWrapperCpu.codegen_int_array_var

    def declare(self, int_array, writeline, known_statically=False, graph=None):
        return self._codegen_int_array_var_impl(int_array, writeline, known_statically)

    CppWrapperCpu.codegen_int_array_var = declare
    try:
        yield
    finally:
        CppWrapperCpu.codegen_int_array_var = cached


def compile_graph(ep: torch.export.ExportedProgram, package_path: Path) -> Path:
    with int_arrays_declared_at_each_use():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path),
                                                 inductor_configs=INDUCTOR_CONFIGS)
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
