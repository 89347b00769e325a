"""The Triton MoE kernels (moec/ops/triton) against the plain-PyTorch references, on CPU.

The kernels run under `TRITON_INTERPRET=1`, which must be set before a kernel is decorated, i.e.
before `moec.ops` is first imported — the rest of the suite imports it earlier in this process,
so `test_kernels_under_interpreter` re-runs this file in a subprocess with the variable set,
and the interpreter tests (`test_interp_*`) run there. The interpreter has no bf16 (its tl.dot
returns garbage): fp32 and fp16 here. Every buffer the kernels allocate (outputs and
intermediates) is poisoned — NaN, or a sentinel for integers — so an element a kernel should
have written and did not fails the comparison.

The other tests run in this process: `moec::fused_moe` on CPU (reference path), export keeping
it as one node, and the Triton path tracing with a symbolic token count (what AOTInductor needs
to compile it into the artifact without specialising T).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# tests/conftest.py collects `interpreted` tests only under TRITON_INTERPRET=1 (the subprocess
# below), and only them there; the others only in the parent process. Nothing is skipped.
interp_only = pytest.mark.interpreted


def outer_only(fn):
    return fn

INT_POISON = 2**30 + 7  # out of range as an index, but masked (not a wild pointer) where read as one

# small tiles: the interpreter runs one program at a time in numpy
CFG_A = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
CFG_B = {
    "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 4, "num_stages": 2,
    "down": {"BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 3},
}
# persistent: off CUDA a launch has 4 programs, so each loops over several tiles
CFG_P = dict(CFG_A, GROUP_M=3, PERSISTENT=True)


@contextlib.contextmanager
def poisoned_empty():
    """Make every `torch.empty` return NaN / INT_POISON instead of whatever memory held."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(INT_POISON)
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def routing(num_tokens: int, num_experts: int, top_k: int, case: str, seed: int = 0):
    """(topk_weights f32 [T, K], topk_ids i64 [T, K]) with distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if case == "empty":  # the first, a middle and the last expert receive nothing
        for e in {0, num_experts // 2, num_experts - 1}:
            scores[:, e] = -1.0
    elif case == "one":  # every token picks expert 3 (K=1: all tokens on one expert)
        scores[:, 3] = 2.0
    weights, ids = torch.topk(torch.softmax(scores, dim=-1), top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def moe_weights(num_experts: int, hidden: int, inter: int, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


def reference(x, w13, w2, weights, ids, activation="silu"):
    """The existing references composed (what fused_moe_ref is, without importing Triton)."""
    from moec.ops.moe_combine import moe_combine_ref
    from moec.ops.moe_experts import moe_experts_ref

    return moe_combine_ref(moe_experts_ref(x, w13, w2, ids, activation), weights)


def close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert not torch.isnan(got).any(), "unwritten (poisoned) elements in the output"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = want.abs().max().item() + 1e-6
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


# ---------------------------------------------------------------------------------------------
# In the parent process
# ---------------------------------------------------------------------------------------------


def run_interpreted(test_file: str) -> None:
    """Run `test_file`'s `interpreted` tests in a subprocess with TRITON_INTERPRET=1; fail with
    its output if any fails (tests/test_paged_attention.py uses this too)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-x"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-4000:]


@outer_only
def test_kernels_under_interpreter():
    run_interpreted(__file__)


@outer_only
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_moe_op_cpu_matches_reference(top_k):
    import moec.ops  # noqa: F401  (registers the ops)

    w13, w2 = moe_weights(5, 72, 40, torch.float32)
    x = torch.randn(9, 72)
    weights, ids = routing(9, 5, top_k, "empty")
    got = torch.ops.moec.fused_moe(x, w13, w2, weights, ids, "silu")
    torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), atol=0, rtol=0)


@outer_only
def test_fused_moe_op_exports_as_one_node():
    import moec.ops  # noqa: F401

    w13, w2 = moe_weights(5, 72, 40, torch.float32)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w13 = torch.nn.Parameter(w13, requires_grad=False)
            self.w2 = torch.nn.Parameter(w2, requires_grad=False)

        def forward(self, x, weights, ids):
            return torch.ops.moec.fused_moe(x, self.w13, self.w2, weights, ids, "silu")

    x = torch.randn(7, 72)
    weights, ids = routing(7, 5, 2, "random")
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    ep = torch.export.export(Block(), (x, weights, ids), dynamic_shapes=({0: tokens},) * 3, strict=False)
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.moec.fused_moe.default], calls
    x2 = torch.randn(11, 72)
    w_2, ids_2 = routing(11, 5, 2, "one")
    torch.testing.assert_close(ep.module()(x2, w_2, ids_2), reference(x2, w13, w2, w_2, ids_2))


