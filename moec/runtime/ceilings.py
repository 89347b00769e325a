"""The two hardware ceilings a roofline divides by, measured on the device the model runs on.

Measured rather than taken from a datasheet, because what bounds a run is what this device,
clock and driver deliver now:

- copy bandwidth: `dst.copy_(src)` of one large tensor, bytes read + bytes written / median time
  (1 GiB on CUDA; 64 MiB on CPU, a memcpy);
- matmul rate: a square matmul, 2 n^3 / median time (bf16 8192^3 through cuBLAS on CUDA; fp32
  1024^3 on CPU, quick and only a rough ceiling).

CUDA timings are CUDA events around each call, median of the calls after warm-up; CPU timings
are a host clock. A caller that has measured ceilings already passes them to `device_ceilings`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_source: str  # "measured" or "given"
    matmul_source: str
    how: str

    def as_dict(self) -> dict:
        return asdict(self)


def median_time_s(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of fn() after warm-up: CUDA events on CUDA, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in pairs) / 1e3
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device, iters=20 if device.type == "cuda" else 10)
    return 2 * src.numel() * src.element_size() / seconds


def measure_matmul_rate(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None) -> float:
    """FLOP/s of an n x n x n matmul on random inputs."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = median_time_s(lambda: torch.mm(a, b, out=out), device, warmup=3 if cuda else 1,
                            iters=20 if cuda else 5)
    return 2.0 * n**3 / seconds


def measure_h2d_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s from (pinned, on CUDA) host memory to `device`: the offload executor's link."""
    cuda = device.type == "cuda"
    nbytes = nbytes or ((512 << 20) if cuda else (64 << 20))
    host = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    if cuda:
        host = host.pin_memory()
    dst = torch.empty_like(host, device=device)
    seconds = median_time_s(lambda: dst.copy_(host, non_blocking=True), device)
    return nbytes / seconds


def device_ceilings(device: torch.device, copy_gb_per_s: float | None = None,
                    matmul_tflop_per_s: float | None = None) -> Ceilings:
    """The given ceilings where the caller has them (GB/s, TFLOP/s), the rest measured now."""
    cuda = device.type == "cuda"
    copy = copy_gb_per_s * 1e9 if copy_gb_per_s else measure_copy_bandwidth(device)
    matmul = matmul_tflop_per_s * 1e12 if matmul_tflop_per_s else measure_matmul_rate(device)
    if cuda:
        torch.cuda.empty_cache()  # give the measurement buffers back before the model needs them
    how = ("copy: dst.copy_(src) of 1 GiB, read + written bytes / median of 20 (CUDA events); "
           "matmul: bf16 8192^3 torch.mm, 2n^3 / median of 20 (CUDA events)" if cuda else
           "copy: dst.copy_(src) of 64 MiB, read + written bytes / median of 10 (perf_counter); "
           "matmul: fp32 1024^3 torch.mm, 2n^3 / median of 5 (perf_counter)")
    return Ceilings(copy, matmul, "given" if copy_gb_per_s else "measured",
                    "given" if matmul_tflop_per_s else "measured", how)
