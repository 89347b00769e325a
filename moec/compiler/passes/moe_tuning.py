"""Compile-time tuning of the MoE kernels, recorded in the manifest and compiled into the graph.

For each distinct MoE shape of the model (experts, top-k, hidden, intermediate, activation,
dtype) and each token-count bucket (1, 2, 4, … up to max_tokens_per_step), every candidate runs
on the target GPU with the real weights of the shape's first block and routing from its real
router: the Triton configs of `moec.ops.triton.configs.candidate_configs` and the
`torch._grouped_mm` path. Each is checked against the PyTorch reference, then timed; then the
fastest Triton config is timed again with each of `down_variants` in place of its down-GEMM
settings (the two GEMMs' shapes differ, and so can their best tiles). The finalists (within
FINALIST_MARGIN of the bucket's fastest, at most FINALISTS, the best of each path among them) are
then timed again round by round, in a rotating order, where the measure can (`CudaMeasure.retime`):
timed one candidate after another, in blocks, a replay's median drifted by up to 15% on an H100
at 4096+ tokens (moe_layer-h100-2026-12-06T0446), as much as the finalists differ. The fastest
correct one is kept. Nothing is tuned at run time.

How the choice reaches the compiled graph: as the `plan` string constant of each `fused_moe`
call (`apply_moe_plans`). A Triton plan holds one config per token range and `fused_moe` gates
each range's launches by T with integer arithmetic on the symbolic token count, so one
AOTInductor graph runs the bucket's choice at decode and at prefill (see
`moec.ops.triton.fused_moe`). Adjacent buckets keep the previous range's config while it is
within RANGE_TOLERANCE of the bucket's fastest Triton config, so fewer kernels are compiled in.
The `torch._grouped_mm` path is aten ops, not launches a grid can gate: it runs a shape's every
token count, or the token counts above a switch point with the Triton plan below it — then the
block's call becomes a `torch.cond` on T between the two (`apply_moe_plans`), which AOTInductor
compiles into an `if` in its C++ wrapper. Whichever of the three has the lowest mean time relative
to each bucket's fastest is kept, a switch only if it beats both single paths by SWITCH_GAIN. The
table records, per bucket, every candidate's time, the fastest, and what the artifact runs.

On CPU there is nothing to time: `fused_moe` runs the PyTorch reference, and the table says so.
"""

from __future__ import annotations

import copy
import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch._dispatch.python import enable_python_dispatcher

from moec.compiler.passes.moe_lowering import TOLERANCE
from moec.compiler.passes.moe_region import MOE_BLOCKS
from moec.errors import LoweringError
from moec.ops.moe_combine import moe_combine_ref
from moec.ops.moe_experts import moe_experts_ref
from moec.ops.triton.configs import candidate_configs, config_name, down_variants, encode_plan

RANGE_TOLERANCE = 0.03  # keep the current range's config while within 3% of the bucket's best
# candidates within this of a bucket's fastest (timed in blocks) are timed again round by round,
# at most FINALISTS of them: the drift between blocks seen on an H100 is up to 15%
FINALIST_MARGIN = 0.15
FINALISTS = 4
# A Triton/grouped_mm switch (a branch in the graph) must make some bucket 2% faster than the best
# single path, and the mean over buckets no slower. Not 2% on the mean: the buckets weigh alike
# there, so a 16% loss at 4096 tokens (the H200's Mixtral layer, where prefill runs) counted as 1.2%.
SWITCH_GAIN = 0.02
# Whether a compile for CUDA may branch between the paths. AOTInductor on torch 2.11 failed to lower
# the branch (gpu_op_check-h200-2026-12-03T1417: the buffer-reuse planner's "Start index 4 out of
# bounds", then a call to a `_grouped_mm` C shim 2.11 lacks); moec.compiler.lower works around both,
# and the 8-layer Mixtral-shape compile lowered its branches on the H200 (e2e_decode-h200-2026-12-03T1644).
# Where lowering still fails, the compiler lowers `MoeTuning.one_path` instead, then
# `MoeTuning.triton_only` (pipeline.py).
CUDA_SWITCH = True
GROUPED_MM = "grouped_mm"
CPU_NOTE = ("device cpu: fused_moe runs the PyTorch reference (moe_experts + weighted combine); "
            "there are no kernels to choose between, and nothing was timed")


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str
    dtype: str

    @property
    def key(self) -> str:
        return (f"E{self.num_experts} top-{self.top_k} H{self.hidden_size} I{self.intermediate_size} "
                f"{self.activation} {self.dtype}")


