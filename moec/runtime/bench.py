"""`moe-runtime bench ARTIFACT`: prefill and decode speed of a compiled model, against its roofline.

One run measures, on the device the artifact was compiled for:

- load: `Engine.load`, checksums included unless --no-verify.
- ceilings: copy bandwidth and matmul rate of this device, measured first (moec.runtime.ceilings),
  or the ones given with --copy-bandwidth / --matmul-tflops.
- prefill: one prompt of --prefill-tokens random token ids, clamped to max_seq_len - 1 and to the
  step's token budget so that it is one step, generating one token: time to first token and
  prompt tokens/s.
- decode, per batch size B (above the compiled max_batch: skipped, with a note): B prompts of
  --context random ids each generate --decode-tokens N tokens (ignore_eos). Decode time is the
  time from the batch's first token (the last sequence's, so the prefill is excluded) to the
  last token: N - 1 steps, so ms/step = that / (N - 1) and decode tokens/s = B (N - 1) / that.
  When B x C exceeds the step's token budget the prefill takes several steps, and sequences whose
  prompt finished early decode a few tokens in them: the last steps then run fewer than B
  sequences, which flatters tokens/s by up to (prefill steps - 1) / (N - 1); a note says so.
- every timed number is the median of --repeats runs after one untimed warm-up run of the same
  shape; on CUDA the device is synchronised before each clock reading.
- roofline per row (moec.runtime.roofline): bytes and FLOPs of the step (decode: B tokens at the
  mean context C + N/2; expert bytes under uniform routing), bound tokens/s = tokens per step /
  max(bytes / copy bandwidth, FLOPs / matmul rate), and the achieved percentage of it.
- memory: peak allocated per row on CUDA; the process's peak RSS on CPU.
- energy (CUDA with NVML): over the timed runs, J per token (decode rows: the runs' energy, their
  prefill included, per generated token, i.e. what a generated token costs end to end; prefill:
  per prompt token), mean power and mean utilisation.

The routing distribution is not observed: real, skewed routing touches fewer experts than the
uniform routing the bound assumes, so a row may exceed 100% of it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from moec.artifact import open_artifact
from moec.errors import MoecError
from moec.runtime.ceilings import Ceilings, device_ceilings, measure_h2d_bandwidth
from moec.runtime.gpu_telemetry import COUNTER_MIN_S, GpuTelemetry
from moec.runtime.launch import is_rank_zero
from moec.runtime.regression_gate import RESULT_FORMAT, device_kind, git_commit, metric, run_gate
from moec.runtime.roofline import ModelShape, StepCost, decode_step, prefill_step
from moec.runtime.step_profile import StepProfile, format_table, profile_decode, profile_prefill

UNITS = {
    "load_s": "s", "time_to_first_token_s": "s", "run_s": "s", "decode_s": "s", "step_ms": "ms", "bound_s": "s",
    "tokens_per_s": "tokens/s", "prompt_tokens_per_s": "tokens/s", "decode_tokens_per_s": "tokens/s",
    "bound_tokens_per_s": "tokens/s", "achieved_percent_of_bound": "%", "bytes": "bytes",
    "weight_bytes": "bytes", "expert_bytes": "bytes", "kv_read_bytes": "bytes", "kv_write_bytes": "bytes",
    "flops": "FLOP", "matmul_flops": "FLOP", "attention_flops": "FLOP", "copy_bytes_per_s": "bytes/s",
    "matmul_flops_per_s": "FLOP/s", "peak_memory_bytes": "bytes", "energy_j": "J", "energy_j_per_token": "J/token",
    "mean_power_w": "W", "mean_utilization_percent": "%", "experts_hit_per_layer": "experts",
}


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    context: int = 512
    decode_tokens: int = 64
    prefill_tokens: int = 4096
    repeats: int = 3
    copy_gb_per_s: float | None = None
    matmul_tflop_per_s: float | None = None


def _number(flag: str, text: str, kind: type, minimum: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        what = "an integer" if kind is int else "a number"
        raise MoecError(f"{flag}: {text!r} is not {what} >= {minimum:g}")
    return value


def settings_from_args(args: Any) -> BenchSettings:
    """Check the flags before anything loads: a bad value is a one-line error."""
    sizes = [part.strip() for part in str(args.batch_sizes).split(",") if part.strip()]
    if not sizes:
        raise MoecError("--batch-sizes: give at least one batch size, e.g. 1,8,32")
    batch_sizes = tuple(dict.fromkeys(_number("--batch-sizes", s, int, 1) for s in sizes))
    return BenchSettings(
        batch_sizes=batch_sizes,
        context=_number("--context", args.context, int, 1),
        decode_tokens=_number("--decode-tokens", args.decode_tokens, int, 2),
        prefill_tokens=_number("--prefill-tokens", args.prefill_tokens, int, 1),
        repeats=_number("--repeats", args.repeats, int, 1),
        copy_gb_per_s=_number("--copy-bandwidth", args.copy_bandwidth, float, 1e-9) if args.copy_bandwidth else None,
        matmul_tflop_per_s=_number("--matmul-tflops", args.matmul_tflops, float, 1e-9) if args.matmul_tflops else None,
    )


class _Runner:
    """Times `engine.generate` runs of random prompts, with the device synchronised around the clock."""

    def __init__(self, engine: Any, gpu: GpuTelemetry, repeats: int):
        self.engine = engine
        self.gpu = gpu
        self.repeats = repeats
        self.cuda = engine.device.type == "cuda"
        self.rng = torch.Generator().manual_seed(0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.engine.device)

    def prompts(self, batch: int, length: int) -> list[list[int]]:
        ids = torch.randint(0, self.engine.spec.vocab_size, (batch, length), generator=self.rng)
        return ids.tolist()

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, float, int, int, float]:
        """One generate: (wall seconds, the batch's time to first token, first token to last, and
        the steps, tokens and seconds of its pure decode steps). The engine's clock (stats) reads
        after each step's sampled tokens reached the host, so the device has finished the step."""
        self.sync()
        start = time.perf_counter()
        self.engine.generate(prompts, max_tokens=max_tokens, ignore_eos=True)
        self.sync()
        wall = time.perf_counter() - start
        stats = self.engine.stats
        return (wall, stats.time_to_first_token_s, stats.elapsed_s - stats.time_to_first_token_s,
                stats.decode_steps, stats.decode_tokens, stats.decode_s)

    def timed(self, prompts: list[list[int]], max_tokens: int) -> dict:
        """One warm-up, then `repeats` runs under GPU telemetry: medians, and energy per run. With
        telemetry, runs go on (untimed) until the window is long enough for NVML's energy counter
        (COUNTER_MIN_S): a 15 ms prefill measured alone gave energies 36% apart on an unchanged commit."""
        self.run(prompts, max_tokens)
        with self.gpu.measure() as telemetry:
            start = time.perf_counter()
            runs = [self.run(prompts, max_tokens) for _ in range(self.repeats)]
            energy_runs = len(runs)
            while self.gpu.available and time.perf_counter() - start < COUNTER_MIN_S:
                self.run(prompts, max_tokens)
                energy_runs += 1
        return {
            "run_s": statistics.median(r[0] for r in runs),
            "time_to_first_token_s": statistics.median(r[1] for r in runs),
            "first_to_last_token_s": statistics.median(r[2] for r in runs),
            "pure_decode_steps": min(r[3] for r in runs),
            "pure_decode_tokens_per_s": statistics.median(r[4] / r[5] for r in runs) if all(r[5] for r in runs) else None,
            "pure_decode_step_s": statistics.median(r[5] / r[3] for r in runs) if all(r[3] for r in runs) else None,
            "energy_j": telemetry.energy_j / energy_runs if telemetry.energy_j is not None else None,
            "mean_power_w": telemetry.mean_power_w,
            "mean_utilization_percent": telemetry.mean_utilization_percent,
            "energy_source": telemetry.energy_source,
        }

    def reset_peak_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.engine.device)

    def peak_memory_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.engine.device) if self.cuda else None


