"""Where a decode (or prefill) step's time goes: kernels and copies per stream, from `torch.profiler`.

`profile_decode` starts `batch` sequences, steps until each decodes, then profiles a few pure
decode steps exactly as the engine runs them (CUDA-graph replays included: the profiler sees the
kernels inside a replayed graph). From the trace it takes the device's work — kernels, copies and
memsets on every stream — and reports, per step: wall time, the share of it each stream was busy
(an offloaded artifact's weight-copy stream next to the compute stream), and the operations by
time. It writes the trace (open in Perfetto or chrome://tracing) and a timeline of the last step,
one row per stream. On a CPU the rows are the threads' top-level operators. `profile_prefill`
does the same for one long prompt's prefill (the step that time-to-first-token waits on).

    moe-runtime bench ARTIFACT --profile DIR        (one profile per batch size and one of the
                                                     prefill, after the timings)
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moec.runtime.sampler import SamplingParams

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_MARK = "moec_decode_step"


@dataclass
class StepProfile:
    batch: int
    context: int
    steps: int
    step_ms: float
    busy_fraction: float  # share of the profiled steps' wall time any stream (thread on CPU) was busy
    compute_busy_fraction: float = 0.0  # ... running kernels (operators on a CPU), on any stream
    copy_busy_fraction: float | None = None  # ... copying (GPU only): an offloaded artifact's weight stream
    lanes: dict[str, float] = field(default_factory=dict)  # stream/thread -> busy share of the wall time
    ops: list[dict] = field(default_factory=list)  # by time: name, kind, calls_per_step, us_per_step, share
    trace: str | None = None
    timeline: str | None = None
    kind: str = "decode"  # or "prefill": one step over a prompt of `context` tokens

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _top_level(events: list[dict]) -> list[dict]:
    """Per thread, the events not nested in an earlier one (CPU operators call operators)."""
    out, by_lane = [], defaultdict(list)
    for e in events:
        by_lane[e["lane"]].append(e)
    for lane_events in by_lane.values():
        end = float("-inf")
        for e in sorted(lane_events, key=lambda e: (e["ts"], -e["dur"])):
            if e["ts"] >= end:
                out.append(e)
                end = e["ts"] + e["dur"]
    return out


def work_events(trace: dict) -> tuple[list[dict], list[tuple[float, float]]]:
    """(the device's work — or, with none, the CPU's top-level operators — as events with a
    lane, and the spans of the step marks) from a Chrome trace that torch.profiler exported."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name", "").startswith(STEP_MARK))
    device = [dict(e, lane=f"stream {e.get('args', {}).get('stream', e.get('tid'))}", kind=e["cat"])
              for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if device:
        return device, marks
    cpu = [dict(e, lane=f"thread {e.get('tid')}", kind="cpu_op") for e in events if e.get("cat") == "cpu_op"]
    return _top_level(cpu), marks


def summarize(events: list[dict], steps: int, wall_s: float) -> dict:
    """Busy shares and the operations by time, per step."""
    wall_us = wall_s * 1e6
    lanes = defaultdict(list)
    for e in events:
        lanes[e["lane"]].append((e["ts"], e["ts"] + e["dur"]))
    by_name = defaultdict(lambda: [0, 0.0, ""])
    for e in events:
        entry = by_name[e["name"]]
        entry[0] += 1
        entry[1] += e["dur"]
        entry[2] = e["kind"]
    total_us = sum(v[1] for v in by_name.values()) or 1.0
    ops = sorted(({"name": name, "kind": kind, "calls_per_step": calls / steps, "us_per_step": us / steps,
                   "share": us / total_us} for name, (calls, us, kind) in by_name.items()),
                 key=lambda o: -o["us_per_step"])
    all_intervals = [iv for ivs in lanes.values() for iv in ivs]

    def share(kinds) -> float:
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["kind"] in kinds]
        return min(_union_us(spans) / wall_us, 1.0) if wall_us else 0.0

    device = any(e["kind"] in DEVICE_CATEGORIES for e in events)
    return {"busy_fraction": min(_union_us(all_intervals) / wall_us, 1.0) if wall_us else 0.0,
            "compute_busy_fraction": share(("kernel", "cpu_op")),
            "copy_busy_fraction": share(("gpu_memcpy",)) if device else None,
            "lanes": {lane: min(_union_us(ivs) / wall_us, 1.0) for lane, ivs in sorted(lanes.items())},
            "ops": ops}


def _start_decoding(engine, batch: int, context: int, steps: int) -> list:
    generator = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(batch):
        ids = torch.randint(0, engine.spec.vocab_size, (context,), generator=generator).tolist()
        seq = engine.new_sequence(ids, SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True))
        engine.scheduler.add(seq)
        seqs.append(seq)
    while not all(len(s.output_ids) >= 1 for s in seqs):  # the prompts (several steps at a large batch)
        engine.step()
    engine.step()  # one pure decode step before the profiled ones
    return seqs