@dataclass(frozen=True)
class Candidate:
    name: str  # "triton M16N64K128G1w4s4" or "grouped_mm"
    path: str  # "triton" or "grouped_mm"
    config: dict | None = None


@dataclass
class Measurement:
    ms: float | None = None  # median time; None if the candidate failed
    error: str | None = None
    block_ms: float | None = None  # where `ms` is from the round-by-round re-timing: the first timing


# measure(shape, tokens, candidate) -> Measurement: run, check and time one candidate. A measure
# may also have retime(shape, tokens, [candidate, ...]) -> {name: ms}: time candidates that
# already passed, round by round, so one drift of the clock applies to all of them alike
Measure = Callable[[MoeShape, int, Candidate], Measurement]


def finalists(times: dict[str, float], path_of: dict[str, str]) -> list[str]:
    """The candidates worth timing again side by side: those within FINALIST_MARGIN of the
    fastest, the fastest of each path among them first, then the rest by time, FINALISTS at most."""
    if not times:
        return []
    near = sorted((n for n, ms in times.items() if ms <= min(times.values()) * (1 + FINALIST_MARGIN)),
                  key=times.get)
    heads = [next(n for n in near if path_of[n] == p) for p in dict.fromkeys(path_of[n] for n in near)]
    return [*heads, *(n for n in near if n not in heads)][:FINALISTS]


@dataclass
class MoeTuning:
    table: dict  # the manifest's kernels["moe"]
    plans: dict[str, str]  # block path -> the `plan` string of its fused_moe call
    # block path -> the largest token count its Triton plan runs; above it, the grouped_mm path
    switches: dict[str, int] = field(default_factory=dict)
    # the same measurements chosen without switches (one path per block), where any block has
    # one: what the compiler lowers if AOTInductor cannot lower the branch
    one_path: MoeTuning | None = None
    # the same measurements with the Triton kernels only, where any block runs grouped_mm at some
    # T: what the compiler lowers if AOTInductor cannot lower the grouped_mm path at all
    triton_only: MoeTuning | None = None

    def fallbacks(self) -> list[tuple[str, MoeTuning]]:
        """What to lower, in order, if AOTInductor fails on this tuning's program: (the manifest
        table's key for why, the tuning)."""
        out = [("switch_failed", self.one_path)] if self.one_path is not None else []
        if self.triton_only is not None and all(t.plans != self.triton_only.plans for _, t in out):
            out.append(("grouped_mm_failed", self.triton_only))
        return out


def token_buckets(max_tokens: int) -> list[int]:
    """1, 2, 4, … up to max_tokens (which closes the list when it is not a power of two)."""
    out, t = [], 1
    while t < max_tokens:
        out.append(t)
        t *= 2
    return [*out, max_tokens]


def default_candidates() -> list[Candidate]:
    triton = [Candidate(f"triton {config_name(c)}", "triton", c) for c in candidate_configs()]
    return [*triton, Candidate(GROUPED_MM, GROUPED_MM)]


def region_shape(region: dict, dtype: torch.dtype) -> MoeShape:
    return MoeShape(region["num_experts"], region["top_k"], region["hidden_size"], region["intermediate_size"],
                    region["activation"], str(dtype).removeprefix("torch."))


def block_weights(model: torch.nn.Module, path: str) -> dict[str, torch.Tensor]:
    """router_weight, gate_up_proj, down_proj of the MoE block at `path`."""
    block = model.get_submodule(path)
    spec = MOE_BLOCKS[type(block).__name__]
    return {role: block.get_parameter(getattr(spec, role)) for role in ("router_weight", "gate_up_proj", "down_proj")}


def table_entry(members: list[dict], plan: dict, rows: dict, switch: int | None) -> dict:
    """One MoE shape's row of the manifest's tuning table: its blocks, the chosen plan, where
    grouped_mm takes over (if it does), and what each bucket measured."""
    return {
        "layers": [r["path"] for r in members],
        "path": plan["path"],
        "ranges": ([{"max_tokens": hi, "config": config_name(cfg)} for hi, cfg in plan["ranges"]]
                   if plan["path"] == "triton" else []),
        **({"grouped_mm_above": switch} if switch is not None else {}),
        "buckets": rows,
    }