def _roofline(cost: StepCost, ceilings: Ceilings, tokens_per_s: float | None) -> dict:
    bound = cost.bound_s(ceilings.copy_bytes_per_s, ceilings.matmul_flops_per_s)
    bound_tokens_per_s = cost.tokens / bound
    return {
        "roofline": cost.as_dict(),
        "bound_s": bound,
        "bound_by": "memory" if cost.bytes / ceilings.copy_bytes_per_s >= cost.flops / ceilings.matmul_flops_per_s
        else "compute",
        "bound_tokens_per_s": bound_tokens_per_s,
        "achieved_percent_of_bound": 100.0 * tokens_per_s / bound_tokens_per_s if tokens_per_s else None,
    }


def _bench_prefill(runner: _Runner, shape: ModelShape, ceilings: Ceilings, tokens: int) -> dict:
    runner.reset_peak_memory()
    timing = runner.timed(runner.prompts(1, tokens), max_tokens=1)
    for key in ("first_to_last_token_s", "pure_decode_steps", "pure_decode_tokens_per_s", "pure_decode_step_s"):
        del timing[key]
    ttft = timing["time_to_first_token_s"]
    tokens_per_s = tokens / ttft if ttft > 0 else None
    energy = timing.pop("energy_j")
    return {
        "prompt_tokens": tokens, **timing, "prompt_tokens_per_s": tokens_per_s,
        "energy_j_per_token": energy / tokens if energy is not None else None,
        **_roofline(prefill_step(shape, tokens), ceilings, tokens_per_s),
        "peak_memory_bytes": runner.peak_memory_bytes(),
    }


