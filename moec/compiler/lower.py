"""Stage 4, lower: AOTInductor compiles the program into a `.pt2` with no weights inside.

Weights stay out of the shared library (`package_constants_in_so=False`): the artifact keeps
them in safetensors, the runtime memory-maps them and hands them to the compiled model.
"""

from __future__ import annotations

import contextlib
import logging
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


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains every one of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(part in message for part in self.parts)


def c_shim_declares(function: str, device: str = "cuda") -> bool:
    """Whether this torch's generated C shim header for `device` declares `function`: the
    AOTInductor wrapper can call an aten op directly only through a declared shim."""
    header = Path(torch.__file__).parent / f"include/torch/csrc/inductor/aoti_torch/generated/c_shim_{device}.h"
    return header.is_file() and function in header.read_text()


@contextlib.contextmanager
def grouped_mm_through_dispatcher() -> Iterator[None]:
    """Make AOTInductor call `aten._grouped_mm` through the dispatcher where the C shim lacks it.

    torch 2.11's Inductor lowers `torch._grouped_mm` (the grouped_mm MoE path) to a direct call
    of `aoti_torch_cuda__grouped_mm`, but 2.11's CUDA shim does not declare that function (it
    came in 2.12), so no program using the op compiled for CUDA: "'aoti_torch_cuda__grouped_mm'
    was not declared in this scope" (H200, gpu_op_check-h200-2026-12-03T1417). Where the shim
    lacks it, the op is lowered as a plain fallback kernel without a shim entry, which AOTInductor
    runs through its proxy executor: the C++ dispatcher calls the same aten kernel, no Python.
    Where the shim has it, nothing changes."""
    if c_shim_declares("aoti_torch_cuda__grouped_mm"):
        yield
        return
    from torch._inductor.lowering import fallback_handler, lowerings
    from torchgen.aoti import fallback_ops

    op = torch.ops.aten._grouped_mm.default
    lowering = lowerings.get(op)
    shim_entry = fallback_ops.inductor_fallback_ops.pop(str(op), None)
    lowerings[op] = fallback_handler(op, add_to_fallback_set=False)
    # Inductor warns at each call it routes so ("missing a c-shim implementation"): expected here
    inductor_log = logging.getLogger("torch._inductor.ir")
    expected = _DropMessages(str(op), "c-shim")
    inductor_log.addFilter(expected)
    try:
        yield
    finally:
        inductor_log.removeFilter(expected)
        if lowering is None:
            lowerings.pop(op, None)
        else:
            lowerings[op] = lowering
        if shim_entry is not None:
            fallback_ops.inductor_fallback_ops[str(op)] = shim_entry


@contextlib.contextmanager
def buffer_reuse_planned_per_graph() -> Iterator[None]:
    """Make Inductor's buffer-reuse planner judge each line against its own graph's memory.

    The planner asks a peak-memory estimate whether reusing a freed buffer would raise the peak,
    by the scheduler-node indices of the free and the allocation. In torch 2.11 one estimate,
    built from the outer graph, answers for the lines of subgraphs too (a torch.cond's branches,
    such as the MoE tuner's Triton / grouped_mm switch), whose indices count another graph's
    nodes: "ValueError: Start index 4 out of bounds [0, 3]" (H200, gpu_op_check-h200-2026-12-03)
    or, worse, a silently wrong estimate. Here each line remembers the graph it was made in and
    is judged by an estimate of that graph (2.12 and later build one per subgraph themselves;
    for them this changes nothing)."""
    from torch._inductor.codegen import wrapper
    from torch._inductor.virtualized import V

    estimate_cls = wrapper.EfficientPeakEstimate
    line_classes = (wrapper.AllocateLine, wrapper.FreeIfNotReusedLine)
    saved = [(cls, "__post_init__", cls.__post_init__) for cls in line_classes]
    saved += [(estimate_cls, name, getattr(estimate_cls, name))
              for name in ("__init__", "peak_between", "update_peak_between")]
    originals = {(cls, name): fn for cls, name, fn in saved}
    per_graph: dict[int, tuple[object, object]] = {}  # id(graph) -> (graph, its estimate)

    def remembering_graph(cls, name):
        def init(self, *args, **kwargs):
            originals[(cls, name)](self, *args, **kwargs)
            self.moec_graph = V.graph
        return init

    def of_line_graph(estimate, line):
        graph = getattr(line, "moec_graph", None)
        if graph is None or graph is getattr(estimate, "moec_graph", None):
            return estimate
        if id(graph) not in per_graph:
            with V.set_graph_handler(graph):
                per_graph[id(graph)] = (graph, estimate_cls())
        return per_graph[id(graph)][1]

    def delegating(name):
        def method(self, free_line, allocate_line):
            return originals[(estimate_cls, name)](of_line_graph(self, allocate_line), free_line, allocate_line)
        return method

    for cls in line_classes:
        cls.__post_init__ = remembering_graph(cls, "__post_init__")
    estimate_cls.__init__ = remembering_graph(estimate_cls, "__init__")
    estimate_cls.peak_between = delegating("peak_between")
    estimate_cls.update_peak_between = delegating("update_peak_between")
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
        per_graph.clear()


@contextlib.contextmanager
def aoti_workarounds() -> Iterator[None]:
    """Every AOTInductor workaround above, as `compile_graph` compiles (benchmarks compiling a
    program of their own use the same)."""
    with int_arrays_declared_at_each_use(), grouped_mm_through_dispatcher(), buffer_reuse_planned_per_graph():
        yield


def compile_graph(ep: torch.export.ExportedProgram, package_path: Path) -> Path:
    with aoti_workarounds():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path),
                                                 inductor_configs=INDUCTOR_CONFIGS)
    return package_path


def save_weights(ep: torch.export.ExportedProgram, weights_path: Path,
                 host: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write the program's parameters, buffers and lifted constants under their FQNs, the names the
    compiled graph asks `load_constants` for. Inductor may fold a few small constants (RoPE
    frequencies) into the library; the runtime passes only what the graph still asks for.
    `host`: tensors to write instead of the program's under the same names (the experts an
    offloaded compile kept in host memory, `host_experts`, where the program holds stand-ins)."""
    tensors, seen = {}, set()
    for name, value in {**ep.state_dict, **ep.constants, **(host or {})}.items():
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach()
        if t.data_ptr() in seen or not t.is_contiguous():  # tied or strided: safetensors wants its own copy
            t = t.contiguous().clone()
        seen.add(t.data_ptr())
        tensors[name] = t.to("cpu")
    save_file(tensors, str(weights_path), metadata={"format": "pt", "producer": "moec"})
    return list(tensors)