def choose(buckets: list[int], results: dict[int, dict[str, Measurement]],
           candidates: list[Candidate], allow_switch: bool = True) -> tuple[dict, dict, int | None]:
    """From every candidate's measurement per bucket: (plan, table rows per bucket, switch): the
    plan runs up to `switch` tokens and grouped_mm above it (None: the plan runs every T;
    always None without `allow_switch`)."""
    by_name = {c.name: c for c in candidates}
    fastest, best_triton = {}, {}
    for b in buckets:
        ok = {n: m.ms for n, m in results[b].items() if m.ms is not None}
        if not ok:
            errors = "; ".join(f"{n}: {m.error}" for n, m in results[b].items())
            raise LoweringError(f"no MoE kernel ran correctly at {b} tokens ({errors})")
        fastest[b] = min(ok, key=ok.get)
        triton = {n: ms for n, ms in ok.items() if by_name[n].path == "triton"}
        best_triton[b] = min(triton, key=triton.get) if triton else None

    def slowdown(name_of: Callable[[int], str]) -> float:
        return statistics.fmean(results[b][name_of(b)].ms / results[b][fastest[b]].ms for b in buckets)

    triton_ok = all(best_triton[b] is not None for b in buckets)
    grouped_ok = all(results[b].get(GROUPED_MM, Measurement()).ms is not None for b in buckets)
    triton_runs: dict[int, str] = {}
    if triton_ok:
        current = None
        for b in buckets:
            best = best_triton[b]
            held = results[b].get(current, Measurement()).ms if current else None  # refined: not every bucket
            if held is None or held > results[b][best].ms * (1 + RANGE_TOLERANCE):
                current = best
            triton_runs[b] = current
    options = []  # (mean slowdown, what each bucket runs)
    if triton_ok:
        options.append((slowdown(triton_runs.__getitem__), triton_runs))
    if grouped_ok:
        options.append((slowdown(lambda b: GROUPED_MM), dict.fromkeys(buckets, GROUPED_MM)))
    if not options:
        raise LoweringError("neither the Triton kernels nor torch._grouped_mm ran correctly at every token count: "
                            + ", ".join(f"{b} tokens: fastest {fastest[b]}" for b in buckets))
    single = min(options, key=lambda o: o[0])  # ties: the Triton plan
    runs, switch = single[1], None
    if allow_switch and triton_ok and grouped_ok:  # Triton up to some bucket, grouped_mm above it
        mixed = [({b: triton_runs[b] if j < i else GROUPED_MM for j, b in enumerate(buckets)}, buckets[i - 1])
                 for i in range(1, len(buckets))]
        best_runs, best_switch = min(mixed, key=lambda m: slowdown(m[0].__getitem__))
        gain = max(1 - results[b][best_runs[b]].ms / results[b][runs[b]].ms for b in buckets)
        if slowdown(best_runs.__getitem__) <= single[0] and gain >= SWITCH_GAIN:
            runs, switch = best_runs, best_switch

    if runs[buckets[0]] == GROUPED_MM:
        plan = {"path": GROUPED_MM}
    else:
        ranges = []
        below = [b for b in buckets if runs[b] != GROUPED_MM]
        for i, b in enumerate(below):
            last = i == len(below) - 1
            if last or runs[below[i + 1]] != runs[b]:
                ranges.append((None if last else b, copy.deepcopy(by_name[runs[b]].config)))
        plan = {"path": "triton", "ranges": ranges}
    rows = {}
    for b in buckets:
        rows[str(b)] = {
            "runs": runs[b],
            "ms": round(results[b][runs[b]].ms, 4),
            "fastest": fastest[b],
            "fastest_ms": round(results[b][fastest[b]].ms, 4),
            "candidates": {n: round(m.ms, 4) if m.ms is not None else f"error: {m.error}"
                           for n, m in results[b].items()},
        }
        retimed = {n: round(m.block_ms, 4) for n, m in results[b].items() if m.block_ms is not None}
        if retimed:  # the candidates' times above are round by round; these were their first
            rows[str(b)]["first_timing"] = retimed
    return plan, rows, switch


