"""Token sort/align: the T*K (token, expert) assignments, grouped by expert, each expert's group
padded to a multiple of BLOCK_M, so that every BLOCK_M-row block of the grouped GEMMs reads one
expert's weights (the layout of vLLM's `moe_align_block_size`).

Outputs, for `topk_ids` [T, K] (assignment a = t*K + k):
  sorted_ids [EM] int32   assignment indices, expert-major; padding entries hold T*K
  expert_ids [EM/BLOCK_M] int32   the expert of each block
  num_post [1] int32      used length of sorted_ids (a multiple of BLOCK_M)
Only the first num_post entries of sorted_ids (num_post/BLOCK_M of expert_ids) are written; the
GEMMs stop there. EM = T*K + min(T*K, E)*(BLOCK_M-1) bounds num_post for any routing (only
experts that received a token are padded), and depends on shapes only: no host sync.

A single token (decode at batch 1) needs none of this: its K assignments go to K distinct
experts, so assignment a alone is block a, and the GEMMs read its expert from topk_ids themselves
(`grouped_gemm`'s DIRECT; `fused_moe` gates the two paths by T).

Three launches, all sized from shapes, none data-dependent (`expert_histograms` runs the first
two, which do not depend on BLOCK_M; `align_scatter` the third, per config `fused_moe` runs):
  count    one program per chunk of assignments (`chunkings`): its per-expert histogram
  scan     per expert, the exclusive prefix of the histograms over chunks, and the totals
  scatter  per chunk: each assignment's slot = padded start of its expert + earlier
           assignments of that expert in earlier chunks + its rank within the chunk; the
           padding slots, num_post and expert_ids are written here too
Up to one chunk of assignments (8 tokens at top-8 over 128 experts) there is one chunk: the
scatter counts it itself and the count and scan launches are gated off (their grids times 0), so
the align is one launch where small steps pay for each launch (Qwen3-30B-A3B at 4 tokens on the
H100: 1.6 + 1.7 us of kernels and their gaps in a 123 us step, moe_layer-h100-2026-12-06T0445).
The ranks come from a cumulative sum over a one-hot [SUB, E] tile rather than atomics, so the
order within an expert is the assignment order: deterministic, like a stable sort. A chunk stops
at its last assignment: the scatter's sub-steps over Qwen3's 128 experts cost ~1.5 us each on the
H200, and a decode step of 4 tokens (32 assignments) ran all 8 of them, 13 us
(moe_layer-h200-2026-12-03T2135).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moec.ops.triton.configs import MAX_EXPERTS
from moec.ops.triton.token_gate import never, token_range_gate

# How the count and scatter kernels split the assignments: chunks of CHUNK assignments a program,
# ALIGN_WARPS warps (module values for benchmarks/step_kernels.py; CHUNK None: `chunkings`' choice).
# Each program walks its chunk in sub-steps one after another, each a [SUB, E_PAD] one-hot tile (32
# elements a thread: SUB = 1024 * warps // E_PAD), so where experts are many a chunk is many
# sub-steps. H100, the histograms and one scatter replayed (step_kernels-h100-2026-12-06T1438,
# ...T1549): Qwen3's 128 experts at 64 / 1024 / 4096 / 16384 tokens 34.6 / 35.2 / 42.1 / 75.2 us
# in chunks of 256 on 4 warps (8 sub-steps), 22.4 / 23.2 / 29.6 / 59.3 in chunks of 128 on 4;
# chunks of 64 on 8 warps (one sub-step) 16.0 / 15.9 / 30.8 / 97.1 (the scan over twice the
# chunks). Mixtral's 8 experts (one sub-step of 256): 6.7 to 12.8 us, within 1 us for every chunk
# tried. Hence two chunkings where experts pad to 128 or more, gated by T: chunks of 64 on 8 warps
# up to SMALL_CHUNK_ASSIGNMENTS assignments (a module value too), 128 on 4 above: Qwen3's 16.0 /
# 16.0 / 30.2 / 60.0 us, 17.6 at 2048 tokens (...T1715). The scan takes SCAN_BLOCK_E experts a
# program over every chunk: 8 against 32, Qwen3's 29.6 / 59.3 us against 30.8 / 67.2 at 4096 /
# 16384 tokens, the same below (...T1549)
CHUNK: int | None = None
ALIGN_WARPS = 4
SCAN_BLOCK_E = 8
SMALL_CHUNK_ASSIGNMENTS = 16384


@dataclass(frozen=True)
class Chunking:
    """Chunks of `chunk` assignments a program on `warps` warps, for up to `most` assignments
    (None: any number) above the previous chunking's."""

    chunk: int
    warps: int
    most: int | None


