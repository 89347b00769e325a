"""The artifact's compiled step, loaded with its weights: the only model code the runtime runs."""

from __future__ import annotations

import ctypes
import os
import sys
import time

import torch

import moec.ops  # noqa: F401  (the compiled graph calls torch.ops.moec.*)
from moec.artifact import Artifact, open_weights
from moec.errors import ArtifactError, first_line


def share_process_libstdcxx() -> None:
    """Put the libstdc++ this process already runs into the global symbol scope.

    A compiler that links parts of libstdc++ into the library it builds (the GPU machine's
    `/opt/gcc` does) gives an AOTInductor `.so` its own copy of the locale machinery. Loaded beside
    the process's libstdc++, which torch pulled in privately, the two copies number their facets
    differently and the library's first `std::regex` (its device-string parser) crashes. With the
    process's copy global, the library binds to it, as it would under `LD_PRELOAD`."""
    if sys.platform != "linux" or not hasattr(os, "RTLD_NOLOAD"):
        return
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return
    for path in {line.split()[-1] for line in maps.splitlines() if "/libstdc++.so" in line}:
        try:
            ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:
            pass


def load_package(path: str, runners: int = 1):
    """AOTInductor's package loader, single-threaded, without `aoti_load_package`'s device check.

    Single-threaded: the runtime calls the step from one thread, and the container's multi-runner
    bookkeeping (events it records and queries around each run) is not allowed inside a CUDA-graph
    capture ("operation not permitted when stream is capturing"). With `runners` > 1 (an offloaded
    plan's micro-batches, which run the step from that many threads at once and never capture a
    CUDA graph) the container keeps that many model instances and hands each call a free one.

    `aoti_load_package` first compares the package's build machine with this one
    (`get_device_information`), and to name this machine's CPU vector ISA it compiles a test
    program per ISA and loads each in a fresh Python process: 35 s of a 44 s load on the H200
    machine, to log at most a warning. The artifact's own check (device, compute capability,
    torch version: `moec.artifact`) has already run and is an error, so the loader is built
    directly — what `aoti_load_package` itself falls back to. If this torch's loader has another
    signature, `aoti_load_package` is used. Every load first shares the process's libstdc++
    (`share_process_libstdcxx`): without it a package crashed while loading on the H100 machine."""
    share_process_libstdcxx()
    try:
        from torch._inductor.package.package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", runners == 1, runners, -1)
    except (ImportError, AttributeError, TypeError):
        return torch._inductor.aoti_load_package(path, run_single_threaded=runners == 1, num_runners=runners)
    return AOTICompiledModel(loader)


class CompiledStep:
    """`step(input_ids, positions, seq_ids, block_tables, kv_cache, logits_indices) -> logits`."""

    def __init__(self, artifact: Artifact, runners: int = 1):
        """`runners`: how many threads may call the step at once (see `load_package`)."""
        start = time.perf_counter()
        try:
            self.model = load_package(str(artifact.graph_path), runners)
        except Exception as e:  # a damaged or foreign .pt2 fails deep inside torch
            raise ArtifactError(f"{artifact.graph_path}: cannot load the compiled graph ({first_line(e)}); recompile it") from None
        # user_managed: the compiled model uses these tensors in place (no copy). Inductor may have
        # folded some constants into the library: hand over exactly the ones it still asks for.
        graph_done = time.perf_counter()
        wanted = self.model.get_constant_fqns()
        weights = open_weights(artifact, names=wanted)
        missing = [name for name in wanted if name not in weights]
        if missing:
            raise ArtifactError(f"{artifact.weights_path}: lacks {len(missing)} tensors the graph needs "
                                f"(first: {missing[0]}); recompile")
        self.weights = {name: weights[name] for name in wanted}
        try:
            self.model.load_constants(self.weights, check_full_update=True, user_managed=True)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or ["mismatch"])[0][:200]
            raise ArtifactError(f"{artifact.weights_path}: weights do not match the compiled graph ({first})") from None
        # seconds spent loading the compiled library and reading the weights onto the device
        self.load_phases = {"graph_s": graph_done - start, "weights_s": time.perf_counter() - graph_done}

    def __call__(self, input_ids, positions, seq_ids, block_tables, kv_cache, logits_indices) -> torch.Tensor:
        return self.model(input_ids, positions, seq_ids, block_tables, kv_cache, logits_indices)
