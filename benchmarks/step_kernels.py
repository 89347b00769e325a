"""The step's small kernels on one GPU, each against its bound: what to tune for issue 5.

    python benchmarks/step_kernels.py --out $OUT          # GPU, ~3 min

Measured in one run (ceilings first: copy bandwidth and bf16 matmul rate), Mixtral's attention
shape (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token cache blocks) and router shapes
(hidden 4096, 8 experts, top-2; Qwen3's hidden 2048, 128 experts, top-8), every call captured
in a CUDA graph and its replays timed (median of CUDA events, L2 flushed before each: measure.py), fresh random inputs per case:

  prefill    moec paged attention for one sequence's prompt of T = 1024..8192 tokens from
             position 0, under candidate tile configs (the built-in ones first), against torch's
             SDPA on contiguous Q/K/V (flash attention, K/V expanded to 32 heads) and the causal
             bound 4 H D T(T+1)/2 / matmul rate; each output checked against SDPA's
  decode     B = 1..128 sequences of 512 cached tokens, one query token each: the decode config
             (what a step of known size picks) and the dynamic one (what the compiled step runs),
             against the bound of reading the K/V once at copy bandwidth
  splits     the same decode steps with the split count (NUM_SPLITS: 8, 16 built in, 32) and the
             merge kernel's heads per program (COMBINE_HEADS: 1, 2 built in, 8) varied
  kv_write   the step's K/V write into the cache at T = 1..4096 tokens: the Triton kernel (built
             in) against the torch path it replaced (K and V stacked and one index_copy_ up to
             256 tokens, one index_copy_ a plane above), against the bytes read and written over
             copy bandwidth; both leave the same cache
  dense      the step's dense projections at decode (Mixtral's fused Q/K/V [6144, 4096], O
             [4096, 4096], lm_head [32000, 4096]) at T = 1, 4, 16 tokens: F.linear as the compiled
             step runs it (cuBLAS) against a prototype Triton matrix-vector kernel defined here
             under a few tile configs, against the weight bytes over copy bandwidth: whether a
             small-T dense path in the compiler would pay (the H200 profile: Q/K/V and O at
             75% and 66% of copy bandwidth at batch 1)
  router     the fused router as the step runs it (no counts) at T = 1..16384, for Mixtral's 8
             experts and Qwen3's 128: the few-token path with H split over programs of 128, 256
             (built in) or 512 columns, and unsplit (one program walking H in steps of 512), by
             setting router.SPLIT_H; the split path run up to 16, 256 or 4096 tokens
             (router.SPLIT_MAX_T); the split path's second launch (sum, softmax, top-k) on 1 or
             2 or 8 warps (router.FINAL_WARPS); for more experts than the built-in router splits
             (router.SPLIT_MAX_E_PAD: Qwen3's 128 since step_kernels-h200-2026-12-03T2135), unsplit
             and the split path let in; the row-block launch (above the split path) with more
             tokens a program (router.ROW_BLOCK_T/_H, ROW_WARPS), alone and from 64 tokens, and
             without the wide row blocks above 4096 tokens (router.WIDE_FROM_T); against
             hidden + gate bytes over copy bandwidth

  gemv       the DIRECT GEMMs alone at one token (and two on Qwen3's shape) under tiles around the
             tuner's picks, each checked against fp32 and timed round by round, in GB/s of the
             hit experts' weights and over copy bandwidth: what the one-token layer is made of
  direct     the routed experts at 1..64 tokens (Mixtral's and Qwen3's expert shapes): fused_moe
             as it runs above one token (one align launch up to 256 assignments, then the two
             GEMMs), the same with persistent GEMMs (programs for live tiles only; at the
             resident_programs grid and at twice it), against the DIRECT GEMMs alone up to
             BLOCK_M tokens (a row block per assignment, its expert read from topk_ids: no align
             launch; each expert read once since e77f2cf, twice when two tokens chose it before),
             under the default table's config and the
             tuner's one-token pick on Qwen3, all replayed and timed round by round, all checked
             against the reference; against the bytes of the experts hit over copy bandwidth
  gemm       the two grouped GEMMs alone (after align) at 1024..16384 tokens (Mixtral's and Qwen3's
             expert shapes), in TFLOP/s of the routed work: gate/up under the tuner's large tiles,
             one program per tile and persistent; down under a few tiles; against CUTLASS's
             grouped GEMM (torch._grouped_mm) on the same routed rows and cuBLAS bmm on the same
             rows spread evenly; each Triton output checked against fp32
  tma        prototype gate/up and down GEMMs on TMA descriptors (tma_grouped_gemm.py), without
             and with Triton's warp specialisation, against moec's, CUTLASS and cuBLAS bmm at the ridge and
             above (Mixtral at 1024 and 4096 tokens, Qwen3 at 4096 and 16384), each checked against fp32,
             each config first alone in a child process; then the layer's routed experts whole on the
             fastest correct pair against moec's fused_moe and grouped_mm path, over the roofline
  tma_aoti   that layer as one triton_op in a module exported with T dynamic, compiled by
             AOTInductor and loaded (without and with warp specialisation, each in a child
             process): whether an artifact could ship the TMA kernels; its output at 1, 37 and
             4096 tokens against the same kernels launched from Python
  middle     the same at 64 and 256 rows per expert (Mixtral at 256 tokens, Qwen3 at 1024 and
             4096): 64- and 128-row tiles one program per tile and persistent, each persistent
             4-warp tile also at one program an SM ("1/SM") against resident_programs' grid, each
             down setting at its own BLOCK_M

Writes OUT/step_kernels.json and OUT/step_kernels.png (prefill TFLOP/s per config against the
bound), then prints a table per part. GPU only: exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from measure import (  # noqa: E402
    L2Flusher, capture_graph, copy_bandwidth, environment, matmul_rate, time_graph, time_interleaved, write_json)

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
ROUTER_SHAPES = {"mixtral": (8, 4096, 2), "qwen3": (128, 2048, 8)}  # experts, hidden, top-k
PREFILL_TOKENS = (1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 8, 32, 128)
DECODE_CONTEXT = 512
ROUTER_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
ROUTER_SPLIT_H = (None, 128, 256, 512)
ROUTER_SPLIT_MAX_T = (16, 256, 4096)  # the split path's token limit (router.SPLIT_MAX_T), at SPLIT_H built in
ROUTER_FINAL_WARPS = (1, 2, 4, 8)  # warps of the split path's second launch (router.FINAL_WARPS)
# every row-block launch's tokens x H columns a program and its warps (router.ROW_BLOCK_T/_H,
# ROW_WARPS; no wide range), each also with the split path stopped at 64 tokens (the row blocks
# from there); and the built-in row blocks without their wide range (router.WIDE_FROM_T None)
ROUTER_ROW_BLOCKS = ((32, 64, 4), (64, 64, 4), (64, 64, 8), (64, 128, 8), (128, 64, 8))
# the split path's partial launch with more tokens a program above some T (router.SPLIT_WIDE_FROM_T,
# SPLIT_WIDE_BLOCK_T): (from, tokens a program), at these token counts
ROUTER_WIDE = ((64, 64), (64, 32), (256, 64), (256, 128))
ROUTER_WIDE_TOKENS = (64, 128, 256, 512, 1024)
# the align's count, scan and scatter: assignments a program (align.CHUNK, one chunking at every T),
# warps (align.ALIGN_WARPS) and the scan's experts a program (align.SCAN_BLOCK_E), against the
# built-in chunkings by T (`align.chunkings`)
ALIGN_SHAPES = {"mixtral": (8, 2), "qwen3": (128, 8)}  # experts, top-k
ALIGN_TOKENS = (32, 64, 256, 1024, 2048, 4096, 16384)
# (chunk, warps, scan experts)
ALIGN_VARIANTS = ((128, 4, 8), (64, 8, 8), (256, 4, 8), (64, 4, 8), (128, 8, 8))
ALIGN_ORDER_FROM = 4096  # from here the scatter also writes the grouped_mm path's order, on 128-row blocks
SPLIT_COUNTS = (8, 16, 32)
COMBINE_HEADS = (1, 2, 8)
KV_WRITE_TOKENS = (1, 8, 32, 128, 4096)
DENSE_SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "lm_head": (32000, 4096)}  # [N, K] weights
DENSE_TOKENS = (1, 4, 16)
PARTS = ("router", "router_wide", "align", "decode", "splits", "kv_write", "dense", "prefill", "direct", "gemm", "middle",
         "gemv", "tma", "tma_aoti")
DIRECT_SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}  # hidden, inter, experts, top-k
DIRECT_TOKENS = (1, 2, 4, 8, 16, 32, 64)
# the tuner's pick at one token on Qwen3's shape (moe_layer-h100-2026-12-06T0936), beside the
# default table's config; each also aligned with persistent GEMMs: only live tiles get programs
# (one launch per tile dispatches the worst case's programs, most of which return at once), at
# the resident_programs grid (255 registers a thread assumed) and at twice it (128 assumed).
# H100 (step_kernels-h100-2026-12-06T1052): persistent within -2% to +6% of one a tile, no gain
DIRECT_DECODE_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
                        "down": {"BLOCK_N": 32, "BLOCK_K": 128, "num_stages": 5}}
GEMM_TOKENS = {"mixtral": (1024, 4096), "qwen3": (1024, 4096, 16384)}
# gate/up tiles the tuner picked at these token counts (moe_layer-h100-2026-12-06T0604/T0609), as
# one launch per tile and persistent, and a 64-row one (gate/up as two dots, timed here until
# 2026-12-06T0804, was 2-13% slower than one and is gone)
_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}
GEMM_CONFIGS = [
    {**_TILE, "GROUP_M": 8, "num_stages": 4},
    {**_TILE, "GROUP_M": 8, "num_stages": 4, "PERSISTENT": True},
    {**_TILE, "GROUP_M": 16, "num_stages": 3},
    {**_TILE, "GROUP_M": 16, "num_stages": 3, "PERSISTENT": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
]
# down tiles (over configs[0]'s BLOCK_M, one program per tile): the default table's (GROUP_M 16,
# 4 stages: 196 KB of shared memory and ~200 registers a thread, so one program per SM, whose
# atomic epilogue nothing overlaps) first, then tiles two of which fit on an SM (<= 113 KB of
# shared memory, <= 128 registers at 8 warps): the 128x256 tile's per-tile cost was what its
# atomic adds cost (15% at Qwen3's shape, K = 8: step_kernels-h100-2026-12-06T0920) and more.
# Persistent downs spilled registers and were 2.4-3.6x slower (step_kernels-h100-2026-12-06T0804);
# A rows read in sorted_ids' slots (contiguous per row block) instead of gathered by assignment
# were 0-11% slower (T0920)
GEMM_DOWN = [{"BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 4},
             {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 3},
             {"BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 16, "num_warps": 8, "num_stages": 4},
             {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 4, "num_stages": 3},
             {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 4, "num_stages": 4},
             {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 4, "num_stages": 3}]
# "middle": where the layer streams its weights with tens of rows per expert (64 at Mixtral's 256
# tokens and Qwen3's 1024: 1.06x and 1.33x the roofline in moe_layer-h100-2026-12-06T0941/T0936,
# against 1.05x and 1.3x targets), and Qwen3's 4096 (256 rows): the tuner's picks there one
# program per tile and persistent, with as many programs as the SMs hold (two of a 64-row,
# 4-warp tile); each down setting at its own BLOCK_M. H100 (…T1046, …T1056): at 64 rows the
# GEMMs at cuBLAS bmm's time on even rows; at 256 the 128-row tiles' padding (1.23x the rows)
MIDDLE_TOKENS = {"mixtral": (256,), "qwen3": (1024, 4096)}
_M64 = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
MIDDLE_CONFIGS = [
    _M64, {**_M64, "PERSISTENT": True},
    {**_M64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {**_M64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "PERSISTENT": True},
    {**_M64, "BLOCK_N": 32, "PERSISTENT": True},
    {**_TILE, "GROUP_M": 16, "num_stages": 3, "PERSISTENT": True},
    {**_TILE, "GROUP_M": 8, "num_stages": 4, "PERSISTENT": True},
]
MIDDLE_DOWN = [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
               {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
                "PERSISTENT": True},
               {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
                "PERSISTENT": True},
               {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
                "PERSISTENT": True},
               {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 16, "num_warps": 8, "num_stages": 3},
               {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 4},
               {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 3}]
# "gemv": the DIRECT GEMMs at one token, each alone, under tiles around the tuner's picks (Qwen3:
# gate/up M16N16K128 w4 s4, down N32 K128 w4 s5; moe_layer-h100-2026-12-06T0936), in bytes of
# the experts hit over the time against copy bandwidth: at one token they are the layer
GEMV_TOKENS = {"mixtral": (1,), "qwen3": (1, 2)}
GEMV_GATE_UP = [(16, 128, 4, 4), (16, 64, 4, 6), (16, 256, 4, 3), (16, 512, 4, 2), (16, 128, 2, 4), (16, 128, 1, 4),
                (16, 128, 8, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4)]  # BLOCK_N, BLOCK_K, warps, stages
GEMV_DOWN = [(32, 128, 4, 5), (16, 128, 4, 4), (16, 256, 4, 3), (16, 64, 4, 6), (16, 128, 2, 4), (32, 128, 2, 4),
             (32, 64, 4, 6), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 4)]
STACKED_UP_TO = 256  # the torch path's switch from one stacked index_copy_ to one a plane
# "tma": the prototype grouped GEMMs on TMA descriptors (benchmarks/tma_grouped_gemm.py), without
# and with Triton's warp specialisation (of the K loop one tile a program, of the tile loop
# persistent), against moec's GEMMs, CUTLASS and cuBLAS bmm, where
# the layer misses its targets at the ridge and above (issue 3)
TMA_TOKENS = {"mixtral": (1024, 4096), "qwen3": (4096, 16384)}
_TMA = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
# Triton 3.6's Hopper warp specialisation applies at num_warps=4 (then 12 warps: a producer and two
# 64-row consumer warpgroups); without it, 8 warps as moec's own large tiles
TMA_CONFIGS = [
    {**_TMA, "num_warps": 8, "num_stages": 3}, {**_TMA, "num_warps": 8, "num_stages": 3, "PERSISTENT": True},
    {**_TMA, "num_warps": 4, "num_stages": 3, "WS": True}, {**_TMA, "num_warps": 4, "num_stages": 4, "WS": True},
    {**_TMA, "num_warps": 4, "num_stages": 3, "PERSISTENT": True, "WS": True},
    {**_TMA, "num_warps": 4, "num_stages": 4, "PERSISTENT": True, "WS": True},
    {**_TMA, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "WS": True},
    {**_TMA, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "PERSISTENT": True, "WS": True},
]
TMA_DOWN_CONFIGS = [
    {**_TMA, "num_warps": 8, "num_stages": 4},
    {**_TMA, "num_warps": 4, "num_stages": 4, "WS": True}, {**_TMA, "num_warps": 4, "num_stages": 4, "PERSISTENT": True, "WS": True},
    {**_TMA, "BLOCK_N": 256, "num_warps": 4, "num_stages": 3, "WS": True},
    {**_TMA, "BLOCK_N": 256, "num_warps": 4, "num_stages": 3, "PERSISTENT": True, "WS": True},
]
# the first four again, storing their tile's rows unweighted through TMA (the combine weights and
# sums them): the gate/up's epilogue, where the scatter's rows hit Triton 3.6's split bug
TMA_DOWN_CONFIGS += [{**c, "ROW_STORE": True} for c in TMA_DOWN_CONFIGS[:4]]


def tma_check(op: str, cfg: dict) -> tuple[bool, str]:
    """How a prototype's output is checked: (whether its rows are by block row, to be picked by
    `assignment_rows`, else by assignment) and the key of its `expert_references` value."""
    if op == "gate_up":
        return True, "gate_up"
    return (True, "unweighted") if cfg.get("ROW_STORE") else (False, "rows")


def prefill_candidates() -> dict[str, dict]:
    from moec.ops.triton import paged_attention as pa

    cands = {"dynamic (built-in)": pa.DYNAMIC_CONFIG, "prefill (built-in)": pa.PREFILL_CONFIG}
    for rows, block_n, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (128, 64, 4, 3),
                                         (64, 128, 4, 2), (64, 64, 4, 3), (256, 64, 8, 2)):
        cands[f"R{rows} N{block_n} w{warps} s{stages}"] = {"ROWS": rows, "BLOCK_N": block_n, "num_warps": warps,
                                                           "num_stages": stages}
    return cands


def paged_inputs(lengths: list[int], query_tokens: list[int], gen: torch.Generator, dev) -> dict:
    """Sequences of `lengths` cached tokens (shuffled physical blocks); each sequence's last
    `query_tokens` positions are this step's queries, in chunk order."""
    need = [-(-n // BLOCK_SIZE) for n in lengths]
    num_blocks = sum(need) + 1
    physical = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(need)
    tables, positions, seq_ids = [], [], []
    for row, (n, q, k) in enumerate(zip(lengths, query_tokens, need)):
        tables.append(physical[:k] + [0] * (width - k))
        physical = physical[k:]
        positions += range(n - q, n)
        seq_ids += [row] * q
    cache = torch.randn(1, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen).to(dev, DTYPE)
    query = torch.randn(len(positions), HEADS, HEAD_DIM, generator=gen).to(dev, DTYPE)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
    return {"query": query, "cache": cache, "tables": as_t(tables), "seq_ids": as_t(seq_ids),
            "positions": as_t(positions)}


def attention_call(inp: dict, cfg: dict):
    from moec.ops.paged_tiles import sequence_tiles, step_tile_tokens
    from moec.ops.triton.paged_attention import paged_attention

    tiles = sequence_tiles(inp["seq_ids"], inp["tables"].shape[0], *step_tile_tokens(HEADS, KV_HEADS, HEAD_DIM))
    return lambda: paged_attention(inp["query"], inp["cache"], 0, inp["tables"], inp["seq_ids"], inp["positions"],
                                   HEAD_DIM ** -0.5, None, config=cfg, seq_info=tiles)


def gathered_kv(inp: dict, seq: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence `seq`'s first `length` keys and values, contiguous [Hkv, length, D]."""
    blocks = inp["tables"][seq, : -(-length // BLOCK_SIZE)]
    k, v = (inp["cache"][0, i][blocks].flatten(0, 1)[:length].transpose(0, 1) for i in (0, 1))
    return k.contiguous(), v.contiguous()


def run_prefill(dev, ceil: dict, flush, deadline: float) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    for tokens in PREFILL_TOKENS:
        inp = paged_inputs([tokens], [tokens], gen, dev)
        k, v = gathered_kv(inp, 0, tokens)
        q = inp["query"].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        group = HEADS // KV_HEADS
        k, v = (x.repeat_interleave(group, 0).unsqueeze(0) for x in (k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            t_sdpa, _ = time_graph(sdpa, dev, flush=flush)
            want = sdpa()[0].transpose(0, 1)
        flops = 4.0 * HEADS * HEAD_DIM * tokens * (tokens + 1) / 2
        bound_ms = flops / (ceil["matmul_tflop_s"] * 1e12) * 1e3
        row = {"tokens": tokens, "bound_ms": bound_ms, "sdpa_flash_ms": t_sdpa["median_ms"], "configs": {}}
        for name, cfg in prefill_candidates().items():
            if time.perf_counter() > deadline:
                row.setdefault("skipped", []).append(name)
                continue
            try:
                call = attention_call(inp, cfg)
                t, (out, _) = time_graph(call, dev, flush=flush)
                err = (out.float() - want.float()).abs().max().item()
                row["configs"][name] = {"config": cfg, "ms": t["median_ms"], "over_bound": t["median_ms"] / bound_ms,
                                        "tflop_s": flops / (t["median_ms"] * 1e-3) / 1e12, "max_abs_err": err,
                                        "ok": err <= 2e-2}
            except Exception as exc:  # a config that does not compile or fit: recorded, not fatal
                row["configs"][name] = {"config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        del inp, q, k, v, want
        torch.cuda.empty_cache()
    return rows


def decode_case(batch: int, gen: torch.Generator, dev) -> tuple[dict, torch.Tensor]:
    """`batch` sequences of DECODE_CONTEXT cached tokens, one query token each, and the fp32
    reference output."""
    from moec.ops.paged_attention import paged_attention_ref

    inp = paged_inputs([DECODE_CONTEXT] * batch, [1] * batch, gen, dev)
    want = paged_attention_ref(inp["query"].float(), inp["cache"].float(), 0, inp["tables"], inp["seq_ids"],
                               inp["positions"], HEAD_DIM ** -0.5)
    return inp, want


def run_decode(dev, ceil: dict, flush) -> list[dict]:
    from moec.ops.triton import paged_attention as pa

    rows = []
    gen = torch.Generator().manual_seed(2)
    for batch in DECODE_BATCHES:
        inp, want = decode_case(batch, gen, dev)
        kv_bytes = batch * DECODE_CONTEXT * KV_HEADS * HEAD_DIM * 2 * 2
        bound_us = kv_bytes / (ceil["copy_gb_s"] * 1e9) * 1e6
        row = {"batch": batch, "context": DECODE_CONTEXT, "bound_us": bound_us, "configs": {}}
        for name, cfg in (("decode", pa.DECODE_CONFIG), ("dynamic (compiled step)", pa.DYNAMIC_CONFIG)):
            t, (out, _) = time_graph(attention_call(inp, cfg), dev, flush=flush)
            err = (out.float() - want).abs().max().item()
            row["configs"][name] = {"us": t["median_ms"] * 1e3, "over_bound": t["median_ms"] * 1e3 / bound_us,
                                    "max_abs_err": err, "ok": err <= 2e-2}
        rows.append(row)
    return rows


def run_splits(dev, ceil: dict, flush) -> list[dict]:
    """Decode attention (the compiled step's dynamic tiles) per split count and merge width."""
    from moec.ops.triton import paged_attention as pa

    built_in = (pa.NUM_SPLITS, pa.PART_ROWS, pa.COMBINE_HEADS)
    rows = []
    gen = torch.Generator().manual_seed(4)
    for batch in DECODE_BATCHES:
        inp, want = decode_case(batch, gen, dev)
        row = {"batch": batch, "context": DECODE_CONTEXT, "variants": {}}
        for splits in SPLIT_COUNTS:
            for heads in COMBINE_HEADS:
                name = f"splits {splits} merge heads {heads}" + (" (built in)" if (splits, heads) == (
                    built_in[0], built_in[2]) else "")
                pa.NUM_SPLITS, pa.PART_ROWS, pa.COMBINE_HEADS = splits, 2 * splits, heads
                try:
                    t, (out, _) = time_graph(attention_call(inp, pa.DYNAMIC_CONFIG), dev, flush=flush)
                    err = (out.float() - want).abs().max().item()
                    row["variants"][name] = {"us": t["median_ms"] * 1e3, "max_abs_err": err, "ok": err <= 2e-2}
                finally:
                    pa.NUM_SPLITS, pa.PART_ROWS, pa.COMBINE_HEADS = built_in
        rows.append(row)
    return rows


def run_kv_write(dev, ceil: dict, flush) -> list[dict]:
    from moec.ops.triton.kv_write import write_kv

    rows = []
    gen = torch.Generator().manual_seed(5)
    for tokens in KV_WRITE_TOKENS:
        blocks = -(-tokens // BLOCK_SIZE) * 2 + 1
        slots = torch.randperm(blocks * BLOCK_SIZE, generator=gen)[:tokens].to(dev)
        # as the step hands them: K out of RoPE ([Hkv, T, D] storage), V a slice of the fused projection
        key = torch.randn(KV_HEADS, tokens, HEAD_DIM, generator=gen).to(dev, DTYPE).transpose(0, 1)
        value = torch.randn(tokens, 3 * KV_HEADS, HEAD_DIM, generator=gen).to(dev, DTYPE)[:, KV_HEADS: 2 * KV_HEADS]
        caches = {name: torch.zeros(1, 2, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
                  for name in ("triton (built in)", "torch index_copy_")}

        def torch_path(cache=caches["torch index_copy_"]):
            planes = cache[0].view(2, blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM)
            if tokens <= STACKED_UP_TO:
                planes.index_copy_(1, slots, torch.stack((key, value)))
            else:
                planes[0].index_copy_(0, slots, key)
                planes[1].index_copy_(0, slots, value)

        calls = {"triton (built in)": lambda: write_kv(caches["triton (built in)"], 0, key, value, slots),
                 "torch index_copy_": torch_path}
        nbytes = 2 * 2 * tokens * KV_HEADS * HEAD_DIM * 2  # K and V, read and written
        row = {"tokens": tokens, "bound_us": nbytes / (ceil["copy_gb_s"] * 1e9) * 1e6, "paths": {}}
        for name, call in calls.items():
            t, _ = time_graph(call, dev, flush=flush)
            row["paths"][name] = {"us": t["median_ms"] * 1e3, "over_bound": t["median_ms"] * 1e3 / row["bound_us"]}
        row["same_cache"] = bool(torch.equal(*caches.values()))
        rows.append(row)
    return rows


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, num_tokens, N, K, stride_xt, stride_wn, stride_ot,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, n] = x[t] . w[n] for up to BLOCK_T tokens: a program per BLOCK_N weight rows, each
    streamed once over K (a prototype, measured here before any compiler pass uses one)."""
    rows = tl.arange(0, BLOCK_T)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                    mask=(rows < num_tokens)[:, None] & (offs_k < K)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=(cols < N)[None, :] & (offs_k < K)[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < num_tokens)[:, None] & (cols < N)[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, stages: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(w.shape[0], block_n),)](
        x, w, out, x.shape[0], w.shape[0], w.shape[1], x.stride(0), w.stride(0), out.stride(0),
        BLOCK_T=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages)
    return out


def run_dense(dev, ceil: dict, flush) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(6)
    for name, (n, k) in DENSE_SHAPES.items():
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dev, DTYPE)
        for tokens in DENSE_TOKENS:
            x = torch.randn(tokens, k, generator=gen).to(dev, DTYPE)
            want = F.linear(x.float(), w.float())
            bound_us = (n * k + tokens * (n + k)) * 2 / (ceil["copy_gb_s"] * 1e9) * 1e6
            row = {"weight": name, "shape": [n, k], "tokens": tokens, "bound_us": bound_us, "paths": {}}
            calls = {"F.linear (cuBLAS, built in)": lambda: F.linear(x, w)}
            calls.update({f"triton N{bn} K{bk} s{st}": (lambda bn=bn, bk=bk, st=st: gemv(x, w, bn, bk, st))
                          for bn, bk, st in GEMV_CONFIGS})
            for path, call in calls.items():
                try:
                    t, (out, _) = time_graph(call, dev, flush=flush)
                    err = ((out.float() - want).norm() / want.norm()).item()
                    row["paths"][path] = {"us": t["median_ms"] * 1e3, "over_bound": t["median_ms"] * 1e3 / bound_us,
                                          "rel_err": err, "ok": err <= 1e-2}
                except Exception as exc:  # a tile that does not compile: recorded, not fatal
                    row["paths"][path] = {"error": f"{type(exc).__name__}: {exc}"[:300], "ok": False}
            rows.append(row)
    return rows


@contextlib.contextmanager
def module_values(module, **values):
    """`module`'s attributes set to `values` inside the block, restored after, exception or not:
    how a part times a module value other than the built-in one."""
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(mock.patch.object(module, name, value))
        yield


def router_variants(router, num_experts: int) -> dict[str, dict]:
    """name -> the router module values it sets. Experts the built-in router splits H for (up to
    SPLIT_MAX_E_PAD padded: Mixtral's 8, Qwen3's 128): the split width over H, unsplit, and the
    split path's token limit; more than that (the built-in walks H in one program): the split
    path let in, up to 16 or to SPLIT_MAX_T tokens."""
    if num_experts > router.SPLIT_MAX_E_PAD:
        let_in = {"SPLIT_H": router.SPLIT_H or 256, "SPLIT_MAX_E_PAD": 256}
        return {"unsplit (built in)": {}, **{f"split H {let_in['SPLIT_H']} up to {t} tokens": {**let_in, "SPLIT_MAX_T": t}
                                             for t in sorted({16, router.SPLIT_MAX_T})}}
    out = {("unsplit" if h is None else f"split H {h}") + (" (built in)" if h == router.SPLIT_H else ""):
           {"SPLIT_H": h} for h in ROUTER_SPLIT_H}
    out.update({f"split H {router.SPLIT_H} up to {t} tokens": {"SPLIT_MAX_T": t} for t in ROUTER_SPLIT_MAX_T
                if t != router.SPLIT_MAX_T})
    out.update({f"split H {h}, second launch {w} warp{'s' if w > 1 else ''}": {"SPLIT_H": h, "FINAL_WARPS": w}
                for h in (128, router.SPLIT_H) for w in ROUTER_FINAL_WARPS if w != router.FINAL_WARPS})
    out["no wide row blocks"] = {"WIDE_FROM_T": None}
    for bt, bh, w in ROUTER_ROW_BLOCKS:
        rows = {"ROW_BLOCK_T": bt, "ROW_BLOCK_H": bh, "ROW_WARPS": w, "WIDE_FROM_T": None}
        out[f"row blocks {bt}x{bh} w{w}"] = rows
        out[f"row blocks {bt}x{bh} w{w} from 64 tokens"] = {**rows, "SPLIT_MAX_T": 64}
    return out


def run_router(dev, ceil: dict, flush, token_counts=ROUTER_TOKENS, variants_of=None) -> list[dict]:
    """The router by token count under each variant (`variants_of(experts)`: name -> router module
    values; default `router_variants`), every variant's experts checked against the reference's."""
    from moec.ops.moe_router import moe_router_ref
    from moec.ops.triton import router

    gen = torch.Generator().manual_seed(3)
    rows = []
    for shape, (experts, hidden_size, top_k) in ROUTER_SHAPES.items():
        gate = (torch.randn(experts, hidden_size, generator=gen) * hidden_size ** -0.5).to(dev, DTYPE)
        variants = (variants_of or (lambda e: router_variants(router, e)))(experts)
        for tokens in token_counts:
            hidden = torch.randn(tokens, hidden_size, generator=gen).to(dev, DTYPE)
            want_ids = moe_router_ref(hidden.float(), gate.float(), top_k, True)[1]
            bound_us = (tokens + experts) * hidden_size * 2 / (ceil["copy_gb_s"] * 1e9) * 1e6
            row = {"shape": shape, "tokens": tokens, "bound_us": bound_us, "variants": {}}
            for name, values in variants.items():
                try:
                    with module_values(router, **values):
                        call = lambda: router.fused_router(hidden, gate, top_k, True, count=False)  # noqa: E731
                        t, (out, _) = time_graph(call, dev, flush=flush)
                    same = (out[1].sort(1).values == want_ids.sort(1).values).float().mean().item()
                    row["variants"][name] = {"us": t["median_ms"] * 1e3, "over_bound": t["median_ms"] * 1e3 / bound_us,
                                             "same_experts": same}
                except Exception as exc:  # a variant that does not compile: recorded, not fatal
                    row["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
    return rows


def run_router_wide(dev, ceil: dict, flush) -> list[dict]:
    """The split path's partial launch taking more tokens a program from some T on
    (router.SPLIT_WIDE_FROM_T / SPLIT_WIDE_BLOCK_T), against the built-in router."""
    from moec.ops.triton import router

    variants = {"built in": {}, **{f"partials {bt} tokens from {lo}": {"SPLIT_WIDE_FROM_T": lo, "SPLIT_WIDE_BLOCK_T": bt}
                                   for lo, bt in ROUTER_WIDE}}
    return run_router(dev, ceil, flush, token_counts=ROUTER_WIDE_TOKENS, variants_of=lambda experts: variants)


def run_align(dev, ceil: dict, flush) -> list[dict]:
    """The align (histograms + one scatter, with the grouped_mm path's order from 4096 tokens)
    by assignments a program, warps and the scan's width; every variant's outputs equal to the
    built-in one's."""
    from moec.ops.triton import align

    gen = torch.Generator().manual_seed(5)
    variants = {"built in": {}, **{f"chunk {c} w{w} scan {e}": {"CHUNK": c, "ALIGN_WARPS": w, "SCAN_BLOCK_E": e}
                                   for c, w, e in ALIGN_VARIANTS}}
    rows = []
    for shape, (experts, top_k) in ALIGN_SHAPES.items():
        for tokens in ALIGN_TOKENS:
            ids = torch.randn(tokens, experts, generator=gen).topk(top_k, dim=-1).indices.to(dev)
            block_m, order = (128, True) if tokens >= ALIGN_ORDER_FROM else (64, False)
            bound_us = tokens * top_k * (8 + 4 + 4) / (ceil["copy_gb_s"] * 1e9) * 1e6  # ids in, slots out
            row = {"shape": shape, "tokens": tokens, "block_m": block_m, "order": order, "bound_us": bound_us,
                   "variants": {}}
            want = None
            for name, values in variants.items():
                try:
                    with module_values(align, **values):
                        call = lambda: align.align_scatter(  # noqa: E731
                            align.expert_histograms(ids, experts), block_m, order=order)
                        t, (out, _) = time_graph(call, dev, flush=flush)
                    num_post = int(out[2].item())
                    got = [out[0][:num_post], out[1][:num_post // block_m], *out[3:]]
                    want = got if want is None else want
                    same = all(torch.equal(a, b) for a, b in zip(got, want))
                    row["variants"][name] = {"us": t["median_ms"] * 1e3, "same_as_built_in": same}
                except Exception as exc:  # a variant that does not compile: recorded, not fatal
                    row["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
    return rows


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute error over the reference's largest magnitude, in fp32."""
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def child_error(output: str) -> str:
    """The line of a failed child process's output that says why: its last naming an Error, else
    its last (Triton's DEBUG lines left out)."""
    lines = [line for line in output.splitlines() if line.strip() and "DEBUG" not in line]
    return ([line for line in lines if "Error" in line][-1:] or lines[-1:] or [""])[0]


def expert_weights(hidden_size: int, inter: int, experts: int, gen: torch.Generator, dev) -> tuple:
    """Random w13 [E, 2I, H] and w2 [E, H, I], scaled so activations stay O(1), drawn where `gen` is."""
    w13 = (torch.randn(experts, 2 * inter, hidden_size, generator=gen, device=gen.device)
           * hidden_size ** -0.5).to(dev, DTYPE)
    w2 = (torch.randn(experts, hidden_size, inter, generator=gen, device=gen.device) * inter ** -0.5).to(dev, DTYPE)
    return w13, w2


def routed_tokens(tokens: int, hidden_size: int, experts: int, top_k: int, gen: torch.Generator, dev) -> tuple:
    """Random hidden states and a random top-k routing of them: (x, topk_weights f32, topk_ids),
    drawn where `gen` is."""
    x = torch.randn(tokens, hidden_size, generator=gen, device=gen.device).to(dev, DTYPE)
    probs, ids = torch.randn(tokens, experts, generator=gen, device=gen.device).softmax(-1).topk(top_k, dim=-1)
    return x, (probs / probs.sum(-1, keepdim=True)).to(dev), ids.to(dev)


def routed_cases(dev, shapes: dict, token_counts: dict, seed: int, draw_on: str | torch.device = "cpu"):
    """(shape, (hidden, inter, experts, top_k), tokens, w13, w2, x, weights, ids) for each shape's
    token counts: one set of expert weights a shape, a fresh routing a token count, drawn on
    `draw_on` (the CPU by default: the same numbers on any GPU)."""
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    for shape, dims in shapes.items():
        hidden_size, inter, experts, top_k = dims
        w13, w2 = expert_weights(hidden_size, inter, experts, gen, dev)
        for tokens in token_counts.get(shape, ()):
            yield (shape, dims, tokens, w13, w2, *routed_tokens(tokens, hidden_size, experts, top_k, gen, dev))


def expert_references(x, weights, ids, w13, w2, inter_rows) -> dict:
    """fp32 references per assignment: "gate_up" (SiLU(x·gate) * x·up), "unweighted" (inter_rows ·
    w2^T), "rows" (that times the routing weight) and "down" (each token's K rows summed)."""
    top_k, inter = ids.shape[1], w13.shape[1] // 2
    flat, flat_w = ids.flatten(), weights.flatten()
    want = {"gate_up": torch.empty(flat.numel(), inter, device=x.device),
            "unweighted": torch.empty(flat.numel(), w2.shape[1], device=x.device)}
    for e in flat.unique().tolist():
        sel = (flat == e).nonzero().squeeze(1)
        gu = x[sel // top_k].float() @ w13[e].float().t()
        want["gate_up"][sel] = F.silu(gu[:, :inter]) * gu[:, inter:]
        want["unweighted"][sel] = inter_rows[sel].float() @ w2[e].float().t()
    want["rows"] = want["unweighted"] * flat_w[:, None].float()
    want["down"] = want["rows"].view(-1, top_k, w2.shape[1]).sum(1)
    return want


def run_direct(dev, ceil: dict, flush, shapes: dict = DIRECT_SHAPES, token_counts=DIRECT_TOKENS) -> list[dict]:
    from moec.ops.triton import fused_moe as moe_module
    from moec.ops.triton import grouped_gemm
    from moec.ops.triton.configs import default_config, split_config
    from moec.ops.triton.fused_moe import fused_moe_ref
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped

    gen = torch.Generator().manual_seed(5)
    rows = []
    for shape, (hidden_size, inter, experts, top_k) in shapes.items():
        w13, w2 = expert_weights(hidden_size, inter, experts, gen, dev)
        for tokens in token_counts:
            x, weights, ids = routed_tokens(tokens, hidden_size, experts, top_k, gen, dev)

            def aligned(cfg, regs=grouped_gemm.MAX_REGS_PER_THREAD):
                """fused_moe aligned at every T (no DIRECT below direct_tokens); `regs`: the
                registers a thread resident_programs assumes (fewer: more programs an SM)."""
                with module_values(moe_module, direct_tokens=lambda e, k: 0), \
                        module_values(grouped_gemm, MAX_REGS_PER_THREAD=regs):
                    return moe_module.fused_moe(x, w13, w2, weights, ids, "silu", config=cfg)

            calls = {}
            for label, cfg in (("", default_config(tokens, experts, top_k)), (" M16N16", DIRECT_DECODE_CONFIG)):
                gate_up_cfg, down_cfg = split_config(cfg)

                def direct(gate_up_cfg=gate_up_cfg, down_cfg=down_cfg):
                    out = torch.empty(tokens, hidden_size, device=dev, dtype=DTYPE)
                    h = gate_up_grouped(x, w13, None, None, None, top_k, gate_up_cfg, zero_out=out, direct_ids=ids)
                    return down_grouped(h, w2, weights, None, None, None, down_cfg, out=out, direct_ids=ids)

                persistent = {**cfg, "PERSISTENT": True, "down": {**cfg.get("down", {}), "PERSISTENT": True}}
                calls |= {f"aligned{label or ' (built in)'}": lambda c=cfg: aligned(c),
                          f"aligned persistent{label}": lambda c=persistent: aligned(c),
                          f"aligned persistent x2{label}": lambda c=persistent: aligned(c, regs=128)}
                if tokens <= gate_up_cfg["BLOCK_M"]:  # DIRECT's rows are the tokens
                    calls[f"direct{label}"] = direct
            want = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, "silu")
            hit = ids.unique().numel()
            bound_us = hit * 3 * hidden_size * inter * 2 / (ceil["copy_gb_s"] * 1e9) * 1e6
            row = {"shape": shape, "tokens": tokens, "experts_hit": hit, "bound_us": bound_us, "paths": {}}
            graphs = {}
            for name, call in calls.items():
                t, (out, graph) = time_graph(call, dev, flush=flush)
                err = rel_error(out, want)
                row["paths"][name] = {"us": t["median_ms"] * 1e3, "over_bound": t["median_ms"] * 1e3 / bound_us,
                                      "rel_error": err, "ok": err <= 2e-2}
                graphs[name] = graph
            for name, t in time_interleaved({n: g.replay for n, g in graphs.items()}, dev, flush=flush,
                                            rounds=40).items():
                row["paths"][name]["us_interleaved"] = t["median_ms"] * 1e3
            rows.append(row)
    return rows


def run_gemv(dev, ceil: dict, flush, shapes: dict = DIRECT_SHAPES, token_counts: dict = GEMV_TOKENS,
             gate_up_tiles=GEMV_GATE_UP, down_tiles=GEMV_DOWN, rounds: int = 40) -> list[dict]:
    """Each DIRECT GEMM alone at few tokens under each tile (BLOCK_M 16), replayed round by round,
    checked against fp32 first (the down's output zeroed for that one call; its replays then add
    into it, which the timing does not mind): GB/s of the hit experts' weights, and that over
    copy bandwidth."""
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped

    gen = torch.Generator().manual_seed(7)
    rows = []
    for shape, (hidden_size, inter, experts, top_k) in shapes.items():
        w13, w2 = expert_weights(hidden_size, inter, experts, gen, dev)
        for tokens in token_counts.get(shape, ()):
            x, weights, ids = routed_tokens(tokens, hidden_size, experts, top_k, gen, dev)
            h = torch.randn(tokens * top_k, inter, generator=gen).to(dev, DTYPE)
            flat = ids.flatten()
            want_up = torch.cat([F.silu(g) * u for g, u in (
                (x[a // top_k].float() @ w13[e].float().t()).split(inter) for a, e in enumerate(flat.tolist()))]).view(-1, inter)
            want_down = torch.zeros(tokens, hidden_size, device=dev)
            for a, e in enumerate(flat.tolist()):
                want_down[a // top_k] += (h[a].float() @ w2[e].float().t()) * weights.flatten()[a]
            hit = flat.unique().numel()
            bytes_up, bytes_down = (hit * n * inter * hidden_size * w13.element_size() for n in (2, 1))
            calls, meta = {}, {}
            for kind, tiles in (("gate_up", gate_up_tiles), ("down", down_tiles)):
                for bn, bk, warps, stages in tiles:
                    cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": warps,
                           "num_stages": stages}
                    name = f"{kind} N{bn} K{bk} w{warps} s{stages}"
                    try:
                        if kind == "gate_up":
                            fn = lambda c=cfg: gate_up_grouped(x, w13, None, None, None, top_k, c, direct_ids=ids)  # noqa: E731
                            err = rel_error(fn(), want_up)
                        else:
                            out = torch.zeros(tokens, hidden_size, device=dev, dtype=DTYPE)
                            fn = lambda c=cfg, o=out: down_grouped(h, w2, weights, None, None, None, c, out=o,  # noqa: E731
                                                                   direct_ids=ids)
                            err = rel_error(fn(), want_down)
                        graph, _ = capture_graph(fn, dev)
                    except Exception as exc:  # a tile that does not compile: recorded, not fatal
                        meta[name] = {"error": f"{type(exc).__name__}: {exc}"[:300], "ok": False}
                        continue
                    calls[name] = graph.replay
                    meta[name] = {"bytes": bytes_up if kind == "gate_up" else bytes_down, "rel_error": err,
                                  "ok": err <= 2e-2}
            row = {"shape": shape, "tokens": tokens, "experts_hit": hit, "kernels": meta}
            for name, t in time_interleaved(calls, dev, flush=flush, rounds=rounds).items():
                us = t["median_ms"] * 1e3
                meta[name] |= {"us": us, "gb_s": meta[name]["bytes"] / us / 1e3,
                               "of_copy": meta[name]["bytes"] / us / 1e3 / ceil["copy_gb_s"]}
            rows.append(row)
            print(f"  gemv {shape} T={tokens} done", flush=True)
    return rows


def run_gemm(dev, ceil: dict, flush, shapes: dict = DIRECT_SHAPES, token_counts: dict = GEMM_TOKENS,
             configs: list = GEMM_CONFIGS, down_settings: list = GEMM_DOWN, rounds: int = 20,
             one_per_sm: bool = False) -> list[dict]:
    """The two grouped GEMMs alone (after align) where the layer is compute-bound, in TFLOP/s of
    the routed work: gate/up under each tile, down under each setting (`one_per_sm`: each
    persistent 4-warp one also at one program an SM, "1/SM", against resident_programs' grid),
    against PyTorch's CUTLASS grouped GEMM (torch._grouped_mm) on the same routed rows sorted by
    expert, and cuBLAS bmm on the same rows spread evenly (no routing: the GEMMs' floor)."""
    from moec.ops.triton import grouped_gemm
    from moec.ops.triton.align import moe_align_block_size
    from moec.ops.triton.configs import config_name
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped

    def one_program_an_sm(fn):
        """fn launched with resident_programs at 1 (the most registers a 4-warp thread can hold
        taken as twice the limit)."""
        def run():
            with module_values(grouped_gemm, MAX_REGS_PER_THREAD=512):
                return fn()
        return run

    def with_one_per_sm(key: str, fn, cfg: dict) -> dict:
        """{key: fn}, and {key + " 1/SM": fn at one program an SM} where that is another grid."""
        out = {key: fn}
        if one_per_sm and cfg.get("PERSISTENT") and cfg["num_warps"] <= 4:
            out[f"{key} 1/SM"] = one_program_an_sm(fn)
        return out

    gen = torch.Generator().manual_seed(6)
    rows = []
    for shape, (hidden_size, inter, experts, top_k), tokens, w13, w2, x, weights, ids in routed_cases(
            dev, shapes, token_counts, 6):
        assign = tokens * top_k
        order = ids.flatten().argsort(stable=True)
        x_sorted = x[order // top_k]
        offs = torch.bincount(ids.flatten(), minlength=experts).cumsum(0).to(torch.int32)
        h_sorted = torch.randn(assign, inter, generator=gen).to(dev, DTYPE)
        even = -(-assign // experts)
        x_even = torch.randn(experts, even, hidden_size, generator=gen).to(dev, DTYPE)
        h_even = torch.randn(experts, even, inter, generator=gen).to(dev, DTYPE)
        flops_up, flops_down = 2.0 * assign * hidden_size * 2 * inter, 2.0 * assign * inter * hidden_size
        aligned = {}
        calls, outs, flops = {}, {}, {}
        for cfg in configs:
            bm = cfg["BLOCK_M"]
            if bm not in aligned:
                aligned[bm] = moe_align_block_size(ids, experts, bm)
            for key, fn in with_one_per_sm(f"gate_up {config_name(cfg)}", lambda c=cfg: gate_up_grouped(
                    x, w13, *aligned[c["BLOCK_M"]], top_k, c), cfg).items():
                graph, out = capture_graph(fn, dev)
                calls[key], outs[key], flops[key] = graph.replay, out, flops_up
        # one input for every down launch, alive as long as the graphs that read it
        inter_rows = torch.randn(assign, inter, generator=gen).to(dev, DTYPE)
        one_per_row = weights.reshape(-1, 1)  # K = 1: each assignment's row stored, not added
        for i, d in enumerate(down_settings):
            cfg = {**configs[0], "PERSISTENT": False, **d}  # configs[0]'s BLOCK_M unless d gives one
            name = config_name(cfg)  # "P" only where d asks for a persistent launch
            if cfg["BLOCK_M"] not in aligned:
                aligned[cfg["BLOCK_M"]] = moe_align_block_size(ids, experts, cfg["BLOCK_M"])
            routing = aligned[cfg["BLOCK_M"]]
            variants = with_one_per_sm(f"down {name}", lambda c=cfg, r=routing: down_grouped(
                inter_rows, w2, weights, *r, c), cfg)
            if i == 0:  # the atomic adds left out: what the epilogue costs
                variants[f"down {name} rows-stored"] = lambda c=cfg, r=routing: down_grouped(
                    inter_rows, w2, one_per_row, *r, c)
            for key, fn in variants.items():
                graph, out = capture_graph(fn, dev)
                calls[key], outs[key], flops[key] = graph.replay, out, flops_down
        peers = {
            "gate_up grouped_mm (CUTLASS)": (lambda: torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs), flops_up),
            "gate_up bmm (even rows)": (lambda: torch.bmm(x_even, w13.transpose(1, 2)), flops_up),
            "down grouped_mm (CUTLASS)": (lambda: torch._grouped_mm(h_sorted, w2.transpose(1, 2), offs=offs), flops_down),
            "down bmm (even rows)": (lambda: torch.bmm(h_even, w2.transpose(1, 2)), flops_down),
        }
        for key, (fn, f) in peers.items():
            graph, out = capture_graph(fn, dev)
            calls[key], outs[key], flops[key] = graph.replay, out, f
        times = time_interleaved(calls, dev, flush=flush, rounds=rounds)
        # checked against fp32, after the replays wrote the outputs: gate/up per assignment,
        # down as each token's K rows weighted and summed
        want = expert_references(x, weights, ids, w13, w2, inter_rows)
        errors = {}
        for k, o in outs.items():
            if not k.startswith(("gate_up M", "down M")):
                continue
            ref = want["rows" if k.endswith("rows-stored") else k.split()[0]]
            errors[k] = rel_error(o, ref)
        row = {"shape": shape, "tokens": tokens, "assignments": assign, "rows_per_expert": even,
               "padded_rows": {bm: int(a[2].item()) for bm, a in aligned.items()}, "kernels": {}}
        for key, t in times.items():
            row["kernels"][key] = {"us": t["median_ms"] * 1e3, "tflop_s": flops[key] / (t["median_ms"] * 1e-3) / 1e12,
                                   "rel_error": errors.get(key), "ok": errors.get(key, 0.0) <= 2e-2}
        rows.append(row)
        print(f"  gemm {shape} T={tokens} done", flush=True)
    return rows


def tma_prototype(index: int) -> tuple[str, dict]:
    """The `index`th prototype run_tma times: TMA_CONFIGS' gate/ups, then TMA_DOWN_CONFIGS' downs."""
    both = [("gate_up", c) for c in TMA_CONFIGS] + [("down", c) for c in TMA_DOWN_CONFIGS]
    return both[index]


def probe_one_tma(index: int, shapes: dict = DIRECT_SHAPES, token_counts: dict = TMA_TOKENS,
                  dev: torch.device = torch.device("cuda")) -> int:
    """Run prototype `index` at every shape and token count run_tma times, synchronised, against
    fp32 (inputs drawn on the device: quick), first eagerly, then replayed from a CUDA graph as
    run_tma times it; print its largest errors. A child process's body: a fault (Triton 3.6's
    warp-specialised code can raise an illegal instruction; the second H100 run's timing replays
    an illegal memory access) ends only the child."""
    from tma_grouped_gemm import assignment_rows, gather_routed_rows, route, tma_down, tma_gate_up

    op, cfg = tma_prototype(index)
    worst = worst_graph = 0.0
    for shape, (_, inter, experts, top_k), tokens, w13, w2, x, weights, ids in routed_cases(
            dev, shapes, token_counts, 11, draw_on=dev):
        routing = route(ids, experts, cfg["BLOCK_M"])
        inter_rows = torch.randn(ids.numel(), inter, device=dev).to(DTYPE)
        want = expert_references(x, weights, ids, w13, w2, inter_rows)
        where = assignment_rows(routing, ids.numel())
        by_row, ref_key = tma_check(op, cfg)
        if op == "gate_up":
            a = gather_routed_rows(x, routing, top_k, cfg["BLOCK_M"])
            run = lambda: tma_gate_up(a, w13, routing, ids.numel(), cfg)  # noqa: E731
        else:
            h = torch.zeros(routing[1].shape[0] * cfg["BLOCK_M"], inter, device=dev, dtype=DTYPE)
            h[where] = inter_rows
            run = lambda: tma_down(h, w2, routing, weights, cfg)  # noqa: E731
        fn, ref = (lambda: run()[where]) if by_row else run, want[ref_key]
        worst = max(worst, rel_error(fn(), ref))  # .item() synchronises
        print(f"probe {index}: {shape} T={tokens} eager ok, now from a CUDA graph", flush=True)
        graph, got = capture_graph(fn, dev)  # as run_tma times it: a fault in its replays ends only this child
        for _ in range(3):
            graph.replay()
        worst_graph = max(worst_graph, rel_error(got, ref))
    print(f"probe {index}: rel_error {worst:.2e} eager, {worst_graph:.2e} replayed from a CUDA graph", flush=True)
    return 0 if max(worst, worst_graph) <= 2e-2 else 1


def probe_tma(shapes: dict, token_counts: dict, parallel: int = 4, only: set[int] | None = None) -> dict[int, str]:
    """Each prototype run once in a child process of its own (`--probe-tma`), `parallel` at a
    time: {index: why} for those whose child failed, so the timing skips them instead of dying."""
    import subprocess

    count = len(TMA_CONFIGS) + len(TMA_DOWN_CONFIGS)
    shapes_arg = ",".join(shapes)
    failed, running = {}, []

    def reap(index, proc):
        out, _ = proc.communicate()
        if proc.returncode:
            reached = [line for line in out.splitlines() if line.startswith(f"probe {index}:")][-1:]
            failed[index] = (f"child exit {proc.returncode} on its own: {child_error(out)[:300]}"
                             + (f" (its last step: {reached[0][:120]})" if reached else ""))
            print(f"  tma probe {index} ({tma_prototype(index)[0]}) failed: {failed[index]}", flush=True)

    for index in (i for i in range(count) if only is None or i in only):
        if len(running) == parallel:
            reap(*running.pop(0))
        running.append((index, subprocess.Popen(
            [sys.executable, __file__, "--probe-tma", str(index), "--probe-shapes", shapes_arg],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for index, proc in running:
        reap(index, proc)
    return failed


def run_tma(dev, ceil: dict, flush, shapes: dict = DIRECT_SHAPES, token_counts: dict = TMA_TOKENS,
            rounds: int = 20, only: set[int] | None = None) -> list[dict]:
    """The prototype TMA MoE (`tma_grouped_gemm.py`): its GEMMs under TMA_CONFIGS (gate/up) and
    TMA_DOWN_CONFIGS (down, weighted rows stored in assignment order) against moec's gate/up
    (GEMM_CONFIGS' persistent tiles) and down (GEMM_DOWN's default, atomic adds into token order),
    CUTLASS's grouped GEMM on the same routed rows and cuBLAS bmm on them spread evenly, in TFLOP/s
    of the routed work, each Triton output checked against fp32; the prototypes' A, gathered
    into blocks, made before the timing, the gather's own time beside them. Then the layer's
    routed experts whole (align, gather, the fastest correct gate/up and down, the combine)
    against moec's fused_moe at its default config and its grouped_mm path, over the roofline.
    A config that fails to compile or run, alone in a child first, is an entry with its error.
    `only`: the prototypes' indexes (`tma_prototype`) to run, else all."""
    from moec.ops.triton.align import moe_align_block_size
    from moec.ops.triton.configs import config_name
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped
    from tma_grouped_gemm import assignment_rows, gather_routed_rows, route, tma_down, tma_gate_up

    def tma_name(op: str, cfg: dict) -> str:
        launch = "persistent" if cfg.get("PERSISTENT") else "a tile a program"
        return (f"{op} TMA{' WS' if cfg.get('WS') else ''} {launch} M{cfg['BLOCK_M']}N{cfg['BLOCK_N']}"
                f"K{cfg['BLOCK_K']} w{cfg['num_warps']}s{cfg['num_stages']}{' rows' if cfg.get('ROW_STORE') else ''}")

    crashed = probe_tma(shapes, token_counts, only=only)  # a fault would end this process: each config runs alone first
    gen = torch.Generator().manual_seed(7)
    rows = []
    for shape, (hidden_size, inter, experts, top_k), tokens, w13, w2, x, weights, ids in routed_cases(
            dev, shapes, token_counts, 7):
        assign = tokens * top_k
        routing = route(ids, experts, _TMA["BLOCK_M"])
        a = gather_routed_rows(x, routing, top_k, _TMA["BLOCK_M"])
        where = assignment_rows(routing, assign)
        inter_rows = torch.randn(assign, inter, generator=gen).to(dev, DTYPE)  # the down's input, by assignment
        h_blocks = torch.zeros(a.shape[0], inter, device=dev, dtype=DTYPE)
        h_blocks[where] = inter_rows
        order = ids.flatten().argsort(stable=True)
        x_sorted, h_sorted = x[order // top_k], inter_rows[order]
        offs = torch.bincount(ids.flatten(), minlength=experts).cumsum(0).to(torch.int32)
        even = -(-assign // experts)
        x_even = torch.randn(experts, even, hidden_size, generator=gen).to(dev, DTYPE)
        h_even = torch.randn(experts, even, inter, generator=gen).to(dev, DTYPE)
        flops = {"gate_up": 2.0 * assign * hidden_size * 2 * inter, "down": 2.0 * assign * inter * hidden_size}
        calls, outs, failed = {}, {}, {}  # outs: key -> (what it computes, how it is checked (tma_check), tensor)
        for cfg in [c for c in GEMM_CONFIGS if c.get("PERSISTENT")]:
            moec_routing = moe_align_block_size(ids, experts, cfg["BLOCK_M"])
            graph, out = capture_graph(lambda c=cfg, r=moec_routing: gate_up_grouped(x, w13, *r, top_k, c), dev)
            key = f"gate_up moec {config_name(cfg)}"
            calls[key], outs[key] = graph.replay, ("gate_up", (False, "gate_up"), out)
        down_cfg = {**GEMM_CONFIGS[0], "PERSISTENT": False, **GEMM_DOWN[0]}
        moec_routing = moe_align_block_size(ids, experts, down_cfg["BLOCK_M"])
        graph, out = capture_graph(lambda: down_grouped(inter_rows, w2, weights, *moec_routing, down_cfg), dev)
        key = f"down moec {config_name(down_cfg)}"
        calls[key], outs[key] = graph.replay, ("down", (False, "down"), out)
        prototypes = [("gate_up", c, lambda c: tma_gate_up(a, w13, routing, assign, c)) for c in TMA_CONFIGS]
        prototypes += [("down", c, lambda c: tma_down(h_blocks, w2, routing, weights, c)) for c in TMA_DOWN_CONFIGS]
        configs = {}
        for i, (op, cfg, fn) in enumerate(prototypes):
            if only is not None and i not in only:
                continue
            key = tma_name(op, cfg)
            configs[key] = cfg
            if i in crashed:
                failed[key] = crashed[i]
                continue
            try:
                fn(cfg)  # compiled outside the capture
                graph, out = capture_graph(lambda c=cfg, f=fn: f(c), dev)
            except Exception as e:  # noqa: BLE001 - a config Triton cannot build: its error is the result
                failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                continue
            calls[key], outs[key] = graph.replay, (op, tma_check(op, cfg), out)
        peers = {
            "gather into blocks (the prototypes' A, not in their time)": (
                lambda: gather_routed_rows(x, routing, top_k, _TMA["BLOCK_M"]), None),
            "gate_up grouped_mm (CUTLASS)": (
                lambda: torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs), "gate_up"),
            "gate_up bmm (even rows)": (lambda: torch.bmm(x_even, w13.transpose(1, 2)), "gate_up"),
            "down grouped_mm (CUTLASS)": (
                lambda: torch._grouped_mm(h_sorted, w2.transpose(1, 2), offs=offs), "down"),
            "down bmm (even rows)": (lambda: torch.bmm(h_even, w2.transpose(1, 2)), "down"),
        }
        for key, (fn, _) in peers.items():
            graph, _ = capture_graph(fn, dev)
            calls[key] = graph.replay
        times = time_interleaved(calls, dev, flush=flush, rounds=rounds)
        want = expert_references(x, weights, ids, w13, w2, inter_rows)
        row = {"shape": shape, "tokens": tokens, "assignments": assign, "rows_per_expert": even,
               "padded_rows": {_TMA["BLOCK_M"]: int(routing[2])}, "kernels": {}}
        for key, t in times.items():
            op = outs[key][0] if key in outs else peers[key][1]
            entry = {"us": t["median_ms"] * 1e3}
            if op is None:  # the gather: bytes read and written
                entry["gb_s"] = 2 * assign * hidden_size * x.element_size() / (t["median_ms"] * 1e-3) / 1e9
            else:
                entry["tflop_s"] = flops[op] / (t["median_ms"] * 1e-3) / 1e12
            if key in outs:
                _, (by_row, ref_key), o = outs[key]
                entry["rel_error"] = rel_error(o[where] if by_row else o, want[ref_key])
                entry["ok"] = entry["rel_error"] <= 2e-2
            row["kernels"][key] = entry
        for key, err in failed.items():
            row["kernels"][key] = {"error": err, "ok": False}
        # the layer's fp32 reference: the down of the gate/up's own rows
        want_layer = expert_references(x, weights, ids, w13, w2, want["gate_up"])["down"]
        row["layer"] = tma_layer(dev, flush, rounds, x, w13, w2, weights, ids, want_layer, ceil, row["kernels"],
                                 configs)
        rows.append(row)
        print(f"  tma {shape} T={tokens} done", flush=True)
    return rows


# (TMA_CONFIGS index, TMA_DOWN_CONFIGS index) run_tma_aoti compiles: without warp specialisation,
# then the gate/up with it (one tile a program: Triton 3.6 specialises the K loop there); the down
# without (every warp-specialised down gave wrong rows or an illegal address on the H100, 2026-12-07),
# then both with it, the down storing its tile's rows (TMA_DOWN_CONFIGS[6]) and moec's combine after
TMA_AOTI_PAIRS = ((0, 0), (2, 0), (2, 6))
TMA_AOTI_SHAPE, TMA_AOTI_TOKENS = "qwen3", (1, 37, 4096)


def aoti_one_tma(pair: int, workdir: Path, dev: torch.device = torch.device("cuda")) -> dict:
    """Pair `pair` of TMA_AOTI_PAIRS as `tma_grouped_gemm.TmaExperts`, exported with the token
    count dynamic and compiled by AOTInductor into a `.pt2`, then loaded and run at
    TMA_AOTI_TOKENS against the same kernels launched from Python: whether moec could ship these
    kernels (device-side tensor descriptors and their global scratch) in an artifact. A child
    process's body (`--tma-aoti`), as the probe's."""
    from tma_grouped_gemm import TmaExperts, export_experts, tma_moe_experts

    gate_up_cfg, down_cfg = TMA_CONFIGS[TMA_AOTI_PAIRS[pair][0]], TMA_DOWN_CONFIGS[TMA_AOTI_PAIRS[pair][1]]
    hidden_size, inter, experts, top_k = DIRECT_SHAPES[TMA_AOTI_SHAPE]
    gen = torch.Generator(device=dev).manual_seed(13)
    w13, w2 = expert_weights(hidden_size, inter, experts, gen, dev)
    module = TmaExperts(w13, w2, gate_up_cfg, down_cfg)
    result = {"pair": list(TMA_AOTI_PAIRS[pair]), "shape": TMA_AOTI_SHAPE, "gate_up": gate_up_cfg, "down": down_cfg,
              "tokens": {}}
    start = time.perf_counter()
    ep = export_experts(module, *routed_tokens(16, hidden_size, experts, top_k, gen, dev))
    result["export_s"] = time.perf_counter() - start
    package = str(workdir / f"tma_aoti_{pair}.pt2")
    start = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=package)
    result["compile_s"] = time.perf_counter() - start
    loaded = torch._inductor.aoti_load_package(package)
    for tokens in TMA_AOTI_TOKENS:
        x, weights, ids = routed_tokens(tokens, hidden_size, experts, top_k, gen, dev)
        got, want = loaded(x, weights, ids), tma_moe_experts(x, w13, w2, weights, ids, gate_up_cfg, down_cfg)
        err = rel_error(got, want)
        result["tokens"][tokens] = {"rel_error_vs_python_launch": err, "ok": err <= 1e-3}
    return result


def run_tma_aoti(dev, ceil: dict, flush, workdir: Path | None = None) -> list[dict]:
    """Each of TMA_AOTI_PAIRS through AOTInductor (`aoti_one_tma`) in a child process of its own,
    one after the other (a fault or a failed compile is that pair's error entry)."""
    import subprocess
    import tempfile

    workdir = Path(workdir or tempfile.mkdtemp(prefix="tma_aoti_"))
    rows = []
    for pair in range(len(TMA_AOTI_PAIRS)):
        report = workdir / f"tma_aoti_{pair}.json"
        proc = subprocess.run([sys.executable, __file__, "--tma-aoti", str(pair), "--out", str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0 and report.exists():
            rows.append(json.loads(report.read_text()))
        else:
            rows.append({"pair": list(TMA_AOTI_PAIRS[pair]),
                         "error": f"child exit {proc.returncode}: {child_error(proc.stdout)[:500]}"})
        print(f"  tma_aoti pair {pair}: {rows[-1].get('error', 'compiled')}", flush=True)
    return rows


def tma_layer(dev, flush, rounds, x, w13, w2, weights, ids, want, ceil, kernels, configs) -> dict:
    """The routed experts whole, each path captured in a CUDA graph from the routing on: the TMA
    prototype with the fastest correct gate/up and down just timed, moec's fused_moe at its
    default config, and its grouped_mm path; us, x the roofline (routed FLOPs over the matmul
    rate, or the experts' bytes over copy bandwidth), error against fp32."""
    from moec.ops.fused_moe import fused_moe_grouped_mm
    from moec.ops.triton.fused_moe import fused_moe
    from tma_grouped_gemm import tma_moe_experts

    def best(op):
        ok = {k: e["us"] for k, e in kernels.items() if k.startswith(f"{op} TMA") and e.get("ok")}
        return configs[min(ok, key=ok.get)] if ok else None

    gate_up_cfg, down_cfg = best("gate_up"), best("down")
    paths = {"moec fused_moe (default config)": lambda: fused_moe(x, w13, w2, weights, ids),
             "moec grouped_mm path": lambda: fused_moe_grouped_mm(x, w13, w2, weights, ids, "silu")}
    if gate_up_cfg and down_cfg:
        paths["TMA prototype (fastest gate_up + down)"] = lambda: tma_moe_experts(x, w13, w2, weights, ids,
                                                                                  gate_up_cfg, down_cfg)
    calls, outs = {}, {}
    for key, fn in paths.items():
        graph, outs[key] = capture_graph(fn, dev)
        calls[key] = graph.replay
    times = time_interleaved(calls, dev, flush=flush, rounds=rounds)
    assign, hidden_size, inter = ids.numel(), x.shape[1], w2.shape[2]
    hit = ids.unique().numel()
    bound_s = max(6.0 * assign * hidden_size * inter / (ceil["matmul_tflop_s"] * 1e12),
                  3 * hit * hidden_size * inter * w13.element_size() / (ceil["copy_gb_s"] * 1e9))
    layer = {"bound_us": bound_s * 1e6, "gate_up": gate_up_cfg, "down": down_cfg, "paths": {}}
    for key, t in times.items():
        err = rel_error(outs[key], want)
        layer["paths"][key] = {"us": t["median_ms"] * 1e3, "over_roofline": t["median_ms"] * 1e-3 / bound_s,
                               "rel_error": err, "ok": err <= 2e-2}
    return layer


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = result["prefill"]
    tokens = [r["tokens"] for r in rows]
    bound = result["ceilings"]["matmul_tflop_s"]
    ax.axhline(bound, color="black", lw=1, label=f"matmul rate {bound:.0f} TFLOP/s (bound)")
    sdpa = [4.0 * HEADS * HEAD_DIM * r["tokens"] * (r["tokens"] + 1) / 2 / (r["sdpa_flash_ms"] * 1e-3) / 1e12
            for r in rows]
    ax.plot(tokens, sdpa, "k--o", label="torch SDPA flash (contiguous)")
    for name in prefill_candidates():
        ys = [r["configs"].get(name, {}).get("tflop_s") for r in rows]
        if any(y is not None for y in ys):
            ax.plot(tokens, [y if y is not None else float("nan") for y in ys], "-o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens (one sequence, causal)")
    ax.set_ylabel("TFLOP/s")
    device = result["env"].get("device")
    name = device.get("name") if isinstance(device, dict) else device
    ax.set_title(f"Paged attention prefill, H{HEADS}/{KV_HEADS} D{HEAD_DIM} bf16, {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fastest(entries: dict, unit: str) -> tuple[str | None, float]:
    """(name, time) of the fastest entry that passed its check; (None, nan) when none did."""
    ok = {name: e[unit] for name, e in entries.items() if e.get("ok") and unit in e}
    name = min(ok, key=ok.get, default=None)
    return name, ok.get(name, float("nan"))


def timing_cells(entries: dict) -> str:
    """'name us (x bound)' for each entry, on one line."""
    return "  ".join(f"{n} {c['us']:.1f} ({c['over_bound']:.1f}x)" for n, c in entries.items())


def print_tables(result: dict) -> None:
    print("\nprefill (ms; x bound)")
    for r in result.get("prefill", []):
        best = fastest(r["configs"], "ms")
        built = r["configs"].get("prefill (built-in)", {})
        dyn = r["configs"].get("dynamic (built-in)", {})
        print(f"  T={r['tokens']:5d} bound {r['bound_ms']:.3f}  sdpa {r['sdpa_flash_ms']:.3f}  "
              f"dynamic {dyn.get('ms', float('nan')):.3f}  prefill {built.get('ms', float('nan')):.3f}  "
              f"best {best[0]} {best[1]:.3f}")
    print("decode attention (us; x bound)")
    for r in result.get("decode", []):
        print(f"  B={r['batch']:4d} bound {r['bound_us']:.1f}  {timing_cells(r['configs'])}")
    print("decode attention by split count and merge width (us)")
    for r in result.get("splits", []):
        best = fastest(r["variants"], "us")
        built = next((c["us"] for n, c in r["variants"].items() if "built in" in n), float("nan"))
        print(f"  B={r['batch']:4d} built in {built:.1f}  best {best[0]} {best[1]:.1f}")
    print("K/V write (us)")
    for r in result.get("kv_write", []):
        print(f"  T={r['tokens']:5d} bound {r['bound_us']:.2f}  {timing_cells(r['paths'])}  same cache: {r['same_cache']}")
    print("dense projections at decode (us; x bound)")
    for r in result.get("dense", []):
        best = fastest(r["paths"], "us")
        built = r["paths"].get("F.linear (cuBLAS, built in)", {})
        print(f"  {r['weight']:8s} T={r['tokens']:2d} bound {r['bound_us']:.1f}  cuBLAS {built.get('us', float('nan')):.1f}"
              f"  best {best[0]} {best[1]:.1f}")
    print("experts at few tokens, aligned vs DIRECT (us, replayed alone / round by round; x bound)")
    for r in result.get("direct", []):
        cells = "  ".join(f"{n} {c['us']:.1f} / {c.get('us_interleaved', float('nan')):.1f} ({c['over_bound']:.2f}x)"
                          f"{'' if c['ok'] else ' WRONG'}" for n, c in r["paths"].items())
        print(f"  {r['shape']:8s} T={r['tokens']:3d} hit {r['experts_hit']:3d} bound {r['bound_us']:.1f}  {cells}")
    print("grouped GEMMs alone (us, round by round; TFLOP/s of the routed work)")
    for r in [*result.get("gemm", []), *result.get("middle", []), *result.get("tma", [])]:
        print(f"  {r['shape']} T={r['tokens']} ({r['rows_per_expert']} rows per expert; padded {r['padded_rows']})")
        for n, c in r["kernels"].items():
            if "error" in c:
                print(f"    {n:42s} failed: {c['error'][:100]}")
            elif "tflop_s" in c:
                print(f"    {n:42s} {c['us']:9.1f} us {c['tflop_s']:6.0f} TFLOP/s{'' if c.get('ok', True) else ' WRONG'}")
            else:
                print(f"    {n:42s} {c['us']:9.1f} us {c['gb_s']:6.0f} GB/s")
        if "layer" in r:
            print(f"    layer, roofline {r['layer']['bound_us']:.1f} us: " + "  ".join(
                f"{n} {c['us']:.1f} ({c['over_roofline']:.2f}x){'' if c['ok'] else ' WRONG'}"
                for n, c in r["layer"]["paths"].items()))
    print("DIRECT GEMMs at few tokens alone (us; GB/s of the hit experts; over copy bandwidth)")
    for r in result.get("gemv", []):
        print(f"  {r['shape']} T={r['tokens']} ({r['experts_hit']} experts hit)")
        for n, c in r["kernels"].items():
            print(f"    {n:28s} " + (f"{c['us']:7.1f} us {c['gb_s']:6.0f} GB/s {c['of_copy']:5.2f}{'' if c['ok'] else ' WRONG'}"
                                     if "us" in c else f"failed: {c.get('error', '')[:80]}"))
    print("align: histograms + scatter (us; same = outputs equal to the built-in one's)")
    for r in result.get("align", []):
        cells = "  ".join(f"{n} {c['us']:.1f}{'' if c['same_as_built_in'] else ' DIFFERS'}" if "us" in c
                          else f"{n} failed" for n, c in r["variants"].items())
        print(f"  {r['shape']:8s} T={r['tokens']:5d} M{r['block_m']}{' order' if r['order'] else ''}  {cells}")
    for r in result.get("tma_aoti", []):
        if "error" in r:
            print(f"tma_aoti pair {r['pair']}: {r['error']}")
        else:
            cells = "  ".join(f"T={t} {'ok' if c['ok'] else 'WRONG'} {c['rel_error_vs_python_launch']:.1e}"
                              for t, c in r["tokens"].items())
            print(f"tma_aoti pair {r['pair']}: compiled in {r['compile_s']:.0f} s  {cells}")
    print("router (us)")
    for r in [*result.get("router", []), *result.get("router_wide", [])]:
        cells = "  ".join(f"{n} {c['us']:.1f}" if "us" in c else f"{n} failed" for n, c in r["variants"].items())
        print(f"  {r['shape']:8s} T={r['tokens']:5d} bound {r['bound_us']:.2f}  {cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget-s", type=float, default=240, help="the prefill sweep stops adding configs after it")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to run")
    parser.add_argument("--commit", help="git commit of the tree (else git rev-parse HEAD, which a copied tree "
                                         "may not match)")
    parser.add_argument("--probe-tma", type=int, help=argparse.SUPPRESS)  # probe_tma's child
    parser.add_argument("--probe-shapes", default=",".join(DIRECT_SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--tma-aoti", type=int, help=argparse.SUPPRESS)  # run_tma_aoti's child
    parser.add_argument("--tma-only", help="tma: the prototypes to run, comma-separated indexes into TMA_CONFIGS "
                                           "then TMA_DOWN_CONFIGS (default all)")
    args = parser.parse_args()
    if args.probe_tma is not None:
        return probe_one_tma(args.probe_tma, {k: DIRECT_SHAPES[k] for k in args.probe_shapes.split(",")})
    if args.tma_aoti is not None:
        write_json(Path(args.out) / f"tma_aoti_{args.tma_aoti}.json", aoti_one_tma(args.tma_aoti, Path(args.out)))
        return 0
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {','.join(PARTS)}")
    tma_only = None
    if args.tma_only:
        count = len(TMA_CONFIGS) + len(TMA_DOWN_CONFIGS)
        try:
            tma_only = {int(i) for i in args.tma_only.split(",")}
        except ValueError:
            tma_only = {-1}
        if not tma_only <= set(range(count)):
            parser.error(f"--tma-only {args.tma_only}: want comma-separated indexes from 0 to {count - 1} "
                         f"(TMA_CONFIGS, then TMA_DOWN_CONFIGS)")
    if not torch.cuda.is_available():
        print("step_kernels: needs a CUDA GPU (it times Triton kernels); run it through the device tool",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    dev = torch.device("cuda")
    out = Path(args.out)
    flush = L2Flusher(dev)
    ceil = {"copy_gb_s": copy_bandwidth(dev)["value"], "matmul_tflop_s": matmul_rate(dev)["value"]}
    result = {"benchmark": "step_kernels", "env": environment(dev, args.commit), "ceilings": ceil}
    print(f"ceilings: copy {ceil['copy_gb_s']:.0f} GB/s, matmul {ceil['matmul_tflop_s']:.0f} TFLOP/s", flush=True)
    parts = {"router": lambda: run_router(dev, ceil, flush), "router_wide": lambda: run_router_wide(dev, ceil, flush),
             "align": lambda: run_align(dev, ceil, flush), "decode": lambda: run_decode(dev, ceil, flush),
             "splits": lambda: run_splits(dev, ceil, flush), "kv_write": lambda: run_kv_write(dev, ceil, flush),
             "dense": lambda: run_dense(dev, ceil, flush), "direct": lambda: run_direct(dev, ceil, flush),
             "gemm": lambda: run_gemm(dev, ceil, flush),
             "gemv": lambda: run_gemv(dev, ceil, flush),
             "tma": lambda: run_tma(dev, ceil, flush, only=tma_only),
             "tma_aoti": lambda: run_tma_aoti(dev, ceil, flush),  # its .pt2s (the weights in them) not under --out
             "middle": lambda: run_gemm(dev, ceil, flush, token_counts=MIDDLE_TOKENS, configs=MIDDLE_CONFIGS,
                                        down_settings=MIDDLE_DOWN, one_per_sm=True),
             "prefill": lambda: run_prefill(dev, ceil, flush, start + args.budget_s)}
    for part in args.parts.split(","):
        result[part] = parts[part]()
        write_json(out / "step_kernels.json", result)
        print(f"[{time.perf_counter() - start:5.0f}s] {part} done", flush=True)
    if "prefill" in result:
        plot(result, out / "step_kernels.png")
    print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