def tune_moe(regions: list[dict], model: torch.nn.Module, dtype: torch.dtype, device: str, max_tokens: int,
             measure: Measure | None = None, candidates: list[Candidate] | None = None,
             allow_switch: bool = True, refine: Callable[[dict], list[dict]] | None = None) -> MoeTuning:
    """Tune every distinct MoE shape of `regions` (as `lower_moe` describes them) for `device`.
    `allow_switch`: whether a block may branch between paths by T (not where the runtime's expert
    executor runs the experts: offload, expert parallelism, which take one plan per call).
    `refine(config)`: the configs to time after a bucket's candidates, built from its fastest
    Triton config (default with the default candidates: `down_variants`; none otherwise)."""
    shapes: dict[MoeShape, list[dict]] = {}
    for region in regions:
        shapes.setdefault(region_shape(region, dtype), []).append(region)
    if device != "cuda":
        table = {"device": device, "path": "reference", "note": CPU_NOTE,
                 "shapes": {s.key: {"layers": [r["path"] for r in rs], "path": "reference"}
                            for s, rs in shapes.items()}}
        return MoeTuning(table, {r["path"]: "" for r in regions})

    if candidates is None:
        candidates, refine = default_candidates(), refine or down_variants
    buckets = token_buckets(max_tokens)
    timer = None
    if measure is None:
        timer = CudaMeasure({s: block_weights(model, rs[0]["path"]) for s, rs in shapes.items()},
                            {s: rs[0]["renormalize"] for s, rs in shapes.items()})
        measure = timer
    table = {"device": device, "buckets": buckets, "range_tolerance": RANGE_TOLERANCE,
             "timer": timer.describe() if timer else "injected", "shapes": {}}
    plans, switch_points = {}, {}
    one_path_table, one_path_plans = copy.deepcopy(table), {}
    triton_table, triton_plans = copy.deepcopy(table), {}
    triton_ok = True  # every shape has a Triton plan for every bucket
    for shape, members in shapes.items():
        results: dict[int, dict[str, Measurement]] = {}
        failed: dict[str, str] = {}  # a candidate that fails once is not trusted for this shape at all
        refined: dict[str, Candidate] = {}  # timed at some buckets only: on their fastest config

        def run(b: int, c: Candidate) -> None:
            if c.name in failed:
                results[b][c.name] = Measurement(error=failed[c.name])
                return
            m = measure(shape, b, c)
            if m.ms is None:
                failed[c.name] = f"failed at {b} tokens: {m.error}"
                m = Measurement(error=failed[c.name])
            results[b][c.name] = m

        def retime(b: int, by_name: dict[str, Candidate]) -> None:
            ok = {n: m.ms for n, m in results[b].items() if m.ms is not None}
            names = finalists(ok, {n: by_name[n].path for n in ok})
            if len(names) < 2:
                return
            for name, ms in measure.retime(shape, b, [by_name[n] for n in names]).items():
                if ms is None:  # passed alone but not replayed with the others: keep its first timing
                    continue
                results[b][name] = Measurement(ms=ms, block_ms=results[b][name].ms)

        for b in buckets:
            results[b] = {}
            for c in candidates:
                run(b, c)
            timed = [c for c in candidates if c.path == "triton" and results[b][c.name].ms is not None]
            if refine and timed:
                best = min(timed, key=lambda c: results[b][c.name].ms)
                for cfg in refine(best.config):
                    c = Candidate(f"triton {config_name(cfg)}", "triton", cfg)
                    if c.name not in results[b]:
                        refined.setdefault(c.name, c)
                        run(b, c)
            if hasattr(measure, "retime"):
                retime(b, {c.name: c for c in [*candidates, *refined.values()]})
        for b in buckets:  # nor at the token counts it passed before failing
            for name, why in failed.items():
                if results[b].get(name, Measurement()).ms is not None:
                    results[b][name] = Measurement(error=why)
        everything = [*candidates, *refined.values()]
        for allow, shape_table, shape_plans in ((allow_switch, table, plans), (False, one_path_table, one_path_plans)):
            try:
                plan, rows, switch = choose(buckets, results, everything, allow)
            except LoweringError as e:
                raise LoweringError(f"MoE block {members[0]['path']} ({shape.key}): {e}") from None
            shape_table["shapes"][shape.key] = table_entry(members, plan, rows, switch)
            shape_plans.update({r["path"]: encode_plan(plan) for r in members})
            if switch is not None:
                switch_points.update({r["path"]: switch for r in members})
        triton_results = {b: {n: m for n, m in results[b].items() if n != GROUPED_MM} for b in buckets}
        try:
            plan, rows, _ = choose(buckets, triton_results, [c for c in everything if c.path == "triton"], False)
        except LoweringError:
            triton_ok = False
        else:
            triton_table["shapes"][shape.key] = table_entry(members, plan, rows, None)
            triton_plans.update({r["path"]: encode_plan(plan) for r in members})
    if timer is not None:
        timer.release()
    one_path = MoeTuning(one_path_table, one_path_plans) if switch_points else None
    uses_grouped_mm = bool(switch_points) or any(e["path"] == GROUPED_MM for e in table["shapes"].values())
    triton_only = MoeTuning(triton_table, triton_plans) if uses_grouped_mm and triton_ok else None
    return MoeTuning(table, plans, switch_points, one_path, triton_only)


