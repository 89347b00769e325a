"""Measurement helpers shared by the GPU benchmarks (the method of .library/device/METHOD.md).

- `environment`: device, versions, commit and date, recorded with every result.
- `copy_bandwidth`, `matmul_rate`: the two ceilings, measured in the same run as the numbers
  they bound (device-to-device copy counting bytes read + written; a large bf16 matmul).
- `time_fn`: CUDA events around each call, the L2 flushed before each one (a read of
  max(256 MiB, 2 x L2) between calls, outside the timed region: `L2Flusher`), warm-up first,
  median of many.
  On CPU a host clock (no flush): used only for the logic smoke test.
- `time_graph`: the same callable captured once in a CUDA graph and its replays timed, for
  cases where launch overhead dominates.
- `metric`: one entry of a result's metric list (name, value, unit, direction, peer).
- `free_port`: a free TCP port on 127.0.0.1 (a server or a process group's rendezvous).

Imports only torch and the standard library, so a script can import it on the GPU machine
without this package installed.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ environment
def git_commit(explicit: str | None = None) -> str | None:
    """The commit the caller names, else `git rev-parse HEAD` here (None where there is no .git)."""
    if explicit:
        return explicit
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: record None
        return None
    return getattr(mod, "__version__", None)


def _nvidia_smi() -> dict | None:
    """Read-only query of the card's state (clocks, power limit, temperature) for the record."""
    fields = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,persistence_mode"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values))


def environment(device: torch.device, commit: str | None = None) -> dict:
    info: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(commit),
        "commit_source": "argument" if commit else "git rev-parse",
        "git_dirty": None if commit else git_dirty(),
        "host": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = {
            "kind": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "smem_per_block_optin": getattr(props, "shared_memory_per_block_optin", None),
            "nvidia_smi": _nvidia_smi(),
        }
    else:
        info["device"] = {"kind": "cpu", "name": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    return info


def device_name(env: dict) -> str:
    return env["device"]["name"]


# ------------------------------------------------------------------------------------------ timing
def summarize(times_ms: list[float]) -> dict:
    xs = sorted(times_ms)
    n = len(xs)

    def q(p: float) -> float:
        return xs[min(n - 1, max(0, int(round(p * (n - 1)))))]

    return {
        "median_ms": statistics.median(xs),
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "min_ms": xs[0],
        "max_ms": xs[-1],
        "n": n,
    }


class L2Flusher:
    """Reads max(256 MiB, 2 x L2) before each timed call, so that no call finds the previous
    call's weights or activations in L2. A no-op on CPU.

    A read, not a write (`how="write"`, zeros, the flush of `triton.testing.do_bench`, was this
    class's flush until 2026-12-06): a written flush leaves the L2 full of dirty lines, and the
    timed call's own reads then evict them, writing up to the L2's 50 MB back to DRAM inside the
    timed region. No step of a model pays that: there the L2 holds what the previous kernels read
    (the last layer's weights), not what they wrote. H100 (`l2_flush-h100-2026-12-06T1301.json`):
    one read of 128 MB took 61.9 us after a written flush, 52.5 after a read one and 51.9 with
    none; Qwen3's one-token MoE layer 53.8, 45.5 and 44.6 us (its bytes, 75 MB, exceed the L2)."""

    HOW = ("read", "write")

    def __init__(self, device: torch.device, how: str = "read"):
        if how not in self.HOW:
            raise ValueError(f"L2Flusher: how={how!r}; choose one of {', '.join(self.HOW)}")
        self.how, self.buf, self._total = how, None, None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            nbytes = max(256 << 20, 2 * l2)
            self.buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
            self._total = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.buf is None:
            return
        if self.how == "read":
            torch.sum(self.buf, dim=0, out=self._total)
        else:
            self.buf.zero_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    flush: L2Flusher | None = None,
    warmup: int = 3,
    min_iters: int = 20,
    max_iters: int = 200,
    target_s: float = 0.25,
) -> dict:
    """Median time of fn() in ms. Warm-up calls first (the first of which also estimates the cost),
    then max(min_iters, min(max_iters, target_s / estimate)) timed calls.
    CUDA: an event pair around each call, L2 flushed before each (outside the pair)."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    _sync(device)
    est = (time.perf_counter() - t0) / max(1, warmup)
    iters = int(max(min_iters, min(max_iters, target_s / max(est, 1e-6))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            if flush is not None:
                flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    out = summarize(times)
    out["flushed_l2"] = flush is not None and flush.buf is not None
    if out["flushed_l2"]:
        out["l2_flush"] = flush.how
    out["timer"] = "cuda_events" if device.type == "cuda" else "perf_counter"
    return out


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    flush: L2Flusher | None = None,
    rounds: int = 30,
) -> dict[str, dict]:
    """Median time of each fn in ms, timed in rounds: each round calls every fn once, the order
    rotated round by round. Timed one block after another, fns that run for milliseconds meet the
    GPU at different clocks (power and heat build up over a block), which a 2-6% comparison
    cannot tell from the code; interleaved, every fn sees the same drift.
    CUDA: an event pair around each call, L2 flushed before each (outside the pair)."""
    names = list(fns)
    for name in names:  # warm-up, in order
        fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    pending = []
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if flush is not None:
                flush()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                pending.append((name, start, end))
            else:
                t = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
    _sync(device)
    for name, start, end in pending:
        times[name].append(start.elapsed_time(end))
    out = {}
    for name in names:
        out[name] = summarize(times[name])
        out[name]["flushed_l2"] = flush is not None and flush.buf is not None
        if out[name]["flushed_l2"]:
            out[name]["l2_flush"] = flush.how
        out[name]["timer"] = ("cuda_events" if device.type == "cuda" else "perf_counter") + ", interleaved"
    return out


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3):
    """Warm fn up on a side stream, capture one call in a CUDA graph. Returns (graph, output)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out