def _bench_decode(runner: _Runner, shape: ModelShape, ceilings: Ceilings, batch: int, context: int,
                  new_tokens: int) -> dict:
    runner.reset_peak_memory()
    """Decode speed over the steps in which every sequence decodes (a large batch's prompts take
    several steps first, and sequences done early decode inside those: counting them would flatter)."""
    timing = runner.timed(runner.prompts(batch, context), max_tokens=new_tokens)
    tokens_per_s = timing.pop("pure_decode_tokens_per_s")
    step_s = timing.pop("pure_decode_step_s")
    energy = timing.pop("energy_j")
    roofline_context = context + new_tokens // 2
    return {
        "batch": batch, "context": context, "decode_tokens": new_tokens,
        "decode_tokens_per_s": tokens_per_s,
        "step_ms": step_s * 1e3 if step_s is not None else None,
        "decode_s": timing.pop("first_to_last_token_s"),
        **timing,
        "energy_j_per_token": energy / (batch * new_tokens) if energy is not None else None,
        "roofline_context": roofline_context,
        **_roofline(decode_step(shape, batch, roofline_context), ceilings, tokens_per_s),
        "peak_memory_bytes": runner.peak_memory_bytes(),
    }


def _offload_summary(plan: dict, decode: list[dict], h2d: float) -> dict:
    """The plan, and its prediction next to what the row at the plan's batch achieved."""
    at_plan = next((r for r in decode if r["batch"] == plan["policy"]["batch"]), None)
    return {"policy": plan["policy"], "predicted_tokens_per_s": plan["prediction"]["tokens_per_s"],
            "predicted_decode_step_s": plan["prediction"]["decode_step_s"],
            # per decode step: the seconds each resource is busy in the plan's model (host link, GPU, CPU)
            "predicted_busy_s_per_step": plan["prediction"]["busy"],
            "achieved_decode_step_s": at_plan["step_ms"] / 1e3 if at_plan and at_plan["step_ms"] else None,
            "h2d_bytes_per_s_measured": h2d,
            "note": "the prediction is for the plan's workload (prompt and generation lengths) and hardware "
                    "profile; compare step times at the plan's batch"}


def _offload_stats(engine) -> dict:
    """The pager's counters, and the CPU attention's seconds where attention runs on the host."""
    stats = engine.expert_pager.stats()
    stats["cpu_attention_s"] = engine.host_attention.busy_s if engine.host_attention is not None else None
    return stats


