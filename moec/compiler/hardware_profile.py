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
    # moec's own host attention (moec.runtime.host_attention), timed: what placement `cpu` costs.
    # Its gathers, widening and small matmuls reach a small share of the two ceilings above (on a
    # 2-core EPYC: 3-4% of the copy rate with a bf16 cache, 13-16% of the matmul rate over a prompt), so
    # the policy prices it from these, not from those
    # decoding sequences: KV-cache bytes attended per second (a bf16 cache where there is a GPU, fp32 without)
    host_attention_kv_bytes_per_s: float
    host_attention_flops_per_s: float  # a causal prompt chunk: attention FLOPs per second
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
        host_attention_kv_bytes_per_s=4e9, host_attention_flops_per_s=0.3e12,
        source="h100 machine 2026-11-23: link and GPU measured, CPU and host attention nominal",
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
        names = [f.name for f in fields(HardwareProfile)]
        missing = [k for k in names if k not in data]
        if missing:
            raise RecipeError(f"offload.hardware: {path} lacks {', '.join(missing)} (measured by an older moec or "
                              "written by hand); measure it again with `moe-compile --profile-hardware`")
        profile = HardwareProfile(**{k: data[k] for k in names})
    except (json.JSONDecodeError, TypeError) as e:
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


def measure_host_attention(dtype: torch.dtype = torch.bfloat16, context: int = 512, sequences: int = 16,
                           kv_heads: int = 8, group: int = 4, head_dim: int = 128) -> tuple[float, float]:
    """(KV bytes/s, FLOP/s) of `moec.runtime.host_attention.cpu_attention` on this host: `sequences`
    decoding sequences over `context` tokens of a paged cache in scattered blocks, then one causal
    prompt chunk of `context` tokens (Mixtral-8x7B's heads by default)."""
    from moec.runtime.host_attention import cpu_attention

    block = 16
    width = -(-context // block)
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(1, 2, sequences * width, block, kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(sequences * width, generator=gen).view(sequences, width)
    cpu = torch.device("cpu")
    heads, scale = kv_heads * group, head_dim ** -0.5
    query = torch.randn(sequences, heads, head_dim, generator=gen).to(dtype)
    decode_s = median_time_s(lambda: cpu_attention(query, cache, 0, tables, torch.arange(sequences),
                                                   torch.full((sequences,), context - 1), scale),
                             cpu, warmup=1, iters=5)
    kv_bytes = sequences * context * 2 * kv_heads * head_dim * cache.element_size()
    prompt = torch.randn(context, heads, head_dim, generator=gen).to(dtype)
    prefill_s = median_time_s(lambda: cpu_attention(prompt, cache, 0, tables[:1], torch.zeros(context, dtype=torch.long),
                                                    torch.arange(context), scale), cpu, warmup=1, iters=3)
    flops = 2 * heads * head_dim * context * context  # causal: half of 4 * heads * head_dim * context^2
    return kv_bytes / decode_s, flops / prefill_s


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

        def both():  # the copy streams wait for the timing stream, else later copies run before its start event
            up.wait_stream(torch.cuda.current_stream(device))
            down.wait_stream(torch.cuda.current_stream(device))
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
    attention_kv_bytes_per_s, attention_flops_per_s = measure_host_attention(torch.bfloat16 if cuda else torch.float32)
    return HardwareProfile(
        name=name, h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h, duplex_bytes_per_s=max(duplex, h2d, d2h),
        gpu_bytes_per_s=measure_copy_bandwidth(device), gpu_flops_per_s=measure_matmul_rate(device),
        cpu_bytes_per_s=measure_copy_bandwidth(cpu), cpu_flops_per_s=measure_matmul_rate(cpu),
        host_attention_kv_bytes_per_s=attention_kv_bytes_per_s, host_attention_flops_per_s=attention_flops_per_s,
        source=f"measured on {name} ({os.cpu_count()} host cores) {dt.date.today().isoformat()}",
    )
