"""The CUDA ops against their references at Mixtral-8x7B shapes, in bf16, eager and through Inductor.

    python benchmarks/gpu_op_check.py --out $OUT

Seconds, not minutes: run it before anything that compiles a whole model. Each row compares an op
(the Triton paged attention; fused_moe with the default plan, every candidate config as a one-range
plan, a two-range plan and the grouped_mm path; the same with 128 experts, top-8, on either side of
the align's chunking switch and through AOTInductor; and the tuner's torch.cond switch between a
Triton plan and grouped_mm through AOTInductor) with the reference computed in fp32 on the same
bf16 inputs, as max |a - b| / max |ref| per output. The same ops then run inside
`torch.compile(dynamic=True)`, which hands scalars and token gates to the kernels the way
AOTInductor does. Each AOTInductor artifact is compiled and loaded as moec does (`aoti_load`),
in a child process of this script (`in_child`): a crash or hang there becomes that case's error
row, naming the stage it stopped in. Writes gpu_op_check.json; exits 1 if a row is over its
tolerance or failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 2e-2  # bf16 inputs, fp32 accumulation: a few bf16 ulps of the output's scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def expert_weights(g: torch.Generator, experts: int, hidden: int, inter: int, scale: float) -> tuple:
    """Random bf16 w13 [E, 2I, H] and w2 [E, H, I] drawn from `g` on the GPU."""
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) * scale).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) * scale).bfloat16()
    return w13, w2


def routed(g: torch.Generator, num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> tuple:
    """T random bf16 tokens routed top-k (renormalised) over w13's experts, and fused_moe's
    reference on them in fp32: (hidden, weights, ids, ref)."""
    from moec.ops.moe_combine import moe_combine_ref
    from moec.ops.moe_experts import moe_experts_ref

    experts, _, hidden_size = w13.shape
    hidden = torch.randn(num_tokens, hidden_size, device="cuda", generator=g).bfloat16()
    weights, ids = torch.softmax(torch.randn(num_tokens, experts, device="cuda", generator=g), -1).topk(top_k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    ref = moe_combine_ref(moe_experts_ref(hidden.float(), w13.float(), w2.float(), ids, "silu"), weights)
    return hidden, weights, ids, ref


def export_tokens_dynamic(block: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """`block(hidden, w13, w2, weights, ids)` exported with the token count symbolic (1..4096)."""
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    return torch.export.export(block, args, dynamic_shapes=({0: tokens}, None, None, {0: tokens}, {0: tokens}),
                               strict=False)


def aoti_load(ep: torch.export.ExportedProgram, tmp: str, name: str, configs: dict | None = None):
    """`ep` compiled by AOTInductor as moec.compiler.lower compiles (its workarounds and Inductor
    configs, `configs` on top), loaded by the runtime's loader: what moec ships has to be what
    is checked. The loader shares the process's libstdc++ first; loaded without that, every package
    here (a two-op program too) crashed on the H100 machine under torch 2.11 (2026-12-07)."""
    from moec.compiler.lower import INDUCTOR_CONFIGS, aoti_workarounds
    from moec.runtime.compiled_step import load_package

    stage("AOTInductor compile")
    with aoti_workarounds():
        package = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/{name}.pt2",
                                                           inductor_configs={**INDUCTOR_CONFIGS, **(configs or {})})
    stage("load the package")
    return load_package(package)


def stage(what: str) -> None:
    """A child's progress (`in_child`): the last one printed says where it died."""
    print(f"{STAGE}{what}", flush=True)


STAGE, ROW = "STAGE ", "ROW "