def _profile_steps(engine, more, seqs: list, out_dir: str | Path | None, title: str, **fields) -> StepProfile:
    """Run `engine.step()` under torch.profiler while `more(steps so far)`, abort `seqs` after,
    and summarize the device's work per step (trace and timeline into `out_dir` if given)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 0
    try:
        with profile(activities=activities) as prof:
            if cuda:
                torch.cuda.synchronize(engine.device)
            start = time.perf_counter()
            while more(steps):
                with record_function(f"{STEP_MARK}_{steps}"):
                    engine.step()
                steps += 1
            if cuda:
                torch.cuda.synchronize(engine.device)
            wall_s = time.perf_counter() - start
    finally:
        for seq in seqs:
            engine.abort(seq)
    with tempfile.TemporaryDirectory() as scratch:  # the trace is read back even when not kept
        out = Path(out_dir if out_dir is not None else scratch)
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / "trace.json"))
        events, marks = work_events(json.loads((out / "trace.json").read_text()))
    result = StepProfile(steps=steps, step_ms=wall_s / steps * 1e3, **fields, **summarize(events, steps, wall_s))
    if out_dir is not None:
        result.trace = str(out / "trace.json")
        result.timeline = plot_timeline(events, marks, out / "timeline.png", f"{title} ({engine.device.type})")
    return result


def profile_decode(engine, batch: int, context: int, steps: int = 3, out_dir: str | Path | None = None) -> StepProfile:
    """Profile `steps` decode steps of `batch` sequences at `context` tokens each."""
    context = max(1, min(context, engine.spec.max_seq_len - steps - 4))  # room for the profiled steps
    seqs = _start_decoding(engine, batch, context, steps)
    return _profile_steps(engine, lambda done: done < steps, seqs, out_dir,
                          f"decode step, batch {batch}, context {context}", batch=batch, context=context)


def profile_prefill(engine, tokens: int, out_dir: str | Path | None = None) -> StepProfile:
    """Profile the prefill of one prompt of `tokens` random tokens (one step when the compiled
    step holds them all; more otherwise), through its first token."""
    tokens = max(1, min(tokens, engine.spec.max_seq_len - 1))
    ids = torch.randint(0, engine.spec.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.generate([ids], max_tokens=1, ignore_eos=True)  # warm: the same shapes, off the record
    seq = engine.new_sequence(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    engine.scheduler.add(seq)
    return _profile_steps(engine, lambda done: not seq.output_ids, [seq], out_dir, f"prefill step, {tokens} tokens",
                          batch=1, context=tokens, kind="prefill")


def plot_timeline(events: list[dict], marks: list[tuple[float, float]], path: Path, title: str) -> str | None:
    """The last profiled step's work, one row per stream (thread), coloured by kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    start = marks[-1][0] if marks else min((e["ts"] for e in events), default=0.0)
    last = [e for e in events if e["ts"] >= start]
    if not last:
        return None
    origin = min(e["ts"] for e in last)
    lanes = sorted({e["lane"] for e in last})
    colours = {"kernel": "tab:blue", "gpu_memcpy": "tab:orange", "gpu_memset": "tab:gray", "cpu_op": "tab:green"}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * len(lanes)))
    for row, lane in enumerate(lanes):
        for kind, colour in colours.items():
            spans = [((e["ts"] - origin) / 1e3, e["dur"] / 1e3) for e in last if e["lane"] == lane and e["kind"] == kind]
            if spans:
                ax.broken_barh(spans, (row - 0.35, 0.7), color=colour, label=kind)
    handles = {h.get_label(): h for h in ax.collections}
    ax.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("ms from the step's first operation")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def format_table(result: StepProfile, top: int = 12) -> str:
    lanes = ", ".join(f"{lane} {share:.0%}" for lane, share in result.lanes.items())
    copying = f", copying {result.copy_busy_fraction:.0%}" if result.copy_busy_fraction is not None else ""
    what = (f"prefill, {result.context} tokens in {result.steps} step(s)" if result.kind == "prefill"
            else f"decode step, batch {result.batch}, context {result.context}")
    lines = [f"{what}: {result.step_ms:.3f} ms/step; "
             f"busy {result.busy_fraction:.0%} ({lanes}); computing {result.compute_busy_fraction:.0%}{copying}",
             f"  {'us/step':>9} {'calls':>6} {'share':>6}  operation"]
    for op in result.ops[:top]:
        lines.append(f"  {op['us_per_step']:9.1f} {op['calls_per_step']:6.1f} {op['share']:6.1%}  {op['name'][:100]}")
    if len(result.ops) > top:
        rest = sum(o["us_per_step"] for o in result.ops[top:])
        lines.append(f"  {rest:9.1f} {'':>6} {'':>6}  ({len(result.ops) - top} more)")
    return "\n".join(lines)