@outer_only
@pytest.mark.parametrize("top_k", [1, 3])
def test_triton_path_traces_with_symbolic_tokens(top_k):
    """The CUDA body (launch code, not the kernels) under export with a dynamic token count:
    no guard may specialise T, and every launch is a wrap_triton node."""
    from moec.ops.triton.fused_moe import fused_moe

    w13, w2 = moe_weights(5, 72, 40, torch.float32)

    class Block(torch.nn.Module):
        def forward(self, x, weights, ids):
            return fused_moe(x, w13, w2, weights, ids, "silu")

    x = torch.randn(7, 72)
    weights, ids = routing(7, 5, top_k, "random")
    tokens = torch.export.Dim("tokens", min=1, max=32768)
    ep = torch.export.export(Block(), (x, weights, ids), dynamic_shapes=({0: tokens},) * 3, strict=False)
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (1, 32768)
    launches = [n for n in ep.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 7  # 3 align + 2 GEMMs, and the one-token GEMMs: no K-way sum, down accumulates


@outer_only
def test_grouped_mm_row_kernels_trace_with_symbolic_tokens():
    """The grouped_mm path's CUDA body under export with a dynamic token count: T keeps its
    range, the expert order is the align launches (no sort: the histograms once, then one
    scatter into the gate/up GEMM's blocks that also gives each row's place in the order), gate/up is the Triton GEMM writing rows
    in the sorted order (no gather of x, no activation pass), then CUTLASS's down GEMM and the
    combine launch."""
    from moec.ops.fused_moe import fused_moe_grouped_mm

    w13, w2 = moe_weights(5, 72, 40, torch.bfloat16)

    class Block(torch.nn.Module):
        def forward(self, x, weights, ids):
            return fused_moe_grouped_mm(x, w13, w2, weights, ids, "silu", row_kernels=True)

    weights, ids = routing(7, 5, 3, "random")
    tokens = torch.export.Dim("tokens", min=1, max=32768)
    ep = torch.export.export(Block(), (torch.randn(7, 72, dtype=torch.bfloat16), weights, ids),
                             dynamic_shapes=({0: tokens},) * 3, strict=False)
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (1, 32768)
    launches = [_kernel_name(n.kwargs) for n in ep.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert launches == ["_align_count_kernel", "_align_scan_kernel", "_align_scatter_kernel", "_gate_up_kernel",
                        "_combine_rows_kernel"]
    assert sum("_grouped_mm" in str(n.target) for n in ep.graph.nodes) == 1
    assert not any("sort" in str(n.target) for n in ep.graph.nodes)


# a config per token range: T <= 4, 4 < T <= 12, T > 12, each with its own BLOCK_M
PLAN_RANGES = [(4, CFG_A), (12, CFG_B), (None, dict(CFG_A, BLOCK_M=64, BLOCK_K=16))]


def _kernel_name(kwargs) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return kernel_side_table.get_kernel(kwargs["kernel_idx"]).fn.__name__


def _export_fused_moe(plan: dict, num_experts: int = 5):
    """fused_moe (hidden 72, inter 40, top-2) under a parsed plan, exported with a symbolic T."""
    from moec.ops.triton.fused_moe import fused_moe

    w13, w2 = moe_weights(num_experts, 72, 40, torch.float32)

    class Block(torch.nn.Module):
        def forward(self, x, weights, ids):
            return fused_moe(x, w13, w2, weights, ids, "silu", plan=plan)

    weights, ids = routing(7, num_experts, 2, "random")
    tokens = torch.export.Dim("tokens", min=1, max=32768)
    return torch.export.export(Block(), (torch.randn(7, 72), weights, ids), dynamic_shapes=({0: tokens},) * 3,
                               strict=False)


class _GridsOnly(torch.fx.Interpreter):
    """Runs a graph's size arithmetic and records each launch's (kernel, grid); launches nothing."""

    def call_function(self, target, args, kwargs):
        if "triton_kernel_wrapper" in str(target):
            self.grids.append((_kernel_name(kwargs), kwargs["grid"][0][0]))
            return None
        return super().call_function(target, args, kwargs)


def _launch_grids(gm, num_tokens: int, num_experts: int = 5) -> list[tuple[str, int]]:
    """Each launch's (kernel, grid) of an exported fused_moe (`_export_fused_moe`) at T tokens."""
    run = _GridsOnly(gm)
    run.grids = []
    w, i = routing(num_tokens, num_experts, 2, "random")
    run.run(torch.randn(num_tokens, 72), w, i)
    return run.grids


@outer_only
@pytest.mark.parametrize("num_experts", [8, 128, 256])
def test_router_launches_one_config_per_token_count(num_experts):
    """The router's token ranges chain from T = 1 up with no gap or overlap, so for any T exactly
    one launch config runs; the few-token one (decode) splits H over programs (Mixtral's 8
    experts: 16 of 256 columns each, then one program sums them; Qwen3's 128 likewise) or, for
    more experts than that was measured with, walks H in fewer, longer steps; above
    SPLIT_WIDE_FROM_T the split path's partials take 64 tokens a program; where experts pad
    to 128, row blocks of 64 tokens take over above WIDE_FROM_T."""
    from moec.ops.triton import router
    from moec.ops.triton.router import (SMALL_T, SPLIT_H, SPLIT_WIDE_BLOCK_T, SPLIT_WIDE_FROM_T, WIDE_BLOCK_T,
                                        WIDE_FROM_T, launch_configs)
    from moec.ops.triton.token_gate import token_range_gate

    configs = launch_configs(num_experts)
    assert configs[0][0] == 0 and configs[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(configs, configs[1:]))
    for t in range(1, 3 * SMALL_T):
        assert sum(token_range_gate(t, lo, hi) for lo, hi, *_ in configs) == 1, t
    split = num_experts <= 128
    few = [c for c in configs if c[4]] if split else configs[:1]  # the few-token launches
    assert [c[2] for c in few] == ([SMALL_T, SPLIT_WIDE_BLOCK_T] if split else [SMALL_T])
    assert [c[1] for c in few] == ([SPLIT_WIDE_FROM_T, router.SPLIT_MAX_T] if split else [SMALL_T])
    (_, _, small_t, small_h, _), ((_, wide_from, _, large_h, large_split), *wide) = few[0], configs[len(few):]
    assert small_t >= 16 and small_h >= large_h and not large_split  # tl.dot's M; never more steps
    assert wide_from == (WIDE_FROM_T if num_experts == 128 else None)
    assert [w[2] for w in wide] == ([WIDE_BLOCK_T] if num_experts == 128 else [])
    assert split == (num_experts <= 128)
    if num_experts <= 16:
        assert small_h == SPLIT_H and 4096 // small_h == 16  # Mixtral at decode: 16 programs over H

    # under export with a symbolic T: both launches in the graph, no guard on T, and evaluated for
    # a concrete T exactly one has a non-empty grid
    from moec.ops.triton.router import fused_router

    gate_weight = torch.randn(num_experts, 72)

    class Router(torch.nn.Module):
        def forward(self, x):
            return fused_router(x, gate_weight, 2, True, count=False)[:2]

    tokens = torch.export.Dim("tokens", min=1, max=32768)
    ep = torch.export.export(Router(), (torch.randn(7, 72),), dynamic_shapes=({0: tokens},), strict=False)
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (1, 32768)

    class GridsOnly(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if "triton_kernel_wrapper" in str(target):
                self.grids.append(kwargs["grid"][0][0])
                return None
            return super().call_function(target, args, kwargs)

    top = few[-1][1]  # the few-token launches' last T: SPLIT_MAX_T where H is split
    mid = SPLIT_WIDE_FROM_T
    for t in sorted({1, SMALL_T, SMALL_T + 1, mid, mid + 1, top, top + 1, 2000, WIDE_FROM_T, WIDE_FROM_T + 1}):
        run = GridsOnly(ep.module())
        run.grids = []
        run.run(torch.randn(t, 72))
        # the split path: partial sums, then the rest, over 16-token partials and then 64-token ones
        small_launches = [t <= mid] * 2 + [mid < t <= top] * 2 if split else [t <= top]
        rows = [top < t <= WIDE_FROM_T, t > WIDE_FROM_T] if wide else [t > top]
        assert [g > 0 for g in run.grids] == [*small_launches, *rows], (t, run.grids)


@outer_only
def test_plan_gates_each_range_by_token_count():
    """A per-range plan under export with a symbolic T: every range's kernels are in the graph,
    their grids are integer expressions of T (no guard: T keeps its whole range), and evaluated
    for a concrete T exactly the range holding T launches; the histograms, the scatter and the
    GEMMs for T > 1 (the histograms only above one chunk of assignments), the first range's
    direct GEMMs alone (no histograms, no scatter) up to `direct_tokens`."""
    from moec.ops.triton.align import chunkings
    from moec.ops.triton.configs import encode_plan, parse_plan, split_config
    from moec.ops.triton.fused_moe import direct_tokens

    plan = parse_plan(encode_plan({"path": "triton", "ranges": PLAN_RANGES}))
    ep = _export_fused_moe(plan)
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (1, 32768)
    names = [_kernel_name(n.kwargs) for n in ep.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    per_range = ["_align_scatter_kernel", "_gate_up_kernel", "_down_kernel"]
    assert names == ["_align_count_kernel", "_align_scan_kernel"] + per_range + ["_gate_up_kernel", "_down_kernel"] \
        + per_range * 2

    gm = ep.module()
    few = direct_tokens(5, 2)  # T*K <= E: 2 tokens
    assert few == 2
    for num_tokens, active in ((1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (12, 1), (13, 2), (128, 2), (129, 2),
                               (1000, 2), (32768, 2)):
        grids = _launch_grids(gm, num_tokens)
        many = num_tokens > few
        on = [g > 0 for _, g in grids]
        assert on[:2] == [num_tokens * 2 > chunkings(8)[0].chunk] * 2  # one chunk: the scatter counts it itself
        assert on[2:7] == [active == 0 and many] * 3 + [not many] * 2, (num_tokens, grids)
        assert on[7:] == [active == 1] * 3 + [active == 2] * 3, (num_tokens, grids)
        if not many:  # one row block per assignment (top-2) times the column blocks
            gate_up_cfg, down_cfg = split_config(PLAN_RANGES[0][1])
            assert [g for _, g in grids[5:7]] == [2 * num_tokens * -(-40 // gate_up_cfg["BLOCK_N"]),
                                                  2 * num_tokens * -(-72 // down_cfg["BLOCK_N"])]


@outer_only
def test_align_chunking_is_chosen_by_token_count(monkeypatch):
    """Where experts pad to 128 or more the align has two chunkings (64 assignments on 8 warps, then
    128 on 4 above `SMALL_CHUNK_ASSIGNMENTS`): under export with a symbolic T both are in the graph,
    gated by T with no guard, and for a concrete T exactly one chunking's launches run, their grids
    its chunk count (count and scan only above one chunk). 128 experts, top-2: DIRECT up to 16
    tokens (BLOCK_M), one chunk of 64 up to 32, chunks of 64 up to 256 (512 assignments here)."""
    from moec.ops.triton import align
    from moec.ops.triton.configs import encode_plan, parse_plan

    monkeypatch.setattr(align, "SMALL_CHUNK_ASSIGNMENTS", 512)
    cfg = dict(CFG_B, BLOCK_M=16)
    ep = _export_fused_moe(parse_plan(encode_plan({"path": "triton", "ranges": [(None, cfg)]})), num_experts=128)
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (1, 32768)
    gm = ep.module()
    hist = ["_align_count_kernel", "_align_scan_kernel"]
    for num_tokens in (1, 16, 17, 32, 33, 256, 257, 4000):
        grids = _launch_grids(gm, num_tokens, num_experts=128)
        assert [n for n, _ in grids] == hist * 2 + ["_align_scatter_kernel"] * 2 + ["_gate_up_kernel", "_down_kernel"] * 2
        g = [grid for _, grid in grids]
        small, large = 16 < num_tokens <= 256, num_tokens > 256
        chunks = -(-2 * num_tokens // (64 if small else 128))
        assert g[0:2] == ([chunks, 128 // align.SCAN_BLOCK_E] if small and num_tokens > 32 else [0, 0]), (num_tokens, g)
        assert g[2:4] == ([chunks, 128 // align.SCAN_BLOCK_E] if large else [0, 0]), (num_tokens, g)
        assert g[4:6] == [chunks if small else 0, chunks if large else 0], (num_tokens, g)
        assert (g[6] > 0, g[8] > 0) == (num_tokens > 16, num_tokens <= 16), (num_tokens, g)


@outer_only
@pytest.mark.parametrize("num_experts,first_hi", [(16, 8), (16, 3), (16, 1), (64, 3)])
def test_direct_runs_in_every_range_up_to_direct_tokens(num_experts, first_hi):
    """DIRECT (the two GEMMs alone, no histograms, no scatter) runs for T*K <= E in whichever
    range holds T, with that range's config, up to its BLOCK_M (a row block's rows are the
    tokens), and the aligned path above; evaluated for a concrete T, exactly one of them launches.
    16 experts, top-2: DIRECT up to 8 tokens; 64: up to 32, so up to BLOCK_M (16, 32) per range."""
    from moec.ops.triton.configs import encode_plan, parse_plan
    from moec.ops.triton.fused_moe import direct_tokens

    assert direct_tokens(16, 2) == 8 and direct_tokens(128, 8) == 16 and direct_tokens(8, 2) == 4
    assert direct_tokens(4, 8) == 1
    ranges = [(first_hi, CFG_A), (None, CFG_B)]
    plan = parse_plan(encode_plan({"path": "triton", "ranges": ranges}))
    gm = _export_fused_moe(plan, num_experts=num_experts).module()
    for num_tokens in range(1, 36):
        cfg = CFG_A if num_tokens <= first_hi else CFG_B
        grids = _launch_grids(gm, num_tokens, num_experts=num_experts)
        names = [n for n, g in grids if g > 0]
        if num_tokens <= min(num_experts // 2, cfg["BLOCK_M"]):
            assert names == ["_gate_up_kernel", "_down_kernel"], (num_tokens, grids)
            gate_up_grid = next(g for n, g in grids if g > 0)
            assert gate_up_grid == 2 * num_tokens * -(-40 // cfg["BLOCK_N"]), (num_tokens, grids)  # its config's
        else:
            assert names[-3:] == ["_align_scatter_kernel", "_gate_up_kernel", "_down_kernel"], (num_tokens, grids)


@outer_only
def test_persistent_grid_is_a_symbolic_min_of_tiles_and_sms():
    """A persistent config's grid under export with a symbolic T: min(tiles, SMs) — no guard on
    T — so a few tiles get a program each and many get one program per SM (4 off CUDA); its
    down GEMM, not persistent, one program per tile."""
    from moec.ops.triton.configs import encode_plan, parse_plan, split_config

    plan = parse_plan(encode_plan({"path": "triton", "ranges": [(None, dict(CFG_P, down={"PERSISTENT": False}))]}))
    gm = _export_fused_moe(plan).module()
    gate_up, down = split_config(plan["ranges"][0][1])
    for num_tokens in (3, 300):  # past direct_tokens(5, 2)
        launched = _launch_grids(gm, num_tokens)
        grids = dict((n, g) for n, g in launched if g > 0 and n in ("_gate_up_kernel", "_down_kernel"))
        em = 2 * num_tokens + min(2 * num_tokens, 5) * (gate_up["BLOCK_M"] - 1)
        tiles = -(-em // gate_up["BLOCK_M"]) * -(-40 // gate_up["BLOCK_N"])
        assert grids["_gate_up_kernel"] == min(tiles, 4), (num_tokens, launched)
        assert grids["_down_kernel"] == -(-em // down["BLOCK_M"]) * -(-72 // down["BLOCK_N"])


def test_resident_programs_by_shared_memory_and_registers():
    """Programs of a persistent launch per SM (sm_90: 228 KiB of shared memory): two of the
    64-row, 4-warp tile (96 KiB, 4 stages), one of the 128 x 256 gate/up tile (8 warps, 144 KiB);
    registers cap 4 warps at two whatever the memory, and nothing goes below one."""
    from moec.ops.triton.grouped_gemm import resident_programs

    sm90 = 233472
    m64 = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    assert resident_programs(m64, 128, 2, sm90) == 2  # gate/up: 2 * BLOCK_N columns
    assert resident_programs(dict(m64, num_stages=2), 128, 2, sm90) == 2  # 4 by memory, 2 by registers
    assert resident_programs(dict(m64, num_warps=8), 128, 2, sm90) == 1
    assert resident_programs(m64, 128, 4, sm90) == 1  # fp32: 192 KiB
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    assert resident_programs(big, 256, 2, sm90) == 1
    assert resident_programs(big, 256, 4, sm90) == 1  # over the SM's memory: still one


@interp_only
@pytest.mark.parametrize("case", ["random", "one"])
def test_interp_fused_moe_direct_above_one_token(case):
    """DIRECT at two tokens (16 experts, top-2): right whether the tokens share an expert (read
    twice) or not."""
    from moec.ops.triton.fused_moe import direct_tokens, fused_moe

    assert direct_tokens(16, 2) >= 2
    w13, w2 = moe_weights(16, 72, 40, torch.float32)
    x = torch.randn(2, 72, generator=torch.Generator().manual_seed(8))
    weights, ids = routing(2, 16, 2, case)
    with poisoned_empty():
        got = fused_moe(x, w13, w2, weights, ids, "silu", config=CFG_A)
    close(got, reference(x, w13, w2, weights, ids), torch.float32)


@outer_only
def test_inductor_sees_the_zeroing_and_the_accumulation(monkeypatch):
    """Inductor orders and allocates user kernels by the tensors their TTIR writes: gate/up must
    count as writing the output it zeroes, and down (atomics) as writing it too. The analysis
    needs a GPU target only to build TTIR: an sm_90 target stands in for the device."""
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import get_mutated_tensors
    from triton.backends.compiler import GPUTarget

    from moec.ops.triton.fused_moe import fused_moe

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    w13, w2 = moe_weights(5, 72, 40, torch.float32)

    class Block(torch.nn.Module):
        def forward(self, x, weights, ids):
            return fused_moe(x, w13, w2, weights, ids, "silu")

    weights, ids = routing(7, 5, 2, "random")
    tokens = torch.export.Dim("tokens", min=1, max=32768)
    ep = torch.export.export(Block(), (torch.randn(7, 72), weights, ids), dynamic_shapes=({0: tokens},) * 3,
                             strict=False)
    monkeypatch.setattr(triton.runtime.driver, "_active", Sm90())
    written = {}
    for n in ep.graph.nodes:
        if "triton_kernel_wrapper" in str(n.target):
            kwargs = {k: v.meta["val"] if isinstance(v, torch.fx.Node) else v for k, v in n.kwargs["kwargs"].items()}
            written.setdefault(_kernel_name(n.kwargs), set()).add(tuple(sorted(
                get_mutated_tensors(n.kwargs["kernel_idx"], n.kwargs["constant_args_idx"], kwargs, {}))))
    # every launch of a kernel (the one-token GEMMs too): read-only routing inputs stay read-only
    assert written["_gate_up_kernel"] == {("out_ptr", "zero_ptr")}
    assert written["_down_kernel"] == {("out_ptr",)}
    assert written["_align_scatter_kernel"] == {("expert_ids_ptr", "num_post_ptr", "sorted_ptr")}


@outer_only
def test_grouped_mm_path_matches_reference_and_traces_symbolically():
    """The torch._grouped_mm path (what the tuner times against Triton) on CPU, and under export
    with a dynamic token count: static shapes only, so T keeps its whole range."""
    from moec.ops.fused_moe import fused_moe_grouped_mm

    for dtype, top_k, case in ((torch.float32, 2, "empty"), (torch.float32, 1, "one"), (torch.bfloat16, 3, "random")):
        w13, w2 = moe_weights(5, 72, 40, dtype)
        x = torch.randn(9, 72).to(dtype)
        weights, ids = routing(9, 5, top_k, case)
        got = fused_moe_grouped_mm(x, w13, w2, weights, ids, "silu")
        torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), atol=0, rtol=0)

    # bf16: torch._grouped_mm's shape function accepts nothing else (the CPU kernel does)
    w13, w2 = moe_weights(5, 72, 40, torch.bfloat16)

    class Block(torch.nn.Module):
        def forward(self, x, weights, ids):
            return fused_moe_grouped_mm(x, w13, w2, weights, ids, "gelu")

    weights, ids = routing(7, 5, 2, "random")
    tokens = torch.export.Dim("tokens", min=1, max=32768)
    ep = torch.export.export(Block(), (torch.randn(7, 72, dtype=torch.bfloat16), weights, ids),
                             dynamic_shapes=({0: tokens},) * 3, strict=False)
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (1, 32768)
    x2 = torch.randn(1, 72, dtype=torch.bfloat16)
    w_2, ids_2 = routing(1, 5, 2, "one")
    torch.testing.assert_close(ep.module()(x2, w_2, ids_2), reference(x2, w13, w2, w_2, ids_2, "gelu"))


@outer_only
def test_grouped_mm_path_compiles_whole_for_any_token_count():
    """What the tuner times and the artifact runs: the grouped_mm path through Inductor with T
    symbolic, one graph (fullgraph: no break around the GEMMs), equal to the reference in bf16."""
    from moec.compiler.passes.moe_tuning import compiled_grouped_mm

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: an earlier test's graphs would count
    compiled = compiled_grouped_mm()
    w13, w2 = moe_weights(5, 72, 40, torch.bfloat16)
    for tokens, case in ((9, "random"), (33, "empty"), (1, "one")):
        x = torch.randn(tokens, 72).to(torch.bfloat16)
        weights, ids = routing(tokens, 5, 3, case)
        want = reference(x.float(), w13.float(), w2.float(), weights, ids)
        got = compiled(x, w13, w2, weights, ids, "silu")
        assert got.dtype == torch.bfloat16 and got.shape == (tokens, 72)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    # one graph for T = 1, one for every other T: the token count is symbolic ...
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    # ... and the weights' shapes are not: another expert count is another graph
    w13, w2 = moe_weights(6, 72, 40, torch.bfloat16)
    weights, ids = routing(9, 6, 3, "random")
    compiled(torch.randn(9, 72).to(torch.bfloat16), w13, w2, weights, ids, "silu")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@outer_only
def test_grouped_mm_path_keeps_weight_sizes_static_across_shapes():
    """A second MoE shape through the same function compiles with only its token count symbolic
    (Dynamo's automatic dynamic would make the hidden, expert and intermediate sizes symbolic,
    and Inductor's kernels for them several times slower)."""
    from moec.compiler.passes.moe_tuning import compiled_grouped_mm

    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([tuple(type(d).__name__ for d in v.shape) for v in values if isinstance(v, torch.Tensor)])
        return gm.forward

    compiled = compiled_grouped_mm(backend=record)
    for experts, hidden in ((5, 72), (6, 40)):
        w13, w2 = moe_weights(experts, hidden, 24, torch.bfloat16)
        for tokens in (1, 9, 17):
            weights, ids = routing(tokens, experts, 3, "random")
            compiled(torch.randn(tokens, hidden).to(torch.bfloat16), w13, w2, weights, ids, "silu")
    assert len(graphs) == 4  # T = 1 and T symbolic, per shape
    for g in graphs:
        sym = [dims for dims in g if "SymInt" in dims]
        # only the token dim of hidden, topk_weights and topk_ids (T = 1 graphs: none)
        assert all(dims[0] == "SymInt" and "SymInt" not in dims[1:] for dims in sym), g
        assert len(sym) in (0, 3), g


@outer_only
def test_op_plan_argument():
    """The op takes the plan as a string constant; on CPU it runs the reference whatever the
    plan says, and a malformed plan is an error, not a silent default."""
    import moec.ops  # noqa: F401
    from moec.ops.triton.configs import encode_plan

    w13, w2 = moe_weights(5, 72, 40, torch.float32)
    x = torch.randn(9, 72)
    weights, ids = routing(9, 5, 2, "random")
    want = reference(x, w13, w2, weights, ids)
    for plan in ("", encode_plan({"path": "grouped_mm"}), encode_plan({"path": "triton", "ranges": PLAN_RANGES})):
        torch.testing.assert_close(torch.ops.moec.fused_moe(x, w13, w2, weights, ids, "silu", plan), want,
                                   atol=0, rtol=0)
    with pytest.raises(ValueError, match="MoE plan"):
        torch.ops.moec.fused_moe(x, w13, w2, weights, ids, "silu", '{"path": "cublas"}')


H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def compile_for_sm90(
    kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, scalars: dict | None = None
):
    """Compile a kernel to cubin for H100 without a GPU (Triton ships ptxas), specialised as a
    launch on real shapes would be: pointers and N/K/row strides 16-divisible (H, I multiples
    of 16). Without that Triton cannot vectorise and pipeline the loads. Other scalars are i32
    unless `scalars` names their type (e.g. {"scale": "fp32"})."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif scalars and name in scalars:
            signature[name] = scalars[name]
        else:
            signature[name] = "i32"
            if name in ("N", "K") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


@outer_only
def test_kernels_compile_for_h100():
    """Every kernel, with every config the tuner may time (down variants included), compiles for sm_90 in bf16 and fits in
    its shared memory — what the interpreter cannot check; the down GEMM's atomic add is native
    (one `atom.global...add` per vector, no compare-and-swap loop) in bf16, fp16 and fp32."""
    from moec.ops.triton import align, grouped_gemm, moe_permute, router
    from moec.ops.triton.configs import DYNAMIC_CONFIG, candidate_configs, down_variants, split_config

    bf16, i32 = "*bf16", "*i32"
    idx = {"sorted_ptr": i32, "expert_ids_ptr": i32, "num_post_ptr": i32, "ids_ptr": "*i64"}
    seen = set()
    for cfg in [c for base in candidate_configs() for c in (base, *down_variants(base))]:
        gate_up, down = split_config(cfg)
        for kernel, c, ptrs, extra in (
            (
                grouped_gemm._gate_up_kernel,
                gate_up,
                {"x_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16, "zero_ptr": bf16, "rows_ptr": i32},
                {"ACT": 0, "ZERO_OUT": True, "BLOCK_Z": 32, "ZERO_STEPS": 2, "OUT_ROWS": False},
            ),
            (
                grouped_gemm._down_kernel,
                down,
                {"a_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16, "topk_weights_ptr": "*fp32"},
                {"MUL_WEIGHT": True, "ACCUMULATE": True},
            ),
        ):
            # the one-token (DIRECT) variants run the decode configs' tiles
            for direct in (False, True) if c["BLOCK_M"] == 16 else (False,):
                key = (kernel.fn.__name__, tuple(sorted(c.items())), direct)
                if key in seen:
                    continue
                seen.add(key)
                consts = {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")} | extra
                consts |= {"IEEE": False, "DIRECT": direct, "PERSISTENT": c["PERSISTENT"], "TOPK_PAD": 8}
                compiled = compile_for_sm90(kernel, ptrs | idx, consts, c["num_warps"], c["num_stages"])
                assert compiled.metadata.shared <= H100_SMEM, (key, compiled.metadata.shared)
                # pipelined: several stages of the A and B tiles are in shared memory at once
                halves = 2 if kernel is grouped_gemm._gate_up_kernel else 1
                stage = 2 * c["BLOCK_K"] * (c["BLOCK_M"] + halves * c["BLOCK_N"])
                assert compiled.metadata.shared >= 2 * stage, (key, compiled.metadata.shared, stage)
    _, down = split_config(DYNAMIC_CONFIG)
    for dtype, ptx_type in (("bf16", "bf16"), ("fp16", "f16"), ("fp32", "f32")):
        consts = {k: down[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        consts |= {"MUL_WEIGHT": True, "ACCUMULATE": True, "IEEE": dtype == "fp32", "DIRECT": False, "PERSISTENT": False,
                   "TOPK_PAD": 8}
        ptrs = {"a_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "topk_weights_ptr": "*fp32"}
        ptx = compile_for_sm90(grouped_gemm._down_kernel, ptrs | idx, consts, down["num_warps"], 3).asm["ptx"]
        ops = set(re.findall(r"\b(?:atom|red)\.global\.[\w.]+", ptx))
        # e.g. atom.global.gpu.relaxed.add.noftz.v8.bf16 (Triton 3.6), red.global... (later)
        assert ops and all(".add." in op and op.endswith(f".{ptx_type}") for op in ops), (dtype, ops)
    small = [
        (align._align_count_kernel, {"ids_ptr": "*i64", "counts_ptr": i32}, {"CHUNK": 256, "SUB": 16, "E_PAD": 256}),
        (
            align._align_scan_kernel,
            {"counts_ptr": i32, "offsets_ptr": i32, "totals_ptr": i32},
            {"E_PAD": 256, "BLOCK_E": 32, "BLOCK_P": 128},
        ),
        *(
            (
                align._align_scatter_kernel,
                {"ids_ptr": "*i64", "offsets_ptr": i32, "totals_ptr": i32, "position_ptr": i32, "ends_ptr": i32} | idx,
                {"CHUNK": 256, "SUB": 16, "E_PAD": 256, "BLOCK_M": block_m, "BLOCK_B": 16, "BLOCK_J": block_j,
                 "ORDER": order},
            )
            for block_m, block_j, order in ((128, 8, False), (128, 8, True))  # a GEMM block; with the grouped_mm order
        ),
        (  # MAX_EXPERTS experts, with counts
            router._router_kernel,
            {"hidden_ptr": bf16, "gate_ptr": bf16, "weights_ptr": "*fp32", "ids_ptr": "*i64", "counts_ptr": i32,
             "partial_ptr": "*fp32"},
            {"TOP_K": 8, "K_PAD": 8, "E_PAD": 256, "BLOCK_T": 16, "BLOCK_H": 64, "RENORMALIZE": True,
             "COUNT": True, "IEEE": False, "FROM_PARTIALS": False},
        ),
    ]
    # Mixtral's router (8 experts, padded to 16, top-2) and Qwen3's (128, top-8), each token range's
    # launch as moe_router runs them
    for num_experts, top_k in ((8, 2), (128, 8)):
        for _, _, block_t, block_h, split in router.launch_configs(num_experts):
            small.append((
                router._router_kernel,
                {"hidden_ptr": bf16, "gate_ptr": bf16, "weights_ptr": "*fp32", "ids_ptr": "*i64", "counts_ptr": i32,
                 "partial_ptr": "*fp32"},
                {"TOP_K": top_k, "K_PAD": top_k, "E_PAD": max(num_experts, 16), "BLOCK_T": block_t,
                 "BLOCK_H": block_h, "RENORMALIZE": True, "COUNT": False, "IEEE": False, "FROM_PARTIALS": split},
            ))
            if split:
                small.append((
                    router._router_partial_kernel,
                    {"hidden_ptr": bf16, "gate_ptr": bf16, "partial_ptr": "*fp32"},
                    {"E_PAD": max(num_experts, 16), "BLOCK_T": block_t, "BLOCK_H": block_h, "IEEE": False},
                ))
    # the grouped_mm path's row kernels (moe_permute), as its launchers launch them
    small += [
        (moe_permute._gather_rows_kernel, {"src_ptr": bf16, "index_ptr": "*i64", "out_ptr": bf16},
         {"BLOCK": moe_permute.BLOCK_COLS}),
        (moe_permute._gated_act_kernel, {"x_ptr": bf16, "out_ptr": bf16}, {"ACT": 0, "BLOCK": moe_permute.BLOCK_COLS}),
        (moe_permute._combine_rows_kernel, {"rows_ptr": bf16, "position_ptr": "*i64", "weights_ptr": "*fp32",
                                            "out_ptr": bf16}, {"BLOCK": moe_permute.BLOCK_COLS}),
    ]
    for kernel, ptrs, consts in small:
        compile_for_sm90(kernel, ptrs, consts, 4, 3)


@outer_only
def test_configs():
    from moec.ops.triton.configs import DEFAULT_CONFIGS, TOKEN_BUCKETS, default_config, split_config

    assert set(DEFAULT_CONFIGS) == set(TOKEN_BUCKETS)
    for t in (1, 3, 100, 5000, 40000):
        gate_up, down = split_config(default_config(t, 8, 2))
        assert gate_up["BLOCK_M"] == down["BLOCK_M"]
    assert default_config(1, 8, 2)["BLOCK_M"] <= default_config(16384, 8, 2)["BLOCK_M"]
    with pytest.raises(ValueError, match="power of two"):
        split_config(dict(CFG_A, BLOCK_N=24))
    with pytest.raises(ValueError, match="down may override"):
        split_config(dict(CFG_A, down={"BLOCK_M": 32}))
    with pytest.raises(ValueError, match="missing"):
        split_config({"BLOCK_M": 16})
    with pytest.raises(ValueError, match="BLOCK_M must be <= 256"):
        split_config(dict(CFG_A, BLOCK_M=512))


@outer_only
def test_plans_round_trip_and_validate():
    from moec.ops.triton.configs import candidate_configs, config_name, encode_plan, parse_plan, split_config

    assert parse_plan("") is None
    plan = {"path": "triton", "ranges": PLAN_RANGES}
    assert parse_plan(encode_plan(plan)) == {"path": "triton", "ranges": [(b, c) for b, c in PLAN_RANGES]}
    assert parse_plan(encode_plan({"path": "grouped_mm"})) == {"path": "grouped_mm"}
    names = [config_name(c) for c in candidate_configs()]
    assert len(names) == len(set(names)) and names[0] == "M16N64K128G1w4s4"
    assert config_name(CFG_B) == "M32N32K16G1w4s2|dN16K64G3"
    assert config_name(dict(CFG_B, PERSISTENT=True, down={"PERSISTENT": False})) == "M32N32K16G1w4s2P|dP0"
    with pytest.raises(ValueError, match="PERSISTENT"):
        split_config(dict(CFG_A, PERSISTENT=1))
    bad = [
        "not json",
        '{"path": "triton"}',
        '{"path": "triton", "ranges": [[16, %s]]}' % json.dumps(CFG_A),  # the last range must be open
        '{"path": "triton", "ranges": [[16, %s], [8, %s], [null, %s]]}' % ((json.dumps(CFG_A),) * 3),
        '{"path": "triton", "ranges": [[null, {"BLOCK_M": 16}]]}',
        '{"path": "grouped_mm", "ranges": []}',
    ]
    for text in bad:
        with pytest.raises(ValueError, match="MoE (plan|config)"):
            parse_plan(text)


# ---------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (subprocess)
# ---------------------------------------------------------------------------------------------


@interp_only
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,renorm,dtype",
    [
        (1, 5, 2, True, torch.float32),
        (3, 60, 4, True, torch.float16),  # 64 padded experts at T <= 16: one program walks H (no split)
        (37, 5, 3, False, torch.float32),
        (10, 8, 8, True, torch.float32),  # k == E
        (33, 60, 4, True, torch.float16),
        (19, 256, 8, True, torch.float32),
    ],
)
def test_interp_router(num_tokens, num_experts, top_k, renorm, dtype):
    from moec.ops.moe_router import moe_router_ref
    from moec.ops.triton.router import fused_router

    g = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, 24, generator=g).to(dtype)
    gate = torch.randn(num_experts, 24, generator=g).to(dtype)
    want_w, want_i = moe_router_ref(hidden.float(), gate.float(), top_k, renorm)
    with poisoned_empty():
        got_w, got_i, counts = fused_router(hidden, gate, top_k, renorm)
    assert got_i.dtype == torch.int64 and got_w.dtype == torch.float32
    if dtype == torch.float32:
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
    else:  # fp16 logits: near-ties may swap; compare the chosen set's weights by expert
        want_w, want_i = moe_router_ref(hidden, gate, top_k, renorm)
        agree = (got_i == want_i).float().mean().item()
        assert agree > 0.97, agree
        torch.testing.assert_close(got_w.sort(-1).values, want_w.sort(-1).values, atol=2e-3, rtol=2e-3)
    assert torch.equal(counts.long(), torch.bincount(got_i.flatten(), minlength=num_experts))
    with poisoned_empty():  # as moe_router runs it: no counts
        w2, i2, none = fused_router(hidden, gate, top_k, renorm, count=False)
    assert none is None and torch.equal(i2, got_i) and torch.equal(w2, got_w)


@interp_only
@pytest.mark.parametrize("split_max_t,row_block,split_wide", [(16, None, None), (64, None, None),
                                                              (16, (64, 32, 8), None), (128, None, 20)])
@pytest.mark.parametrize("num_tokens,hidden_size", [(1, 4096), (16, 600), (17, 600), (45, 200), (70, 40)])
def test_interp_router_long_hidden(num_tokens, hidden_size, split_max_t, row_block, split_wide, monkeypatch):
    """Hidden sizes past one BLOCK_H step (and not a multiple of it), several row blocks, either
    side of the split launch (T <= 16, and up to 64: several row blocks of partials; up to 128
    with 64-token partials from 21 tokens, one partial block over several 16-token sums), row
    blocks of the built-in size and of 64 tokens (8 warps, 32 columns a step): the fused logits
    equal F.linear's rounded to the input dtype, so the routing is the reference's."""
    from moec.ops.moe_router import moe_router_ref
    from moec.ops.triton import router
    from moec.ops.triton.router import fused_router

    monkeypatch.setattr(router, "SPLIT_MAX_T", split_max_t)
    monkeypatch.setattr(router, "SPLIT_WIDE_FROM_T", split_wide)
    if row_block:
        for name, value in zip(("ROW_BLOCK_T", "ROW_BLOCK_H", "ROW_WARPS"), row_block):
            monkeypatch.setattr(router, name, value)

    g = torch.Generator().manual_seed(hidden_size)
    hidden = torch.randn(num_tokens, hidden_size, generator=g).to(torch.float16)
    gate = (torch.randn(8, hidden_size, generator=g) / hidden_size**0.5).to(torch.float16)
    want_w, want_i = moe_router_ref(hidden, gate, 2, True)
    with poisoned_empty():
        got_w, got_i, _ = fused_router(hidden, gate, 2, True, count=False)
    assert (got_i == want_i).float().mean().item() > 0.97
    torch.testing.assert_close(got_w.sort(-1).values, want_w.sort(-1).values, atol=2e-3, rtol=2e-3)


@interp_only
@pytest.mark.parametrize("num_tokens", [1, 5, 40, 100])
def test_interp_router_split_over_many_experts(num_tokens, monkeypatch):
    """The split path for Qwen3's 128 experts (built in since step_kernels-h200-2026-12-03T2135):
    8 experts of 128 chosen as the reference chooses, one and several row blocks of partials;
    past the split path (here from 17 tokens) 16-token row blocks, and past WIDE_FROM_T (here
    from 65) the wide ones, 64 tokens a program with a partial last block."""
    from moec.ops.moe_router import moe_router_ref
    from moec.ops.triton import router

    monkeypatch.setattr(router, "SPLIT_MAX_T", 16)
    monkeypatch.setattr(router, "WIDE_FROM_T", 64)
    assert router.launch_configs(128)[0][4]  # the few-token launch is the split one
    assert [c[:3] for c in router.launch_configs(128)[1:]] == [(16, 64, 16), (64, None, router.WIDE_BLOCK_T)]
    g = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, 600, generator=g).to(torch.float16)
    gate = (torch.randn(128, 600, generator=g) / 600**0.5).to(torch.float16)
    want_w, want_i = moe_router_ref(hidden, gate, 8, True)
    with poisoned_empty():
        got_w, got_i, _ = router.fused_router(hidden, gate, 8, True, count=False)
    assert (got_i.sort(-1).values == want_i.sort(-1).values).float().mean().item() > 0.97
    torch.testing.assert_close(got_w.sort(-1).values, want_w.sort(-1).values, atol=2e-3, rtol=2e-3)


def check_align(ids: torch.Tensor, num_experts: int, block_m: int, sorted_ids, expert_ids, num_post):
    flat = ids.flatten().tolist()
    num_assign = len(flat)
    n = int(num_post.item())
    assert sorted_ids.numel() >= n and sorted_ids.numel() == num_assign + min(num_assign, num_experts) * (block_m - 1)
    pos = 0
    for e in range(num_experts):
        mine = [a for a in range(num_assign) if flat[a] == e]
        padded = -(-len(mine) // block_m) * block_m
        want = mine + [num_assign] * (padded - len(mine))  # assignment order, then sentinels
        assert sorted_ids[pos : pos + padded].tolist() == want, f"expert {e}"
        assert expert_ids[pos // block_m : (pos + padded) // block_m].tolist() == [e] * (padded // block_m)
        pos += padded
    assert n == pos


@interp_only
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,case,block_m",
    [
        (1, 5, 2, "random", 16),  # T = 1
        (37, 5, 3, "random", 16),
        (40, 5, 2, "empty", 16),  # experts 0, 2 and 4 get nothing
        (50, 5, 1, "one", 16),  # all tokens on expert 3
        (300, 7, 3, "random", 32),  # 900 assignments: several chunks
        (100, 256, 8, "random", 16),  # wide one-hot, several chunks
        (45, 128, 3, "random", 16),  # three chunks of 64, the last one partial
        (15, 128, 3, "random", 16),  # one chunk, partial
        (200, 128, 8, "random", 64),  # 25 chunks, the scan in 16 programs of 8 experts
        (20, 5, 2, "random", 64),
    ],
)
def test_interp_align(num_tokens, num_experts, top_k, case, block_m):
    from moec.ops.triton.align import moe_align_block_size

    _, ids = routing(num_tokens, num_experts, top_k, case)
    for id_dtype in (torch.int64, torch.int32):
        with poisoned_empty():
            out = moe_align_block_size(ids.to(id_dtype), num_experts, block_m)
        check_align(ids, num_experts, block_m, *out)


@interp_only
@pytest.mark.parametrize("num_tokens,top_k,case", [(45, 3, "random"), (15, 3, "random"), (200, 8, "random"),
                                                   (90, 3, "one")])
def test_interp_align_large_chunks(monkeypatch, num_tokens, top_k, case):
    """Where experts pad to 128 or more, above `SMALL_CHUNK_ASSIGNMENTS` the align runs chunks of
    128 on 4 warps (sub-steps of 32, one after another): two chunks the second ending inside its
    first sub-step (45 x 3), one chunk ending inside its second (15 x 3), 13 chunks (200 x 8),
    every assignment on one expert over three chunks; set to 0 here so these T take it."""
    from moec.ops.triton import align

    monkeypatch.setattr(align, "SMALL_CHUNK_ASSIGNMENTS", 0)
    _, ids = routing(num_tokens, 128, top_k, case)
    with poisoned_empty():
        hist = align.expert_histograms(ids, 128)
        out = align.align_scatter(hist, 16)
    assert [(p.chunk, p.warps, p.sub) for p in hist.passes] == [(128, 4, 32)]
    check_align(ids, 128, 16, *out)


@interp_only
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m,case", [
    (1, 5, 1, 16, "random"), (1, 16, 8, 32, "random"), (3, 5, 2, 16, "random"),
    (6, 8, 3, 16, "random"),  # tokens share experts: each expert computed once, for all its tokens
    (16, 6, 2, 16, "one"),  # every token on expert 3, T = BLOCK_M
    (5, 4, 1, 16, "one"),  # K = 1: rows stored, not added
])
def test_interp_direct_gemms(num_tokens, num_experts, top_k, block_m, case):
    """DIRECT: a row block per assignment, its expert read from topk_ids, each expert's rows (one
    per token that chose it) computed by the block of its first assignment; int64 and int32 ids;
    the output poisoned: gate/up zeroes it, down adds into it. More tokens than BLOCK_M: refused."""
    from moec.ops.triton.fused_moe import fused_moe_ref
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped

    dtype = torch.float32
    w13, w2 = moe_weights(num_experts, 72, 40, dtype)
    x = torch.randn(num_tokens, 72, generator=torch.Generator().manual_seed(num_tokens))
    weights, ids = routing(num_tokens, num_experts, top_k, case, seed=top_k)
    cfg = dict(CFG_A, BLOCK_M=block_m)
    want = fused_moe_ref(x, w13, w2, weights, ids, "silu")
    for id_dtype in (torch.int64, torch.int32):
        out = torch.full((num_tokens, 72), float("nan"))
        with poisoned_empty():
            inter = gate_up_grouped(x, w13, None, None, None, top_k, cfg, zero_out=out if top_k > 1 else None,
                                    direct_ids=ids.to(id_dtype))
            down_grouped(inter, w2, weights, None, None, None, cfg, out=out, direct_ids=ids.to(id_dtype))
        close(out, want, dtype)
    with pytest.raises(ValueError, match="align buffers"):
        gate_up_grouped(x, w13, None, None, None, top_k, cfg)
    more = torch.randn(block_m + 1, 72)
    many_w, many_ids = routing(block_m + 1, num_experts, top_k, "random")
    with pytest.raises(ValueError, match=f"at most BLOCK_M = {block_m} tokens"):
        gate_up_grouped(more, w13, None, None, None, top_k, cfg, direct_ids=many_ids)
    with pytest.raises(ValueError, match=f"at most BLOCK_M = {block_m} tokens"):
        down_grouped(torch.randn((block_m + 1) * top_k, 40), w2, many_w, None, None, None, cfg, direct_ids=many_ids)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_fused_moe_one_token_many_experts(dtype):
    """T = 1 with top-8 of 16 experts (a Qwen3-like router) through the direct path."""
    from moec.ops.triton.fused_moe import fused_moe, fused_moe_ref

    w13, w2 = moe_weights(16, 72, 40, dtype)
    x = torch.randn(1, 72, generator=torch.Generator().manual_seed(5)).to(dtype)
    weights, ids = routing(1, 16, 8, "random", seed=5)
    with poisoned_empty():
        got = fused_moe(x, w13, w2, weights, ids, "silu", config=CFG_B)
    close(got, fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, "silu"), dtype)


def ref_rows(x, w13, w2, weights, ids, activation="silu"):
    """fp32 per-assignment reference: (act(gate)*up [T*K, I], weighted down rows [T*K, H])."""
    from moec.ops.moe_experts import ACTIVATIONS

    top_k = ids.shape[1]
    flat = ids.flatten()
    xs = x.float().repeat_interleave(top_k, dim=0)
    gu = torch.einsum("ah,anh->an", xs, w13.float()[flat])
    gate, up = gu.chunk(2, dim=-1)
    inter = ACTIVATIONS[activation](gate) * up
    down = torch.einsum("ai,ahi->ah", inter, w2.float()[flat]) * weights.flatten()[:, None]
    return inter, down


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,top_k,case,cols", [(1, 2, "random", 72), (23, 3, "empty", 1100), (17, 1, "one", 40)])
def test_interp_row_moves(dtype, num_tokens, top_k, case, cols):
    """The grouped_mm path's row kernels against their aten forms: the gather into expert order
    (exact), the gated activation, and the weighted gather back to token order; a column count
    past one program's block (1100 > 1024) exercises the masked tail."""
    from moec.ops.moe_combine import moe_combine_ref
    from moec.ops.moe_experts import ACTIVATIONS
    from moec.ops.triton.moe_permute import combine_rows, gated_act, gather_rows

    g = torch.Generator().manual_seed(3)
    _, ids = routing(num_tokens, 6, top_k, case)
    order = torch.sort(ids.reshape(-1), stable=True)[1]
    position = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel()))
    src = torch.randn(num_tokens, cols, generator=g).to(dtype)
    with poisoned_empty():
        got = gather_rows(src, order, top_k)
    assert torch.equal(got, src[order // top_k])
    x = torch.randn(num_tokens * top_k, 2 * cols, generator=g).to(dtype)
    for activation, fn in ACTIVATIONS.items():
        with poisoned_empty():
            got = gated_act(x, activation)
        close(got, (fn(x[:, :cols].float()) * x[:, cols:].float()).to(dtype), dtype)
    weights = torch.rand(num_tokens, top_k, generator=g)
    rows = torch.randn(num_tokens * top_k, cols, generator=g).to(dtype)
    with poisoned_empty():
        got = combine_rows(rows, position, weights)
    close(got, moe_combine_ref(rows[position].view(num_tokens, top_k, cols), weights), dtype)


@interp_only
@pytest.mark.parametrize("num_tokens,num_experts,top_k,case",
                         [(1, 5, 2, "random"), (23, 5, 3, "empty"), (300, 5, 1, "one"), (200, 128, 8, "random"),
                          (9, 1024, 2, "random")])
def test_interp_align_order_is_the_stable_sort(num_tokens, num_experts, top_k, case):
    """align_scatter(order=True) (the grouped_mm path's ordering, no sort, from the gate/up's own
    scatter): each expert's end row and each assignment's row in the stable sort's order, over
    chunk boundaries (300 assignments on one expert, 1600 over 128) and with experts that receive
    nothing; the padded blocks are the ones the launch without the order writes."""
    from moec.ops.triton.align import align_scatter, expert_histograms

    _, ids = routing(num_tokens, num_experts, top_k, case)
    flat = ids.reshape(-1)
    sorted_experts, want = torch.sort(flat, stable=True)
    for block_m in (1, 16):
        with poisoned_empty():
            hist = expert_histograms(ids, num_experts)
            sorted_ids, expert_ids, num_post, ends, position = align_scatter(hist, block_m, order=True)
            plain = align_scatter(expert_histograms(ids, num_experts), block_m)
        assert ends.dtype == position.dtype == torch.int32
        assert torch.equal(ends.long(), torch.searchsorted(sorted_experts, torch.arange(num_experts), right=True))
        assert torch.equal(position.long().sort().values, torch.arange(flat.numel()))  # a permutation
        order = torch.empty_like(want).index_copy_(0, position.long(), torch.arange(flat.numel()))
        assert torch.equal(order, want)
        used = int(num_post)
        assert used == int(plain[2]) and torch.equal(sorted_ids[:used], plain[0][:used])
        assert torch.equal(expert_ids[: used // block_m], plain[1][: used // block_m])


@interp_only
@pytest.mark.parametrize("num_tokens,top_k,case", [(1, 2, "random"), (23, 3, "empty"), (17, 1, "one")])
def test_interp_grouped_mm_path_with_row_kernels(num_tokens, top_k, case):
    """The whole grouped_mm path with the row kernels (what runs on CUDA) against the reference."""
    from moec.ops.fused_moe import fused_moe_grouped_mm

    w13, w2 = moe_weights(5, 72, 40, torch.float32)
    x = torch.randn(num_tokens, 72, generator=torch.Generator().manual_seed(4))
    weights, ids = routing(num_tokens, 5, top_k, case)
    with poisoned_empty():
        got = fused_moe_grouped_mm(x, w13, w2, weights, ids, "silu", row_kernels=True)
    close(got, reference(x, w13, w2, weights, ids), torch.float32)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_tokens,top_k,case,cfg",
    [(1, 2, "random", CFG_A), (23, 3, "empty", CFG_B), (17, 1, "one", CFG_A), (40, 4, "random", CFG_B),
     (23, 3, "empty", CFG_P), (40, 1, "random", CFG_P)],
)
def test_interp_grouped_gemms(dtype, num_tokens, top_k, case, cfg):
    """Each GEMM on its own against the per-assignment reference: gate/up (zeroing the output
    on the way when K > 1), then down accumulating every token's K rows into that output."""
    from moec.ops.triton.align import moe_align_block_size
    from moec.ops.triton.configs import split_config
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped

    num_experts, hidden, inter = 5, 72, 40
    w13, w2 = moe_weights(num_experts, hidden, inter, dtype)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
    weights, ids = routing(num_tokens, num_experts, top_k, case)
    want_inter, want_down = ref_rows(x, w13, w2, weights, ids)
    want_out = want_down.view(num_tokens, top_k, hidden).sum(1)
    gate_up_cfg, down_cfg = split_config(cfg)
    with poisoned_empty():
        align = moe_align_block_size(ids, num_experts, gate_up_cfg["BLOCK_M"])
        out = torch.empty(num_tokens, hidden, dtype=dtype)  # NaN: an element nobody zeroes fails
        got_inter = gate_up_grouped(x, w13, *align, top_k, gate_up_cfg, zero_out=out if top_k > 1 else None)
    close(got_inter, want_inter, dtype)
    if top_k > 1:
        assert torch.equal(out, torch.zeros_like(out)), "gate/up must zero every element of the output"
    # down from the reference intermediate, so its error is its own
    with poisoned_empty():
        got_out = down_grouped(want_inter.to(dtype), w2, weights, *align, down_cfg, out=out)
    assert got_out is out
    close(got_out, want_out, dtype)
    with poisoned_empty():  # without `out`, down allocates (and for K > 1 zeroes) its own
        close(down_grouped(want_inter.to(dtype), w2, weights, *align, down_cfg), want_out, dtype)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_tokens,top_k,case,cfg,activation",
    [
        (1, 2, "random", CFG_A, "silu"),  # T = 1
        (29, 3, "random", CFG_B, "silu"),
        (31, 2, "empty", CFG_A, "silu"),  # experts 0, 2, 4 get nothing
        (24, 1, "one", CFG_B, "silu"),  # all tokens on one expert; K = 1 writes out directly
        (20, 2, "one", None, "silu"),  # default config table
        (9, 2, "random", CFG_A, "gelu"),
        (9, 3, "random", CFG_B, "gelu_tanh"),
        (33, 2, "random", CFG_P, "silu"),  # persistent, T = 1 (DIRECT, one program a tile) beside
        (1, 3, "random", CFG_P, "silu"),
        (19, 2, "random", dict(CFG_B, PERSISTENT=True, down={"PERSISTENT": False}), "silu"),
    ],
)
def test_interp_fused_moe(dtype, num_tokens, top_k, case, cfg, activation):
    from moec.ops.triton.fused_moe import fused_moe, fused_moe_ref

    num_experts, hidden, inter = 5, 72, 40
    w13, w2 = moe_weights(num_experts, hidden, inter, dtype)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(3)).to(dtype)
    weights, ids = routing(num_tokens, num_experts, top_k, case)
    with poisoned_empty():
        got = fused_moe(x, w13, w2, weights, ids, activation, config=cfg)
    assert got.shape == (num_tokens, hidden) and got.dtype == dtype
    want = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, activation)
    close(got, want, dtype)
    if dtype == torch.float32:  # and the references composed in the op's own dtype
        torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids, activation), atol=1e-5, rtol=1e-4)


@interp_only
@pytest.mark.parametrize("num_tokens", [1, 4, 5, 12, 13, 30])
def test_interp_fused_moe_plan(num_tokens):
    """A per-range plan run for a T in each range and at each boundary: the range's own config
    (its BLOCK_M, its zeroing) computes the right answer."""
    from moec.ops.triton.configs import encode_plan, parse_plan
    from moec.ops.triton.fused_moe import fused_moe, fused_moe_ref

    plan = parse_plan(encode_plan({"path": "triton", "ranges": PLAN_RANGES}))
    w13, w2 = moe_weights(5, 72, 40, torch.float16)
    x = torch.randn(num_tokens, 72, generator=torch.Generator().manual_seed(num_tokens)).to(torch.float16)
    weights, ids = routing(num_tokens, 5, 3, "random", seed=num_tokens)
    with poisoned_empty():
        got = fused_moe(x, w13, w2, weights, ids, "silu", plan=plan)
    close(got, fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, "silu"), torch.float16)


@interp_only
@pytest.mark.parametrize("num_tokens", [2, 3, 8, 9])
def test_interp_fused_moe_plan_direct_in_a_later_range(num_tokens):
    """16 experts, top-2, a plan whose first range ends at 2 tokens: 3 to 8 tokens run DIRECT
    with the second range's config (BLOCK_M 32, its own down tile), 9 the aligned path."""
    from moec.ops.triton.configs import encode_plan, parse_plan
    from moec.ops.triton.fused_moe import direct_tokens, fused_moe, fused_moe_ref

    assert direct_tokens(16, 2) == 8
    plan = parse_plan(encode_plan({"path": "triton", "ranges": [(2, CFG_A), (None, CFG_B)]}))
    w13, w2 = moe_weights(16, 72, 40, torch.float32)
    x = torch.randn(num_tokens, 72, generator=torch.Generator().manual_seed(num_tokens))
    weights, ids = routing(num_tokens, 16, 2, "random", seed=num_tokens)
    with poisoned_empty():
        got = fused_moe(x, w13, w2, weights, ids, "silu", plan=plan)
    close(got, fused_moe_ref(x, w13, w2, weights, ids, "silu"), torch.float32)


@interp_only
def test_interp_fused_moe_noncontiguous_hidden():
    """A strided hidden (a column slice of a wider buffer) goes through the strides."""
    from moec.ops.triton.fused_moe import fused_moe, fused_moe_ref

    w13, w2 = moe_weights(5, 72, 40, torch.float32)
    wide = torch.randn(6, 100)
    x = wide[:, 10:82]
    weights, ids = routing(6, 5, 2, "random")
    with poisoned_empty():
        got = fused_moe(x, w13, w2, weights, ids, "silu", config=CFG_A)
    close(got, fused_moe_ref(x.contiguous(), w13, w2, weights, ids, "silu"), torch.float32)


@outer_only
def test_gelu_tanh_formula():
    """The epilogue builds gelu_tanh from a sigmoid: x*sigmoid(2z) == 0.5*x*(1 + tanh(z))."""
    x = torch.linspace(-6, 6, 97)
    assert torch.allclose(x * torch.sigmoid(2 * 0.7978845608028654 * (x + 0.044715 * x**3)),
                          F.gelu(x, approximate="tanh"), atol=1e-6)


def _step_kernels_run_once(monkeypatch):
    """benchmarks/step_kernels.py with its CUDA-graph timer standing in for itself (the call runs
    once, 1 ms) and fp32 for bf16 (the interpreter has none)."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import step_kernels

    def once(fn, device, flush=None, **_):
        out = fn()
        return {"median_ms": 1.0}, (out, types.SimpleNamespace(replay=fn))

    monkeypatch.setattr(step_kernels, "DTYPE", torch.float32)
    monkeypatch.setattr(step_kernels, "time_graph", once)
    return step_kernels


@interp_only
def test_interp_step_kernels_direct_part_checks_both_paths(monkeypatch):
    """`benchmarks/step_kernels.py --parts direct` (the aligned experts, one program per tile and
    persistent, against the DIRECT GEMMs at few tokens, under two configs) on a toy shape: every
    path runs and matches the reference, the bound counts the experts hit. The CUDA-graph timers stand in for themselves here: the kernels run once."""
    step_kernels = _step_kernels_run_once(monkeypatch)
    monkeypatch.setattr(step_kernels, "time_interleaved",
                        lambda fns, device, flush=None, rounds=30: {n: {"median_ms": 2.0} for n in fns})
    rows = step_kernels.run_direct(torch.device("cpu"), {"copy_gb_s": 1000.0}, None,
                                   shapes={"toy": (72, 40, 16, 4)}, token_counts=(1, 3, 8))
    assert [r["tokens"] for r in rows] == [1, 3, 8]
    for r in rows:
        assert 4 <= r["experts_hit"] <= min(16, 4 * r["tokens"])
        assert r["bound_us"] == pytest.approx(r["experts_hit"] * 3 * 72 * 40 * 2 / 1e12 * 1e6)
        assert set(r["paths"]) == {f"{p}{label}" for label in ("", " M16N16") for p in (
            "aligned persistent", "aligned persistent x2", "direct")} | {"aligned (built in)", "aligned M16N16"}
        assert all(p["ok"] and p["us_interleaved"] == 2000.0 for p in r["paths"].values()), r


@interp_only
def test_interp_step_kernels_align_and_router_wide_parts(monkeypatch):
    """`step_kernels.py --parts align,router_wide` on toy shapes: every align variant (assignments
    a program, warps) writes what the built-in one does, with and without the grouped_mm order,
    over one chunk and several; every wide-partials router picks the reference's experts."""
    step_kernels = _step_kernels_run_once(monkeypatch)
    monkeypatch.setattr(step_kernels, "ALIGN_SHAPES", {"toy": (16, 4)})
    monkeypatch.setattr(step_kernels, "ALIGN_TOKENS", (3, 40, 130))
    monkeypatch.setattr(step_kernels, "ALIGN_ORDER_FROM", 100)
    rows = step_kernels.run_align(torch.device("cpu"), {"copy_gb_s": 1000.0}, None)
    assert [(r["tokens"], r["order"]) for r in rows] == [(3, False), (40, False), (130, True)]
    for r in rows:
        assert len(r["variants"]) == 1 + len(step_kernels.ALIGN_VARIANTS)
        assert all(v.get("same_as_built_in") for v in r["variants"].values()), r

    monkeypatch.setattr(step_kernels, "ROUTER_SHAPES", {"toy": (16, 64, 4)})
    monkeypatch.setattr(step_kernels, "ROUTER_WIDE_TOKENS", (70, 130))
    monkeypatch.setattr(step_kernels, "ROUTER_WIDE", ((64, 64), (64, 32), (100, 128)))
    rows = step_kernels.run_router_wide(torch.device("cpu"), {"copy_gb_s": 1000.0}, None)
    assert [r["tokens"] for r in rows] == [70, 130]
    for r in rows:
        assert len(r["variants"]) == 4 and all(v.get("same_experts") == 1.0 for v in r["variants"].values()), r


@outer_only
def test_step_kernels_module_values_restore_and_router_variants_name_real_values():
    """step_kernels' module_values sets a module's attributes for a block and restores them after,
    also when the block raises; every router variant names module values the router has (patching
    one it lacks would raise, and the variant would be recorded as failed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import step_kernels

    from moec.ops.triton import router

    built_in = (router.SPLIT_H, router.WIDE_FROM_T)
    with step_kernels.module_values(router, SPLIT_H=128, WIDE_FROM_T=None):
        assert (router.SPLIT_H, router.WIDE_FROM_T) == (128, None)
    with pytest.raises(RuntimeError), step_kernels.module_values(router, SPLIT_H=512):
        raise RuntimeError
    with step_kernels.module_values(router):  # no values: nothing set
        pass
    assert (router.SPLIT_H, router.WIDE_FROM_T) == built_in
    for experts in (8, 128, 256):
        for values in step_kernels.router_variants(router, experts).values():
            assert all(hasattr(router, name) for name in values), values


@interp_only
def test_interp_step_kernels_gemv_part_checks_each_tile(monkeypatch):
    """`benchmarks/step_kernels.py --parts gemv` on a toy shape: each DIRECT GEMM tile checked
    against fp32 (a wrong tile would say so), and its rate from the hit experts' bytes."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import step_kernels

    monkeypatch.setattr(step_kernels, "DTYPE", torch.float32)
    monkeypatch.setattr(step_kernels, "capture_graph", lambda fn, device: (types.SimpleNamespace(replay=fn), fn()))
    monkeypatch.setattr(step_kernels, "time_interleaved",
                        lambda fns, device, flush=None, rounds=30: {n: {"median_ms": 2e-3} for n in fns})
    rows = step_kernels.run_gemv(torch.device("cpu"), {"copy_gb_s": 1000.0}, None, shapes={"toy": (72, 40, 6, 2)},
                                 token_counts={"toy": (1, 3)}, gate_up_tiles=[(16, 32, 4, 2), (32, 64, 4, 2)],
                                 down_tiles=[(16, 32, 4, 2), (32, 16, 4, 2)])
    assert [r["tokens"] for r in rows] == [1, 3]
    for r in rows:
        assert set(r["kernels"]) == {"gate_up N16 K32 w4 s2", "gate_up N32 K64 w4 s2", "down N16 K32 w4 s2",
                                     "down N32 K16 w4 s2"}
        for name, k in r["kernels"].items():
            assert k["ok"] and k["rel_error"] < 1e-4, (name, k)
            per_expert = 2 * 40 * 72 * 4 if name.startswith("gate_up") else 72 * 40 * 4
            assert k["bytes"] == r["experts_hit"] * per_expert and k["gb_s"] == pytest.approx(k["bytes"] / 2e3)


@interp_only
def test_interp_step_kernels_gemm_part_checks_each_kernel(monkeypatch):
    """`benchmarks/step_kernels.py --parts gemm` on a toy shape: gate/up one program per tile and
    persistent, and down, each checked against fp32; the peers timed beside them, unchecked."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import step_kernels

    monkeypatch.setattr(step_kernels, "DTYPE", torch.float32)
    monkeypatch.setattr(step_kernels, "capture_graph", lambda fn, device: (types.SimpleNamespace(replay=fn), fn()))
    monkeypatch.setattr(step_kernels, "time_interleaved",
                        lambda fns, device, flush=None, rounds=30: {n: {"median_ms": 2.0} for n in fns})
    configs = [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
               {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2,
                "PERSISTENT": True}]
    down = [{"BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},  # on the first tile's rows
            {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2,
             "PERSISTENT": True}]  # its own rows, aligned for it
    rows = step_kernels.run_gemm(torch.device("cpu"), {}, None, shapes={"toy": (72, 40, 6, 2)},
                                 token_counts={"toy": (9,)}, configs=configs, down_settings=down, one_per_sm=True)
    (row,) = rows
    assert row["assignments"] == 18 and 18 <= row["padded_rows"][16] <= 18 + 6 * 15
    assert 18 <= row["padded_rows"][32] <= 18 + 6 * 31
    kernels = row["kernels"]
    for key in ("gate_up M16N16K32G2w4s2", "gate_up M16N16K32G2w4s2P", "down M16N32K16G2w4s2",
                "down M16N32K16G2w4s2 rows-stored", "down M32N32K16G2w4s2P", "gate_up M16N16K32G2w4s2P 1/SM",
                "down M32N32K16G2w4s2P 1/SM"):
        assert kernels[key]["ok"] and kernels[key]["rel_error"] < 1e-4, (key, kernels)
    flops_up = 2.0 * 18 * 72 * 80
    assert kernels["gate_up bmm (even rows)"]["tflop_s"] == pytest.approx(flops_up / 2e-3 / 1e12)
    assert "down grouped_mm (CUTLASS)" in kernels and kernels["down grouped_mm (CUTLASS)"]["rel_error"] is None