def _offload_row(before: dict, after: dict, row: dict, h2d: float, runs: int, steps_per_run: int) -> dict:
    """Expert bytes the pager copied per step over a row's runs, the rate that is over the step's
    time, the share of the step the link needed at its measured bandwidth (busy fraction), and
    (placement cpu) the CPU's attention seconds per step, summed over micro-batches."""
    steps = max(1, runs * steps_per_run)
    per_step = (after["bytes_copied"] - before["bytes_copied"]) / steps
    step_s = (row["step_ms"] or float("nan")) / 1e3
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    cpu = after["cpu_attention_s"]
    return {"expert_bytes_per_step": per_step, "achieved_h2d_bytes_per_s": per_step / step_s,
            "link_busy_fraction": per_step / h2d / step_s,
            "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
            "cpu_attention_s_per_step": (cpu - before["cpu_attention_s"]) / steps if cpu is not None else None}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def run_bench(artifact: str | Path, settings: BenchSettings, verify: bool = True,
              console: Console | None = None, cuda_graphs: bool = True, profile_dir: str | Path | None = None,
              ep_chunks: int | None = None, overlap: bool = True,
              progress: Callable[[dict], None] | None = None) -> dict:
    """Load, measure, and return every number (the JSON document). `profile_dir`: also profile a
    few decode steps per batch size (`moec.runtime.step_profile`), traces and timelines there.
    `progress`: called with the rows measured so far after each one (load_s, prefill, decode, and
    the host link's measured rate for an offloaded artifact), so that a caller stopped by a clock
    keeps them."""
    import moec
    from moec.runtime.engine import Engine, describe_load_phases

    console = console or Console(stderr=True)
    # the ceilings first, on an idle device with all its memory free (the engine's KV cache and
    # CUDA graphs come after)
    device = torch.device(open_artifact(artifact, verify=False).manifest.device)
    console.print(f"measuring the ceilings of {_device_name(device)} ...")
    ceilings = device_ceilings(device, settings.copy_gb_per_s, settings.matmul_tflop_per_s)
    start = time.perf_counter()
    engine = Engine.load(artifact, verify=verify, cuda_graphs=cuda_graphs, ep_chunks=ep_chunks, overlap=overlap)
    load_s = time.perf_counter() - start
    spec, manifest = engine.spec, engine.artifact.manifest
    notes: list[str] = []
    console.print(f"loaded {manifest.name} in {load_s:.2f}s ({describe_load_phases(engine.load_phases)})")
    gpu = GpuTelemetry.for_device(device)
    if device.type == "cuda" and not gpu.available:
        notes.append(f"no GPU telemetry: {gpu.reason}")
    shape = ModelShape.from_manifest(manifest)
    runner = _Runner(engine, gpu, settings.repeats)

    prefill_tokens = min(settings.prefill_tokens, spec.max_seq_len - 1, spec.max_tokens_per_step)
    if prefill_tokens != settings.prefill_tokens:
        notes.append(f"prefill clamped from {settings.prefill_tokens} to {prefill_tokens} tokens (compiled "
                     f"max_seq_len {spec.max_seq_len} leaves room for 1 generated token; max_tokens_per_step "
                     f"{spec.max_tokens_per_step})")
    new_tokens = min(settings.decode_tokens, spec.max_seq_len - 1)
    context = min(settings.context, spec.max_seq_len - new_tokens)
    if new_tokens != settings.decode_tokens:
        notes.append(f"decode tokens clamped from {settings.decode_tokens} to {new_tokens} "
                     f"(max_seq_len {spec.max_seq_len})")
    if context != settings.context:
        notes.append(f"context clamped from {settings.context} to {context} tokens so that context + decode tokens "
                     f"fits the compiled max_seq_len {spec.max_seq_len}")

    h2d = None
    if engine.expert_pager is not None:  # offloaded: the host link is the ceiling that matters
        h2d = measure_h2d_bandwidth(device)
        notes.append(f"offloaded artifact: host-to-device {h2d / 1e9:.1f} GB/s measured; decode rows add the "
                     "expert bytes copied per step and the share of the step the link needed at that rate")

    # warm the engine once before anything is timed (each row warms its own shape again)
    engine.generate([runner.prompts(1, 8)[0]], max_tokens=2, ignore_eos=True)
    console.print(f"prefill of {prefill_tokens} tokens ...")
    prefill = _bench_prefill(runner, shape, ceilings, prefill_tokens)
    decode, skipped = [], []

    def report_progress() -> None:
        if progress is not None:
            progress({"load_s": load_s, "prefill": prefill, "decode": decode, "h2d_bytes_per_s_measured": h2d})

    report_progress()
    for batch in settings.batch_sizes:
        if batch > spec.max_batch:
            reason = f"batch size {batch} skipped: above the compiled max_batch {spec.max_batch}"
            skipped.append({"batch": batch, "reason": reason})
            notes.append(reason)
            continue
        # the prompts take this many steps; only the steps after them decode the whole batch
        prefill_steps = -(-batch * context // spec.max_tokens_per_step)
        row_tokens = new_tokens
        if new_tokens - prefill_steps < min(new_tokens - 1, 8):  # too few whole-batch decode steps
            row_tokens = min(prefill_steps + 16, spec.max_seq_len - context)
            notes.append(f"decode batch {batch}: its prompts take {prefill_steps} steps (max_tokens_per_step "
                         f"{spec.max_tokens_per_step}), so it generates {row_tokens} tokens instead of {new_tokens} "
                         "to time steps where every sequence decodes")
        console.print(f"decode, batch {batch} at context {context} ...")
        before = _offload_stats(engine) if engine.expert_pager else None
        row = _bench_decode(runner, shape, ceilings, batch, context, row_tokens)
        if before is not None:
            row["offload"] = _offload_row(before, _offload_stats(engine), row, h2d, settings.repeats + 1,
                                          engine.stats.steps)
        if row["decode_tokens_per_s"] is None:
            notes.append(f"decode batch {batch}: no step decoded the whole batch (its {prefill_steps} prompt steps "
                         f"leave none within max_seq_len {spec.max_seq_len}); use a shorter --context")
        decode.append(row)
        report_progress()

    profiles, decode_profiles = [], {}
    if profile_dir is not None:
        if engine.world > 1:
            notes.append("--profile: not for an expert-parallel group; profile the ep: 1 artifact")
        for batch in (b for b in settings.batch_sizes if b <= spec.max_batch and engine.world == 1):
            console.print(f"profiling decode, batch {batch} ...")
            profile = profile_decode(engine, batch, context, steps=3, out_dir=Path(profile_dir) / f"decode-b{batch}")
            decode_profiles[batch] = profile
            profiles.append({**profile.as_dict(), "ops": profile.ops[:40]})
        if engine.world == 1 and prefill_tokens:
            console.print(f"profiling prefill, {prefill_tokens} tokens ...")
            profile = profile_prefill(engine, prefill_tokens, out_dir=Path(profile_dir) / f"prefill-{prefill_tokens}")
            profiles.append({**profile.as_dict(), "ops": profile.ops[:40]})

    offload = _offload_summary(manifest.offload, decode, h2d) if engine.expert_pager is not None else None
    if offload is not None and offload["policy"]["batch"] <= spec.max_batch:
        # how busy the GPU is while the experts stream in: compute and copy shares of a step at the
        # plan's batch (the --profile run's, when it profiled that batch; its trace then kept)
        batch = int(offload["policy"]["batch"])
        if batch not in decode_profiles:
            console.print(f"profiling decode at the plan's batch {batch} ...")
        busy = decode_profiles.get(batch) or profile_decode(engine, batch, context, steps=3)
        offload.update(profiled_step_ms=busy.step_ms, gpu_busy_fraction=busy.compute_busy_fraction,
                       copy_busy_fraction=busy.copy_busy_fraction, profiled_trace=busy.trace)

    cuda = device.type == "cuda"
    result = {
        "format": RESULT_FORMAT,
        "benchmark": "moe-runtime bench",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device_kind": device_kind(device.type, _device_name(device)),
        "model": manifest.name,  # report.py keeps one history per model
        "artifact": {"path": str(artifact), "name": manifest.name, "architecture": manifest.architecture,
                     "dtype": manifest.dtype, "device": manifest.device, "max_batch": spec.max_batch,
                     "max_seq_len": spec.max_seq_len, "max_tokens_per_step": spec.max_tokens_per_step},
        "device": {"type": device.type, "name": _device_name(device)},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "moec": moec.__version__,
                     "python": platform.python_version()},
        "settings": {**asdict(settings), "verify": verify,
                     "used": {"prefill_tokens": prefill_tokens, "context": context, "decode_tokens": new_tokens}},
        "load_s": load_s,
        "load_phases": engine.load_phases,
        "decode_graphs": ({"buckets": engine.decode_graphs.buckets, "capture_s": engine.decode_graphs.capture_s,
                           "overlap": engine.overlap}
                          if engine.decode_graphs is not None else None),
        "offload": offload,
        "expert_parallel": ({"ranks": engine.world, "expert_load": engine.expert_load()}
                            if engine.world > 1 else None),
        "ceilings": ceilings.as_dict(),
        "model_shape": asdict(shape),
        "routing": "not observed; the roofline's expert bytes assume uniform routing: "
                   "E * (1 - (1 - top_k/E) ** tokens) distinct experts per MoE layer",
        "prefill": prefill,
        "decode": decode,
        "skipped": skipped,
        "peak_memory": {"bytes": max(r["peak_memory_bytes"] for r in [prefill, *decode]) if cuda else _peak_rss_bytes(),
                        "how": "the largest row's torch.cuda.max_memory_allocated (reset before each row)" if cuda
                        else "the process's peak resident set size (ru_maxrss), model load included"},
        "gpu_telemetry": {"available": gpu.available, "reason": gpu.reason, "name": gpu.name,
                          "nvml_index": gpu.device_index if gpu.available else None},
        "notes": notes,
        "profiles": profiles,
        "units": UNITS,
    }
    result["metrics"] = bench_metrics(result)
    gpu.close()
    return result