def in_child(case: str) -> list[dict]:
    """The AOTInductor case `case` ("part:variant") run by a child process of this script: its
    rows, and where it crashed or hung, as an error row. AOTInductor compiled and loaded in this
    process ended in a segmentation fault under torch 2.11 (switch on the H200, 2026-12-03; many
    on the H100, 2026-12-07: a private libstdc++, see `aoti_load`), which took every later row with
    it and the JSON too; a child keeps any such crash to its own case."""
    import subprocess

    try:
        proc = subprocess.run([sys.executable, __file__, "--aoti-case", case], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # a hung child: its rows so far, and where it hung
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return child_rows(case, None, text(e.stdout), text(e.stderr))
    return child_rows(case, proc.returncode, proc.stdout, proc.stderr)


CHILD_TIMEOUT_S = 300  # one case compiles one artifact and runs it at a few token counts: about a minute


def child_rows(case: str, returncode: int | None, stdout: str, stderr: str) -> list[dict]:
    """A child's rows from its stdout, and an error row naming its last stage if it failed
    (`returncode` None: it was stopped after CHILD_TIMEOUT_S)."""
    import signal

    part, variant = case.split(":", 1)
    rows, last = [], "start"
    for line in stdout.splitlines():
        if line.startswith(ROW):
            rows.append(json.loads(line[len(ROW):]))
        elif line.startswith(STAGE):
            last = line[len(STAGE):]
    if returncode != 0:
        if returncode is None:
            how = f"stopped after {CHILD_TIMEOUT_S} s"
        elif returncode < 0:
            how = f"killed by {signal.Signals(-returncode).name}"
        else:
            how = f"exit status {returncode}"
        tail = " | ".join([line for line in stderr.strip().splitlines() if "DEBUG" not in line][-3:])
        rows.append({"op": f"{part} (aoti child)", "case": f"aoti, {variant}", "compiled": True,
                     "error": f"the child process was {how} during: {last}; stderr: {tail}"[:2000]})
    return rows


def paged_case(chunks, kv_heads=8, group=4, head_dim=128, block_size=16, seed=0) -> dict:
    """One step over `chunks` = [(start, num_tokens)], one per sequence, each owning shuffled
    physical blocks; the whole cache holds random values (bf16, on the GPU)."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-(start + n) // block_size) for start, n in chunks]
    num_blocks = sum(needed) + 3
    physical = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables, positions, seq_ids = [], [], []
    for row, ((start, n), k) in enumerate(zip(chunks, needed)):
        tables.append(physical[:k] + [0] * (max(needed) - k))
        physical = physical[k:]
        positions += range(start, start + n)
        seq_ids += [row] * n
    cache = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16().cuda()
    query = torch.randn(len(positions), kv_heads * group, head_dim, generator=g).bfloat16().cuda()
    index = lambda v: torch.tensor(v, dtype=torch.int64, device="cuda")  # noqa: E731
    return {"query": query, "kv_cache": cache, "layer": 1, "block_tables": index(tables),
            "seq_ids": index(seq_ids), "positions": index(positions), "scale": head_dim**-0.5}


def attention_rows(compiled: bool) -> list[dict]:
    from moec.ops.paged_attention import paged_attention_ref

    op = torch.ops.moec.paged_attention
    fn = torch.compile(lambda *a: op(*a), dynamic=True, fullgraph=True) if compiled else op
    rows = []
    cases = {
        "prefill 4": [(0, 4)],
        "prefill 11": [(0, 11)],
        "prefill 300": [(0, 300)],
        "decode 1x(ctx 2000)": [(1999, 1)],  # split-K: 16 programs per tile, then the merge
        "decode 8x(ctx 512)": [(511, 1)] * 8,
        "decode 128x(ctx 300..427)": [(300 + r, 1) for r in range(128)],  # no split, merge gated off
        "mixed": [(0, 37), (100, 1), (20, 5)],
    }
    for name, chunks in cases.items():
        case = paged_case(chunks)
        args = [case[k] for k in ("query", "kv_cache", "layer", "block_tables", "seq_ids", "positions", "scale")]
        got = fn(*args)
        ref = paged_attention_ref(case["query"].float(), case["kv_cache"].float(), *args[2:])
        rows.append({"op": "paged_attention", "case": name, "compiled": compiled, "rel_error": rel(got, ref)})
    return rows


def moe_rows(compiled: bool) -> list[dict]:
    from moec.ops.triton.configs import candidate_configs, config_name, encode_plan

    g = torch.Generator(device="cuda").manual_seed(0)
    w13, w2 = expert_weights(g, 8, 4096, 14336, 0.02)
    plans = {"default": "", "grouped_mm": encode_plan({"path": "grouped_mm"})}
    cands = candidate_configs()
    plans["two ranges"] = encode_plan({"path": "triton", "ranges": [(16, cands[0]), (None, cands[-1])]})
    if not compiled:
        plans.update({config_name(c): encode_plan({"path": "triton", "ranges": [(None, c)]}) for c in cands})
    op = torch.ops.moec.fused_moe
    fn = torch.compile(lambda *a: op(*a), dynamic=True, fullgraph=True) if compiled else op
    rows = []
    for T in (1, 4, 33, 300):
        hidden, weights, ids, ref = routed(g, T, w13, w2, 2)
        for name, plan in plans.items():
            got = fn(hidden, w13, w2, weights, ids, "silu", plan)
            rows.append({"op": "fused_moe", "case": f"T={T} {name}", "compiled": compiled, "rel_error": rel(got, ref)})
    return rows


def compile_error(e: Exception, limit: int = 4000) -> str:
    """The exception's first line and, for a C++ compile error (whose text opens with the whole
    g++ command), the compiler's own error lines with the line after each, where the cause is."""
    text = f"{type(e).__name__}: {e}"
    lines = text.splitlines()
    errors = [f"{line}\n{lines[i + 1] if i + 1 < len(lines) else ''}"
              for i, line in enumerate(lines) if "error:" in line]
    return "\n".join([lines[0], *errors[:12]])[:limit] if errors else text[:limit]