def time_graph(
    fn: Callable[[], object],
    device: torch.device,
    *,
    flush: L2Flusher | None = None,
    min_iters: int = 20,
    max_iters: int = 200,
    target_s: float = 0.25,
) -> tuple[dict, object]:
    """fn captured once in a CUDA graph; the median of timed replays (L2 flushed before each).
    Returns (timing, the graph's output tensor after one replay)."""
    graph, out = capture_graph(fn, device)
    result = time_fn(graph.replay, device, flush=flush, warmup=3,
                     min_iters=min_iters, max_iters=max_iters, target_s=target_s)
    result["timer"] = "cuda_graph_replay"
    graph.replay()
    torch.cuda.synchronize(device)
    return result, (out, graph)


# ---------------------------------------------------------------------------------------- ceilings
def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 20) -> dict:
    """Device-to-device copy of one large random tensor: (bytes read + bytes written) / median time."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, min_iters=iters, max_iters=iters)
    bytes_moved = 2 * n * 2
    value = bytes_moved / (t["median_ms"] * 1e-3)
    del src, dst
    return {"value": value / 1e9, "unit": "GB/s", "bytes_moved_per_call": bytes_moved,
            "timing": t, "how": "dst.copy_(src), bf16 random, bytes read + written / median time"}


def matmul_rate(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None,
                iters: int = 20) -> dict:
    """A large square matmul through torch (cuBLAS on CUDA) on random inputs: 2 n^3 / median time."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=c), device, warmup=5, min_iters=iters, max_iters=iters)
    flops = 2.0 * n ** 3
    del a, b, c
    return {"value": flops / (t["median_ms"] * 1e-3) / 1e12, "unit": "TFLOP/s", "n": n,
            "dtype": str(dtype).replace("torch.", ""), "timing": t,
            "how": f"torch.mm {n}x{n}x{n} random inputs, 2n^3 / median time"}


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- results
def metric(name: str, value, unit: str, direction: str, peer: str | None = None, **extra) -> dict:
    """direction: 'lower' or 'higher' is better. peer: what the value is compared with."""
    if isinstance(value, float) and not math.isfinite(value):
        value = None
    out = {"name": name, "value": value, "unit": unit, "direction": direction}
    if peer is not None:
        out["peer"] = peer
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return str(obj)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1))
    tmp.replace(path)


def log(*args) -> None:
    print(*args, flush=True)
    sys.stdout.flush()