def bench_metrics(result: dict) -> list[dict]:
    """The result's numbers as the common metric list (moec.runtime.regression_gate), each speed
    with its roofline bound, from ceilings measured in the same run. Tolerances are advice for a
    new baseline (`--compare B --update`): a GPU's medians move a few percent between runs."""
    speed, slow = {"rel": 0.15}, {"rel": 0.5}
    p = result["prefill"]
    tag = f"prefill/T={p['prompt_tokens']}"
    out = [metric("load_s", result["load_s"], "s", "lower", tolerance=slow),
           metric(f"{tag}/prompt_tokens_per_s", p["prompt_tokens_per_s"], "tokens/s", "higher", tolerance=speed,
                  roofline=p["bound_tokens_per_s"], bound_by=p["bound_by"]),
           metric(f"{tag}/time_to_first_token_s", p["time_to_first_token_s"], "s", "lower", tolerance=speed),
           metric(f"{tag}/energy_j_per_token", p["energy_j_per_token"], "J/token", "lower", tolerance=speed)]
    for row in result["decode"]:
        tag = f"decode/B={row['batch']}/C={row['context']}"
        out += [metric(f"{tag}/decode_tokens_per_s", row["decode_tokens_per_s"], "tokens/s", "higher",
                       tolerance=speed, roofline=row["bound_tokens_per_s"], bound_by=row["bound_by"]),
                metric(f"{tag}/achieved_percent_of_bound", row["achieved_percent_of_bound"], "%", "higher",
                       tolerance=speed, peer="roofline: max(bytes / copy bandwidth, FLOPs / matmul rate), "
                                             "ceilings measured in this run"),
                metric(f"{tag}/step_ms", row["step_ms"], "ms", "lower", tolerance=speed),
                metric(f"{tag}/energy_j_per_token", row["energy_j_per_token"], "J/token", "lower", tolerance=speed)]
    out.append(metric("peak_memory_bytes", result["peak_memory"]["bytes"], "bytes", "lower", tolerance={"rel": 0.1},
                      how=result["peak_memory"]["how"]))
    return [m for m in out if m["value"] is not None]  # energy: GPUs with NVML only