def switch_rows(compiled: bool) -> list[dict]:
    """The tuner's switch between a Triton plan and the grouped_mm path, on the GPU: a fused_moe
    call exported with T symbolic, made a torch.cond on T by the compiler's own pass
    (`branch_on_tokens`), compiled by AOTInductor, run below and above the switch point."""
    if not compiled:
        return []
    # With buffer reuse (as the compiler lowers) and without it, each compiled and checked in a
    # child of its own so one failing leaves the other's rows: torch 2.11 failed the first in the
    # reuse planner and the second on a missing `_grouped_mm` C shim (H200, 2026-12-03), both
    # worked around now
    return [row for label in SWITCH_VARIANTS for row in in_child(f"switch:{label}")]


SWITCH_VARIANTS = {"reuse": {}, "no buffer reuse": {"allow_buffer_reuse": False}}


def switch_aoti_rows(label: str) -> list[dict]:
    """`switch_rows`' program under one of SWITCH_VARIANTS' Inductor configs (in a child)."""
    import tempfile

    from moec.compiler.passes.moe_tuning import GROUPED_MM, branch_on_tokens
    from moec.ops.triton.configs import encode_plan

    g = torch.Generator(device="cuda").manual_seed(1)
    K, switch = 2, 64
    w13, w2 = expert_weights(g, 8, 1024, 1536, 0.03)

    class Block(torch.nn.Module):
        def forward(self, hidden, w13, w2, weights, ids):  # with a residual, as in a decoder layer
            return hidden + torch.ops.moec.fused_moe(hidden, w13, w2, weights, ids, "silu", "")

    hidden, weights, ids, _ = routed(g, 5, w13, w2, K)
    stage("export")
    ep = export_tokens_dynamic(Block(), (hidden, w13, w2, weights, ids))
    gm = ep.graph_module
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.moec.fused_moe.default)
    branch_on_tokens(gm, node, switch, "", encode_plan({"path": GROUPED_MM}))
    gm.graph.lint()
    gm.recompile()
    ep = ep._update(gm, ep.graph_signature)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = aoti_load(ep, tmp, "switch", SWITCH_VARIANTS[label])
            for T in (3, switch, switch + 1, 700):
                stage(f"T={T}")
                hidden, weights, ids, ref = routed(g, T, w13, w2, K)
                ref = ref + hidden.float()  # the block's residual
                side = "grouped_mm" if T > switch else "triton"
                rows.append({"op": "fused_moe switch", "case": f"T={T} {side} (aoti, {label})",
                             "compiled": True, "rel_error": rel(run(hidden, w13, w2, weights, ids), ref)})
    except Exception as e:  # noqa: BLE001  recorded as this variant's failure
        rows.append({"op": "fused_moe switch", "case": f"aoti, {label}", "compiled": True, "error": compile_error(e)})
    return rows


def many_plans() -> dict[str, str]:
    """The plans `many_experts_rows` checks: default, grouped_mm, and two ranges of tiles."""
    from moec.ops.triton.configs import candidate_configs, encode_plan

    cands = candidate_configs()
    return {"default": "", "grouped_mm": encode_plan({"path": "grouped_mm"}),
            "two ranges": encode_plan({"path": "triton", "ranges": [(512, cands[0]), (None, cands[-1])]})}


MANY_TOKENS = (1, 5, 16, 17, 300, 2048, 2049, 3000)


def many_weights() -> tuple:
    """(generator, w13, w2) of 128 experts, top-8's small H and I, drawn the same in every process."""
    g = torch.Generator(device="cuda").manual_seed(2)
    return (g, *expert_weights(g, 128, 512, 256, 0.05))