def chunkings(e_pad: int) -> list[Chunking]:
    """The count and scatter kernels' chunkings, from the fewest assignments up."""
    if CHUNK:
        return [Chunking(CHUNK, ALIGN_WARPS, None)]
    if e_pad >= 128:
        return [Chunking(64, 8, SMALL_CHUNK_ASSIGNMENTS), Chunking(128, 4, None)]
    return [Chunking(256, 4, None)]


def sub_step(e_pad: int, chunk: int, warps: int) -> int:
    """Assignments per sub-step of the count and scatter kernels (a power of two <= the chunk)."""
    return min(chunk, max(16, 1024 * warps // e_pad))


@triton.jit
def _one_hot(e, E_PAD: tl.constexpr):
    return (e[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)


@triton.jit
def _align_count_kernel(
    ids_ptr, counts_ptr, num_assign, CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr
):
    pid = tl.program_id(0)
    hist = tl.zeros((E_PAD,), dtype=tl.int32)
    for s in range(0, tl.minimum(num_assign - pid * CHUNK, CHUNK), SUB):  # the chunk's real assignments
        offs = pid * CHUNK + s + tl.arange(0, SUB)
        e = tl.load(ids_ptr + offs, mask=offs < num_assign, other=-1)
        hist += tl.sum(_one_hot(e, E_PAD), axis=0)
    tl.store(counts_ptr + pid * E_PAD + tl.arange(0, E_PAD), hist)


@triton.jit
def _align_scan_kernel(
    counts_ptr,
    offsets_ptr,
    totals_ptr,
    num_chunks,
    E_PAD: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    run = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, num_chunks, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = rows[:, None] < num_chunks
        off = rows[:, None] * E_PAD + cols[None, :]
        c = tl.load(counts_ptr + off, mask=ok, other=0)
        tl.store(offsets_ptr + off, tl.cumsum(c, axis=0) - c + run[None, :], mask=ok)
        run += tl.sum(c, axis=0)
    tl.store(totals_ptr + cols, run)


@triton.jit
def _align_scatter_kernel(
    ids_ptr,
    offsets_ptr,
    totals_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_ptr,
    position_ptr,  # ORDER: [T*K] each assignment's slot
    ends_ptr,  # ORDER: [E] each expert's end slot
    num_assign,
    num_chunks,
    num_experts,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ORDER: tl.constexpr,
):
    """ORDER: also each assignment's row in the unpadded stable expert order and each expert's
    end row there (the grouped_mm path's `position` and offsets)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    if num_chunks == 1:  # the only chunk: its histogram is the whole one (count and scan gated off)
        total = tl.zeros((E_PAD,), dtype=tl.int32)
        for s in range(0, num_assign, SUB):
            offs = s + tl.arange(0, SUB)
            total += tl.sum(_one_hot(tl.load(ids_ptr + offs, mask=offs < num_assign, other=-1), E_PAD), axis=0)
        before = tl.zeros((E_PAD,), dtype=tl.int32)
    else:
        total = tl.load(totals_ptr + cols)
        before = tl.load(offsets_ptr + pid * E_PAD + cols)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, axis=0)
    pstart = pend - padded

    # this chunk's assignments → their slots (and, ORDER, their unpadded rows)
    run = pstart + before
    uend = tl.cumsum(total, axis=0)
    urun = uend - total + before
    for s in range(0, tl.minimum(num_assign - pid * CHUNK, CHUNK), SUB):  # the chunk's real assignments
        offs = pid * CHUNK + s + tl.arange(0, SUB)
        e = tl.load(ids_ptr + offs, mask=offs < num_assign, other=-1)
        oh = _one_hot(e, E_PAD)
        rank = tl.cumsum(oh, axis=0) - 1  # earlier assignments of the same expert in this sub-step
        pos = tl.sum((rank + run[None, :]) * oh, axis=1)
        known = tl.sum(oh, axis=1) > 0  # masked lanes (and out-of-range ids) match no expert
        tl.store(sorted_ptr + pos, offs, mask=known)
        if ORDER:
            tl.store(position_ptr + offs, tl.sum((rank + urun[None, :]) * oh, axis=1), mask=known)
        step = tl.sum(oh, axis=0)
        run += step
        urun += step

    if ORDER and pid == 0:
        tl.store(ends_ptr + cols, uend, mask=cols < num_experts)
    num_post = tl.sum(padded, axis=0)
    if pid == 0:
        tl.store(num_post_ptr, num_post)
        # padding slots of each expert's last block: [pstart + total, pend)
        sentinel = tl.zeros((E_PAD, BLOCK_J), dtype=tl.int32) + num_assign
        for j0 in range(0, BLOCK_M, BLOCK_J):
            pad = (pstart + total)[:, None] + j0 + tl.arange(0, BLOCK_J)[None, :]
            tl.store(sorted_ptr + pad, sentinel, mask=pad < pend[:, None])

    # expert of block b = number of experts whose padded range ends at or before b*BLOCK_M
    # (experts past the last one with tokens end at num_post, beyond every block)
    num_blocks = num_post // BLOCK_M
    for b0 in range(pid * BLOCK_B, num_blocks, num_chunks * BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        ex = tl.sum((pend[None, :] <= bs[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + bs, ex, mask=bs < num_blocks)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _sym_min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def max_padded_assignments(num_assign, num_experts: int, block_m: int):
    """EM: the most slots sorted_ids can need (each expert that got a token pads < BLOCK_M)."""
    return num_assign + _sym_min(num_assign, num_experts) * (block_m - 1)


@dataclass
class HistogramPass:
    """One chunking's count and scan launches (`chunkings`), gated to the token counts it serves."""

    gate: object  # 0 or 1, or an integer expression of T
    chunk: int
    sub: int
    warps: int
    num_chunks: object  # int or SymInt
    offsets: torch.Tensor  # [num_chunks * E_PAD] per-chunk exclusive prefix per expert
    totals: torch.Tensor  # [E_PAD] assignments per expert


@dataclass
class ExpertHistograms:
    """The count and scan launches' results, which do not depend on BLOCK_M: one set serves every
    config `fused_moe` compiles in (each with its own BLOCK_M scatter). One pass per chunking;
    for a concrete T exactly one is live (the others' gates are 0)."""

    ids: torch.Tensor  # [T*K] flat topk_ids
    num_experts: int
    e_pad: int
    passes: list[HistogramPass]


def expert_histograms(topk_ids: torch.Tensor, num_experts: int, gate=1) -> ExpertHistograms:
    """topk_ids [T, K] (any int dtype, values in [0, E)) → per-chunk, per-expert counts, scanned,
    for each chunking gated to its token counts. `gate` (0 or 1, maybe symbolic) multiplies the
    grids: gated to 0, nothing is computed. With one chunk (T*K <= the chunk) nothing is either:
    offsets and totals stay unwritten, and the scatter, which reads them only for several chunks,
    counts its chunk itself."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"moe_align_block_size: {num_experts} experts; supported 1..{MAX_EXPERTS}")
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_tokens, top_k = topk_ids.shape
    num_assign = ids.shape[0]
    device = ids.device
    e_pad = max(_next_pow2(num_experts), 2)
    block_e = min(e_pad, SCAN_BLOCK_E)
    passes, lo = [], 0  # lo: the previous chunking's last token count
    for c in chunkings(e_pad):
        hi = None if c.most is None else max(lo, c.most // top_k)
        in_range = token_range_gate(num_tokens, lo, hi) if hi is None or hi > lo else 0
        lo = hi
        if never(in_range):
            continue
        num_chunks = triton.cdiv(num_assign, c.chunk)
        # [num_chunks, E_PAD] row-major, kept 1-D: a 2-D buffer with a symbolic leading dim that
        # can be 1 makes export guard on it (contiguity check) and specialise the token count
        counts = torch.empty(num_chunks * e_pad, dtype=torch.int32, device=device)
        offsets = torch.empty(num_chunks * e_pad, dtype=torch.int32, device=device)
        totals = torch.empty(e_pad, dtype=torch.int32, device=device)
        sub = sub_step(e_pad, c.chunk, c.warps)
        # one chunk (T*K <= chunk): the scatter counts it itself, these two do not run
        hist_gate = gate * in_range * token_range_gate(num_tokens, c.chunk // top_k, None)
        if not never(hist_gate):
            wrap_triton(_align_count_kernel)[(num_chunks * hist_gate,)](
                ids, counts, num_assign, CHUNK=c.chunk, SUB=sub, E_PAD=e_pad, num_warps=c.warps
            )
            wrap_triton(_align_scan_kernel)[(e_pad // block_e * hist_gate,)](
                counts, offsets, totals, num_chunks, E_PAD=e_pad, BLOCK_E=block_e, BLOCK_P=4096 // block_e,
                num_warps=4
            )
        passes.append(HistogramPass(in_range, c.chunk, sub, c.warps, num_chunks, offsets, totals))
    return ExpertHistograms(ids, num_experts, e_pad, passes)


def align_scatter(hist: ExpertHistograms, block_m: int, gate=1, order: bool = False) -> tuple:
    """The scatter launch for one BLOCK_M → (sorted_ids, expert_ids, num_post). With `order`, also
    (ends, position), int32, from the same launch: the assignments in the stable expert order with
    no padding (what torch.sort(stable=True) of the flat ids orders), each expert's end row in it
    (`torch._grouped_mm`'s offsets) and each assignment's row. For the grouped_mm path, where a
    stable sort was a radix sort of 8 passes and 10 memsets (49 + 11 us of Qwen3-30B-A3B's 0.64 ms
    at 1024 tokens, moe_layer-h100-2026-12-06T0450) followed by a searchsorted and an index_copy_,
    and until 2026-12-06 a second scatter launch of its own. `gate` (0 or 1, maybe symbolic)
    multiplies the grid: gated to 0, nothing is launched or written."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: BLOCK_M must be a power of two, got {block_m}")
    num_assign = hist.ids.shape[0]
    device = hist.ids.device
    em = max_padded_assignments(num_assign, hist.num_experts, block_m)
    sorted_ids = torch.empty(em, dtype=torch.int32, device=device)
    expert_ids = torch.empty(triton.cdiv(em, block_m), dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    if order:
        position = torch.empty(num_assign, dtype=torch.int32, device=device)
        ends = torch.empty(hist.num_experts, dtype=torch.int32, device=device)
    e_pad = hist.e_pad
    for p in hist.passes:  # one live for a concrete T; each writes the same outputs
        if never(p.gate) or never(gate):
            continue
        if not order:  # unused without ORDER: a read-only input stands in (no written tensor is passed twice)
            position = ends = p.totals
        wrap_triton(_align_scatter_kernel)[(p.num_chunks * p.gate * gate,)](
            hist.ids,
            p.offsets,
            p.totals,
            sorted_ids,
            expert_ids,
            num_post,
            position,
            ends,
            num_assign,
            p.num_chunks,
            hist.num_experts,
            CHUNK=p.chunk,
            SUB=p.sub,
            E_PAD=e_pad,
            BLOCK_M=block_m,
            BLOCK_B=max(16, 4096 // e_pad),
            BLOCK_J=min(block_m, max(1, 2048 // e_pad)),
            ORDER=order,
            num_warps=p.warps,
        )
    if order:
        return sorted_ids, expert_ids, num_post, ends, position
    return sorted_ids, expert_ids, num_post


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] (any int dtype, values in [0, E)) → (sorted_ids, expert_ids, num_post)."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: BLOCK_M must be a power of two, got {block_m}")
    return align_scatter(expert_histograms(topk_ids, num_experts), block_m)
