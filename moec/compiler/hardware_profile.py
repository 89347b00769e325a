"""The hardware figures the offload policy search divides by: named, or measured on the target.

An offload plan is only as good as these numbers: the host link (host-to-device, device-to-host
and both at once), the GPU's memory bandwidth and matmul rate, the CPU's memory bandwidth and
FLOP rate. `moe-compile --profile-hardware` measures them on the machine it runs on and writes
a JSON file a recipe names (`offload.hardware: path/to/profile.json`); the named profiles below
are what we measured on the GPU machines we use, or nominal where marked.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from moec.errors import RecipeError
from moec.runtime.ceilings import measure_copy_bandwidth, measure_h2d_bandwidth, measure_matmul_rate, median_time_s


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    h2d_bytes_per_s: float  # pinned host -> GPU
    d2h_bytes_per_s: float  # GPU -> pinned host
    duplex_bytes_per_s: float  # both directions at once, in total
    gpu_bytes_per_s: float  # GPU memory, bytes read + written per second (a device copy)
    gpu_flops_per_s: float  # dense matmul in the model's dtype
    cpu_bytes_per_s: float  # host memory, bytes read + written per second
    cpu_flops_per_s: float  # fp32 matmul on the host
    source: str  # where the numbers come from

    def as_dict(self) -> dict:
        return asdict(self)


NAMED_PROFILES = {
    # Host link and GPU: measured on the H100 machine, 2026-11-23 (link: issue 8's measurement;
    # GPU: benchmarks/results/moe_layer-h100-2026-11-23.json). Host CPU: nominal for the 16
    # cores lent with it (not measured yet): run --profile-hardware there for real figures.
    "h100-sxm": HardwareProfile(
        name="h100-sxm", h2d_bytes_per_s=55e9, d2h_bytes_per_s=55e9, duplex_bytes_per_s=92e9,
        gpu_bytes_per_s=3005e9, gpu_flops_per_s=786e12, cpu_bytes_per_s=80e9, cpu_flops_per_s=1.0e12,
        source="h100 machine 2026-11-23: link and GPU measured, CPU nominal",
    ),
}


def load_profile(spec: str) -> HardwareProfile:
    """A named profile, or a JSON file written by `moe-compile --profile-hardware`."""
    if spec in NAMED_PROFILES:
        return NAMED_PROFILES[spec]
    path = Path(spec)
    if not path.is_file():
        raise RecipeError(f"offload.hardware: {spec!r} is neither a named profile ({', '.join(NAMED_PROFILES)}) "
                          "nor a file; measure one with `moe-compile --profile-hardware -o profile.json`")
    try:
        data = json.loads(path.read_text())
        names = {f.name for f in fields(HardwareProfile)}
        profile = HardwareProfile(**{k: data[k] for k in names})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RecipeError(f"offload.hardware: {path} is not a hardware profile ({type(e).__name__}: {e}); "
                          "write it again with `moe-compile --profile-hardware`") from None
    bad = [f.name for f in fields(HardwareProfile)
           if f.name not in ("name", "source") and not (isinstance(getattr(profile, f.name), (int, float))
                                                       and getattr(profile, f.name) > 0)]
    if bad:
        raise RecipeError(f"offload.hardware: {path}: {', '.join(bad)} must be positive numbers")
    return profile


def _link_rate(src: torch.Tensor, dst: torch.Tensor, device: torch.device) -> float:
    return src.numel() * src.element_size() / median_time_s(lambda: dst.copy_(src, non_blocking=True), device)


def measure_profile(device: torch.device | None = None) -> HardwareProfile:
    """Measure every figure here. On a machine without a GPU the "GPU" is the CPU and the link a
    host memcpy: what the offload executor's CPU mode runs on (useful for its tests, not speed)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    cuda = device.type == "cuda"
    nbytes = (512 << 20) if cuda else (64 << 20)
    host = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    if cuda:
        host = host.pin_memory()
        host_out = torch.empty_like(host).pin_memory()
        gpu = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        h2d = measure_h2d_bandwidth(device, nbytes)
        d2h = _link_rate(gpu, host_out, device)
        # both directions at once: two streams, timed together
        up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)
        gpu_in = torch.empty_like(gpu)

        def both():
            with torch.cuda.stream(up):
                gpu_in.copy_(host, non_blocking=True)
            with torch.cuda.stream(down):
                host_out.copy_(gpu, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(up)
            torch.cuda.current_stream(device).wait_stream(down)

        duplex = 2 * nbytes / median_time_s(both, device)
        name = torch.cuda.get_device_name(device)
    else:
        h2d = d2h = measure_copy_bandwidth(cpu, nbytes) / 2  # one direction of a memcpy
        duplex = h2d
        name = "cpu"
    return HardwareProfile(
        name=name, h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h, duplex_bytes_per_s=max(duplex, h2d, d2h),
        gpu_bytes_per_s=measure_copy_bandwidth(device), gpu_flops_per_s=measure_matmul_rate(device),
        cpu_bytes_per_s=measure_copy_bandwidth(cpu), cpu_flops_per_s=measure_matmul_rate(cpu),
        source=f"measured on {name} ({os.cpu_count()} host cores) {dt.date.today().isoformat()}",
    )