# --- output ----------------------------------------------------------------------------------


def _si(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}".rstrip()
    return f"{value:.{digits}g} {unit}".rstrip()


def _fixed(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render_table(result: dict) -> Table:
    table = Table(title=f"{result['artifact']['name']} on {result['device']['name']}")
    for name in ("phase", "batch", "context", "tokens/s", "ms/step", "TTFT ms", "bytes/step", "FLOPs/step",
                 "bound tok/s", "% of bound", "J/token", "mean W", "util %", "peak mem"):
        table.add_column(name, justify="left" if name == "phase" else "right")

    def energy(row: dict) -> list[str]:
        return [_fixed(row["energy_j_per_token"], ".3g"), _fixed(row["mean_power_w"], ".0f"),
                _fixed(row["mean_utilization_percent"], ".0f"), _si(row["peak_memory_bytes"], "B")]

    p = result["prefill"]
    table.add_row("prefill", "1", str(p["prompt_tokens"]), _fixed(p["prompt_tokens_per_s"], ".1f"),
                  _fixed(p["time_to_first_token_s"] * 1e3, ".2f"), _fixed(p["time_to_first_token_s"] * 1e3, ".2f"),
                  _si(p["roofline"]["bytes"], "B"), _si(p["roofline"]["flops"]),
                  _si(p["bound_tokens_per_s"]), _fixed(p["achieved_percent_of_bound"], ".3g"), *energy(p))
    for row in result["decode"]:
        table.add_row("decode", str(row["batch"]), str(row["context"]), _fixed(row["decode_tokens_per_s"], ".1f"),
                      _fixed(row["step_ms"], ".2f"), _fixed(row["time_to_first_token_s"] * 1e3, ".2f"),
                      _si(row["roofline"]["bytes"], "B"), _si(row["roofline"]["flops"]),
                      _si(row["bound_tokens_per_s"]), _fixed(row["achieved_percent_of_bound"], ".3g"),
                      *energy(row))
    return table


def main(args: Any) -> int:
    """The `bench` subcommand."""
    settings = settings_from_args(args)
    if args.update and not args.compare:
        raise MoecError("--update rewrites the baseline given with --compare; add --compare BASELINE")
    console = Console(stderr=True, quiet=not is_rank_zero())
    result = run_bench(args.artifact, settings, verify=not args.no_verify, console=console,
                       cuda_graphs=not getattr(args, "no_cuda_graphs", False), profile_dir=getattr(args, "profile", None),
                       ep_chunks=getattr(args, "ep_chunks", None), overlap=not getattr(args, "no_overlap", False))
    if not is_rank_zero():  # expert-parallel: rank 0 reports for the group
        return 0
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(render_table(result))
    c = result["ceilings"]
    out.print(f"load {result['load_s']:.2f}s; ceilings: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s "
              f"({c['copy_source']}), matmul {c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({c['matmul_source']}); "
              f"peak memory {_si(result['peak_memory']['bytes'], 'B')}; bound assumes uniform routing")
    off = result.get("offload")
    if off:
        pct = lambda v: f"{v:.0%}" if v is not None else "n/a"  # noqa: E731
        achieved = off.get("achieved_decode_step_s")
        measured = f"{achieved * 1e3:.2f} ms/step" if achieved else "not measured"
        out.print(f"offload: plan batch {off['policy']['batch']}: predicted {off['predicted_decode_step_s'] * 1e3:.2f} "
                  f"ms/step ({off['predicted_tokens_per_s']:.0f} tokens/s), achieved {measured}", highlight=False)
        out.print(f"  host-to-device {off['h2d_bytes_per_s_measured'] / 1e9:.1f} GB/s measured; in a profiled step the GPU "
                  f"computed {pct(off.get('gpu_busy_fraction'))} and copied {pct(off.get('copy_busy_fraction'))} of the time",
                  highlight=False)
    for profile in result["profiles"]:
        out.print(format_table(StepProfile(**profile)), highlight=False)
        out.print(f"  trace {profile['trace']}; timeline {profile['timeline']}")
    for note in result["notes"]:
        out.print(f"note: {note}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        out.print(f"wrote {path}")
    if args.compare:
        return run_gate(result, Path(args.compare), update=args.update, console=out)
    return 0