def many_experts_rows(compiled: bool) -> list[dict]:
    """fused_moe where experts pad to 128 or more (128 experts, top-8, small H and I), whose align
    picks its chunking by T (`align.chunkings`: chunks of 64 up to 16384 assignments, 2048 tokens
    here, 128 above): at token counts on either side of each gate (DIRECT up to 16 tokens, one
    chunk up to 8, the switch between chunkings at 2048/2049), with the default plan, a two-range
    plan and the grouped_mm path; eager, under torch.compile(dynamic=True), and exported with T
    symbolic and compiled by AOTInductor (one artifact runs every T, both chunkings in it), each
    plan's artifact in a child process (`in_child`)."""
    g, w13, w2 = many_weights()
    plans = many_plans()
    op = torch.ops.moec.fused_moe
    rows = []

    def add(row: dict) -> None:  # printed as it comes: the AOTInductor compiles take a while
        rows.append(row)
        print(f"  {row['case']}: {row.get('rel_error', row.get('error', ''))!s:.200}", flush=True)

    if compiled:  # AOTInductor first: one artifact per plan, every T through it
        for name in plans:
            for row in in_child(f"many:{name}"):
                add(row)
    fn = torch.compile(lambda *a: op(*a), dynamic=True, fullgraph=True) if compiled else op
    for T in MANY_TOKENS:
        hidden, weights, ids, ref = routed(g, T, w13, w2, 8)
        for name, plan in plans.items():
            add({"op": "fused_moe E=128", "case": f"T={T} {name}", "compiled": compiled,
                 "rel_error": rel(fn(hidden, w13, w2, weights, ids, "silu", plan), ref)})
    return rows


def many_aoti_rows(name: str) -> list[dict]:
    """`many_experts_rows`' AOTInductor artifact of plan `name`, every T through it (in a child)."""
    import tempfile

    plan = many_plans()[name]
    g, w13, w2 = many_weights()

    class Block(torch.nn.Module):
        def forward(self, hidden, w13, w2, weights, ids):
            return torch.ops.moec.fused_moe(hidden, w13, w2, weights, ids, "silu", plan)

    rows = []
    try:
        hidden, weights, ids, _ = routed(g, 7, w13, w2, 8)
        stage("export")
        ep = export_tokens_dynamic(Block(), (hidden, w13, w2, weights, ids))
        with tempfile.TemporaryDirectory() as tmp:
            run = aoti_load(ep, tmp, "many")
            for T in MANY_TOKENS:
                stage(f"T={T}")
                hidden, weights, ids, ref = routed(g, T, w13, w2, 8)
                rows.append({"op": "fused_moe E=128", "case": f"T={T} {name} (aoti)", "compiled": True,
                             "rel_error": rel(run(hidden, w13, w2, weights, ids), ref)})
    except Exception as e:  # noqa: BLE001  recorded as this plan's failure
        rows.append({"op": "fused_moe E=128", "case": f"aoti, {name}", "compiled": True, "error": compile_error(e)})
    return rows


AOTI_CASES = {"many": many_aoti_rows, "switch": switch_aoti_rows}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--parts", default="attention,moe,many,switch",
                        help="comma-separated, of: attention, moe, many (128 experts), switch (the default runs all)")
    parser.add_argument("--aoti-case", help="(internal) run one AOTInductor case, part:variant, and print its rows")
    args = parser.parse_args()
    if args.aoti_case:  # a child of in_child: its rows on stdout, one JSON line each
        import moec.ops  # noqa: F401  registers moec::*

        part, variant = args.aoti_case.split(":", 1)
        for row in AOTI_CASES[part](variant):
            print(ROW + json.dumps(row), flush=True)
        return 0
    known = {"attention": attention_rows, "moe": moe_rows, "many": many_experts_rows, "switch": switch_rows}
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(known))
    if unknown or not wanted:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    import triton

    import moec.ops  # noqa: F401  registers moec::*

    start = time.perf_counter()
    rows = []

    def write(complete: bool) -> dict:
        """The JSON as it stands: rewritten after every part, so a call stopped by its clock keeps
        the parts that finished (`complete` false until the last)."""
        bad = [r for r in rows if "error" in r or r["rel_error"] > TOLERANCE]
        result = {"benchmark": "gpu_op_check", "device": torch.cuda.get_device_name(),
                  "versions": {"torch": torch.__version__, "triton": triton.__version__},
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tolerance": TOLERANCE,
                  "parts": wanted, "complete": complete, "seconds": time.perf_counter() - start,
                  "rows": rows, "failed": len(bad)}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_op_check.json").write_text(json.dumps(result, indent=1))
        return result

    for compiled in (False, True):
        for part in (known[name] for name in wanted):
            try:
                rows += part(compiled)
            except Exception as e:  # noqa: BLE001  a failing part is a result: record it, go on
                rows.append({"op": part.__name__, "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:2000]})
            write(complete=False)
    result = write(complete=True)
    bad = [r for r in rows if "error" in r or r["rel_error"] > TOLERANCE]
    for r in rows:
        mark = "FAIL" if r in bad else "ok"
        print(f"{mark:4} {'inductor' if r['compiled'] else 'eager':8} {r['op']:16} {r.get('case', ''):28} "
              f"{r.get('rel_error', float('nan')):.2e} {r.get('error', '')[:300]}")
    print(f"{len(rows) - len(bad)}/{len(rows)} ok in {result['seconds']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