def compiled_grouped_mm(backend: str | Callable = "inductor") -> Callable[..., torch.Tensor]:
    """`fused_moe_grouped_mm` through Inductor as the artifact compiles it: the token count
    symbolic, every other size fixed. `dynamic=False` with the token dim marked, not Dynamo's
    automatic dynamic: its cache is the function's, shared by every caller, so a second MoE shape
    would recompile with the weights' sizes symbolic too (Qwen3's layer measured after Mixtral's in
    moe_layer-h200-2026-12-03T1825: its gather back to token order took 2.53 ms, transformers'
    0.84). The first call with T = 1 compiles a graph of its own."""
    from moec.ops.fused_moe import fused_moe_grouped_mm

    compiled = torch.compile(fused_moe_grouped_mm, fullgraph=True, dynamic=False, backend=backend)

    def run(hidden, w13, w2, topk_weights, topk_ids, activation):
        for t in (hidden, topk_weights, topk_ids):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(hidden, w13, w2, topk_weights, topk_ids, activation)

    return run


class CudaMeasure:
    """Runs a candidate on the GPU, checks it against the reference, and times it as a CUDA
    graph replay (as the runtime replays decode steps; for prefill it stands for AOTInductor's
    C++ launches, which have no Python between kernels), the L2 cache flushed before each replay
    outside the timed events by a read of twice its size (in a real model the other layers'
    weights, read, evict this one's), median
    of at least MIN_REPLAYS. The grouped_mm path is timed as Inductor compiles it into the
    artifact (torch.compile, T symbolic), not op by op, which pays a pass per aten op around the
    two GEMMs that the artifact does not. Its gap to transformers' compiled block (5.78 against
    5.05 ms for a Mixtral layer at 4096 tokens on an H200, moe_layer-h200-2026-12-03) was the
    row moves' Inductor kernels, configured for the size hint of the graph's first compile (T = 4
    here): the Triton row kernels that replaced them do not depend on it (`moe_permute`)."""

    MIN_REPLAYS = 10
    MAX_REPLAYS = 100
    TARGET_MS = 200.0  # timed replays per candidate and bucket aim at about this much GPU time
    RETIME_ROUNDS = 20  # rounds of the finalists' side-by-side re-timing

    def __init__(self, weights: dict[MoeShape, dict[str, torch.Tensor]], renormalize: dict[MoeShape, bool],
                 seed: int = 0):
        self.weights, self.renormalize, self.seed = weights, renormalize, seed
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.flush_buf = torch.ones(2 * props.L2_cache_size // 4 + 1, dtype=torch.float32, device="cuda")
        self.flush_total = torch.empty((), dtype=torch.float32, device="cuda")
        self.inputs: dict = {}
        self.grouped_mm = None  # the grouped_mm path through torch.compile, made on first use

    def describe(self) -> str:
        return (f"CUDA-graph replays (plain launches where capture fails), L2 flushed (a read) before each outside "
                f"the events, median of {self.MIN_REPLAYS}-{self.MAX_REPLAYS}; each output checked against "
                f"the PyTorch reference first; the grouped_mm path through torch.compile (T symbolic), as "
                f"Inductor compiles it into the artifact; the finalists (within {FINALIST_MARGIN:.0%} of the "
                f"fastest, up to {FINALISTS}) timed again round by round in a rotating order, "
                f"{self.RETIME_ROUNDS} rounds")

    def _inputs(self, shape: MoeShape, tokens: int):
        key = (shape, tokens)
        if key not in self.inputs:
            self.inputs.clear()  # one bucket at a time: the buckets run in order
            w = self.weights[shape]
            g = torch.Generator(device="cuda").manual_seed(self.seed + tokens)
            hidden = torch.randn(tokens, shape.hidden_size, generator=g, device="cuda").to(w["gate_up_proj"].dtype)
            topk_w, topk_ids = torch.ops.moec.moe_router(hidden, w["router_weight"], shape.top_k,
                                                         self.renormalize[shape])
            args = (hidden, w["gate_up_proj"], w["down_proj"], topk_w, topk_ids, shape.activation)
            want = moe_combine_ref(moe_experts_ref(hidden, w["gate_up_proj"], w["down_proj"], topk_ids,
                                                   shape.activation), topk_w)
            self.inputs[key] = (args, want)
        return self.inputs[key]

    def _runner(self, shape: MoeShape, tokens: int, candidate: Candidate) -> Callable[[], torch.Tensor]:
        from moec.ops.triton.fused_moe import fused_moe as fused_moe_triton

        args, _ = self._inputs(shape, tokens)
        if candidate.path == GROUPED_MM:
            if self.grouped_mm is None:
                self.grouped_mm = compiled_grouped_mm()
            return lambda: self.grouped_mm(*args)
        return lambda: fused_moe_triton(*args, config=candidate.config)

    def __call__(self, shape: MoeShape, tokens: int, candidate: Candidate) -> Measurement:
        _, want = self._inputs(shape, tokens)
        run = self._runner(shape, tokens, candidate)
        try:
            got = run()  # compiles a Triton config the first time
            torch.cuda.synchronize()
            rtol, atol = TOLERANCE.get(want.dtype, (1e-2, 1e-2))
            err = (got.float() - want.float()).abs().max().item()
            bound = atol + rtol * want.float().abs().max().item()
            if not err <= bound:
                return Measurement(error=f"wrong result: max abs error {err:.3g} > {bound:.3g}")
            return Measurement(ms=self._time(run))
        except Exception as e:  # noqa: BLE001 - a config that cannot compile or launch is not a candidate
            torch.cuda.synchronize()
            return Measurement(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

    def retime(self, shape: MoeShape, tokens: int, candidates: list[Candidate]) -> dict[str, float | None]:
        """Candidates that passed `__call__`, each captured once, then replayed round by round
        (the order rotating each round): the median of RETIME_ROUNDS each. None for one that fails."""
        calls = {}
        for c in candidates:
            try:
                calls[c.name] = self._capture(self._runner(shape, tokens, c))
            except Exception:  # noqa: BLE001 - it was timed alone; the tuner keeps that timing
                torch.cuda.synchronize()
                calls[c.name] = None
        live = [n for n, call in calls.items() if call is not None]
        events: dict[str, list] = {n: [] for n in live}
        for r in range(self.RETIME_ROUNDS):
            for n in live[r % len(live):] + live[:r % len(live)]:
                events[n].append(self._timed(calls[n]))
        torch.cuda.synchronize()
        out = {n: statistics.median(s.elapsed_time(e) for s, e in ev) for n, ev in events.items()}
        return {c.name: out.get(c.name) for c in candidates}

    def _capture(self, run) -> Callable[[], object]:
        """run's launches as one CUDA-graph replay (or run itself where capture fails), warmed up."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run()
            call = graph.replay
        except RuntimeError:  # not capturable: time its launches as they are
            torch.cuda.synchronize()
            call = run
        call()
        torch.cuda.synchronize()
        return call

    def _time(self, run) -> float:
        call = self._capture(run)
        probe = [self._timed(call) for _ in range(3)]
        torch.cuda.synchronize()
        estimate = statistics.median(s.elapsed_time(e) for s, e in probe)
        n = int(min(self.MAX_REPLAYS, max(self.MIN_REPLAYS, self.TARGET_MS / max(estimate, 1e-3))))
        events = [self._timed(call) for _ in range(n)]
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def _timed(self, call) -> tuple:
        # a read, not a write: written lines would be written back inside the timed call
        # (benchmarks/measure.py's L2Flusher says how much that costs)
        torch.sum(self.flush_buf, dim=0, out=self.flush_total)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        return start, end

    def release(self) -> None:
        self.inputs.clear()
        self.grouped_mm = None
        self.flush_buf = self.flush_total = None
        torch.cuda.empty_cache()


def apply_moe_plans(ep: torch.export.ExportedProgram, model: torch.nn.Module, plans: dict[str, str],
                    switches: dict[str, int] | None = None) -> torch.export.ExportedProgram:
    """A new program whose `fused_moe` calls carry their block's plan (matched by the expert
    weights they read); blocks whose plan is "" keep the default. A block with a switch point
    (`MoeTuning.switches`) gets a `torch.cond` on its token count instead: its plan up to the
    switch, the grouped_mm path above it."""
    switches = switches or {}
    if not any(plans.values()) and not switches:
        return ep
    gm = copy.deepcopy(ep.graph_module)
    param_of = {**ep.graph_signature.inputs_to_parameters, **ep.graph_signature.inputs_to_buffers}
    plan_of_w13, switch_of_w13 = {}, {}
    for path, plan in plans.items():
        try:
            spec = MOE_BLOCKS[type(model.get_submodule(path)).__name__]
        except (AttributeError, KeyError):
            raise LoweringError(f"a tuned plan names {path}, which is not an MoE block of the model") from None
        plan_of_w13[f"{path}.{spec.gate_up_proj}"] = plan
        if path in switches:
            switch_of_w13[f"{path}.{spec.gate_up_proj}"] = switches[path]
    applied = set()
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.moec.fused_moe.default:
            continue
        fqn = param_of.get(node.args[1].name)
        if fqn in switch_of_w13:
            branch_on_tokens(gm, node, switch_of_w13[fqn], plan_of_w13[fqn], encode_plan({"path": GROUPED_MM}))
            applied.add(fqn)
        elif fqn in plan_of_w13:
            node.args = (*node.args[:6], plan_of_w13[fqn])
            applied.add(fqn)
    missing = sorted(set(plan_of_w13) - applied)
    if missing:
        raise LoweringError(f"tuned plans for {', '.join(missing)} found no fused_moe call reading those weights")
    gm.graph.lint()
    gm.recompile()
    return ep._update(gm, ep.graph_signature)  # after the edits: it takes the module's submodules as they are


def branch_on_tokens(gm: torch.fx.GraphModule, node: torch.fx.Node, switch: int, low: str, high: str) -> None:
    """Replace `fused_moe(hidden, ...)` by `cond(T > switch, fused_moe(..., high), fused_moe(..., low))`.
    Every new node carries the fake value export would have given it (computed in the program's
    fake mode), which AOTInductor lowers from."""
    graph = gm.graph
    operands = node.args[:5]
    activation = node.args[5]
    values = [a.meta["val"] for a in operands]
    fake_mode = values[0].fake_mode
    index = sum(1 for name, _ in gm.named_children() if name.startswith("moe_switch_"))

    def branch(plan: str) -> torch.fx.GraphModule:
        g = torch.fx.Graph()
        inputs = []
        for name, value in zip(("hidden", "w13", "w2", "topk_weights", "topk_ids"), values):
            inputs.append(g.placeholder(name))
            inputs[-1].meta["val"] = value
        out = g.call_function(torch.ops.moec.fused_moe.default, (*inputs, activation, plan))
        out.meta["val"] = torch.ops.moec.fused_moe.default(*values, activation, plan)
        g.output((out,))
        return torch.fx.GraphModule(torch.nn.Module(), g)

    with fake_mode, enable_python_dispatcher():
        gm.register_module(f"moe_switch_{index}_high", branch(high))
        gm.register_module(f"moe_switch_{index}_low", branch(low))
        with graph.inserting_before(node):
            tokens = graph.call_function(torch.ops.aten.sym_size.int, (operands[0], 0))
            tokens.meta["val"] = values[0].shape[0]
            above = graph.call_function(operator.gt, (tokens, switch))
            above.meta["val"] = values[0].shape[0] > switch
            cond = graph.call_function(torch.ops.higher_order.cond, (
                above, graph.get_attr(f"moe_switch_{index}_high"), graph.get_attr(f"moe_switch_{index}_low"),
                tuple(operands)))
            cond.meta["val"] = (node.meta["val"],)
            out = graph.call_function(operator.getitem, (cond, 0))
            out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
