"""Fused router: logits + softmax (float32) + top-k + renormalise (+ per-expert counts), one kernel.

The logits GEMM is [T, H] x [H, E] with E small: as a cuBLAS call it was, at decode, a 4 us
split-K matvec plus its reduction kernel for 64 KB of weights (Mixtral, H200), then the top-k
kernel. `_router_kernel` computes the logits itself (tl.dot over H in BLOCK_H steps, experts
padded to at least 16 columns), rounds them to the input dtype as F.linear's output is rounded
(so the routing is the reference's, near-ties included), and goes on to the softmax and top-k
in registers: one launch a layer.

A program walks H in BLOCK_H steps, one after another: at decode (T = 1, one program) those
steps are the kernel's time (32 steps of 128 took 14.6 us a layer on the H200, more than the
cuBLAS path it replaced; 8 steps of 512 still 13.8 us, timed alone with the L2 flushed). So up
to SPLIT_MAX_T tokens H is split instead: `_router_partial_kernel` has one program per SPLIT_H
columns of H and SMALL_T tokens writing their partial logits, and `_router_kernel` sums the
partials in a fixed order (deterministic) before the same softmax and top-k. Each launch's grid
is gated by T (`token_gate`), so one compiled graph runs the split path at decode and the row
blocks at prefill.

Top-k is K rounds of (row max, lowest index attaining it, mask it out): no sort, and ties go to
the lower expert index. The per-expert counts, when asked for, are int32 atomic adds into a
zeroed [E] buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moec.ops.triton.token_gate import never, token_range_gate


@triton.jit
def _router_partial_kernel(
    hidden_ptr,
    gate_ptr,
    partial_ptr,  # [num_splits, part_rows, E_PAD] fp32
    part_rows,
    num_tokens,
    num_experts,
    hidden_size,
    stride_ht,
    stride_ge,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Logits of this program's BLOCK_T tokens over its BLOCK_H columns of H."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    h = split * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < hidden_size
    x = tl.load(hidden_ptr + rows.to(tl.int64)[:, None] * stride_ht + h[None, :],
                mask=(rows < num_tokens)[:, None] & h_ok[None, :], other=0.0)
    w = tl.load(gate_ptr + cols.to(tl.int64)[None, :] * stride_ge + h[:, None],
                mask=h_ok[:, None] & (cols < num_experts)[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(x, w, input_precision="ieee")
    else:
        acc = tl.dot(x, w)
    tl.store(partial_ptr + (split * part_rows + rows)[:, None] * E_PAD + cols[None, :], acc)


@triton.jit
def _router_kernel(
    hidden_ptr,
    gate_ptr,
    weights_ptr,
    ids_ptr,
    counts_ptr,
    partial_ptr,  # FROM_PARTIALS: `_router_partial_kernel`'s [num_splits, part_rows, E_PAD] output
    part_rows,
    num_splits,
    num_tokens,
    num_experts,
    hidden_size,
    stride_ht,
    stride_ge,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    COUNT: tl.constexpr,
    IEEE: tl.constexpr,
    FROM_PARTIALS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    x_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_ht
    w_cols = gate_ptr + cols.to(tl.int64)[None, :] * stride_ge
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    if FROM_PARTIALS:  # the splits' logits of these rows, summed in split order
        tile = rows[:, None] * E_PAD + cols[None, :]
        for s in range(0, num_splits):
            acc += tl.load(partial_ptr + s * part_rows * E_PAD + tile)
    else:
        for h0 in range(0, hidden_size, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_ok = h < hidden_size
            x = tl.load(x_rows + h[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_H]
            w = tl.load(w_cols + h[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_H, E_PAD]
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    x = acc.to(hidden_ptr.dtype.element_ty).to(tl.float32)  # logits rounded as F.linear's output is
    kcols = tl.arange(0, K_PAD)
    x = tl.where(col_ok[None, :], x, float("-inf"))  # padding experts take no probability
    x_max = tl.max(x, axis=1)
    p = tl.exp(x - x_max[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    # padding experts must never win a round, even against a real expert whose probability
    # underflowed to 0: mark them (and, below, experts already chosen) with -1
    p = tl.where(col_ok[None, :], p, -1.0)

    top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for k in range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], E_PAD), axis=1)
        idx = tl.minimum(idx, num_experts - 1)  # a NaN row matches nothing: stay in bounds
        top_w = tl.where(kcols[None, :] == k, best[:, None], top_w)
        top_i = tl.where(kcols[None, :] == k, idx[:, None], top_i)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # padding k columns hold 0

    k_ok = row_ok[:, None] & (kcols < TOP_K)[None, :]
    out_off = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + out_off, top_w, mask=k_ok)
    tl.store(ids_ptr + out_off, top_i.to(ids_ptr.dtype.element_ty), mask=k_ok)
    if COUNT:
        tl.atomic_add(counts_ptr + top_i, tl.full((BLOCK_T, K_PAD), 1, tl.int32), mask=k_ok)


MAX_EXPERTS = 256  # a block of rows of logits per program, held in registers
SMALL_T = 16  # rows per program of the few-token launch (tl.dot's M)
# columns of H per program of the split path (a module value, so a benchmark can vary it); None:
# one program walks H in steps of 8192 // E_PAD instead, as it also does for more than
# SPLIT_MAX_E_PAD padded experts. Qwen3-30B-A3B's 128 experts (H200,
# step_kernels-h200-2026-12-03T2135): split 12.8 / 13.4 / 13.8 / 19.7 us at 1 / 16 / 256 / 1024
# tokens, one program over H 23.4 / 24.0 / 23.2 / 24.4. 256 padded experts are not measured.
SPLIT_H: int | None = 256
SPLIT_MAX_E_PAD = 128
# the split path runs up to this many tokens (in row blocks of SMALL_T), the row-block launch
# above it. A module value for benchmarks/step_kernels.py. On the H200 (Mixtral's router,
# step_kernels-h200-2026-12-03T1634) the split path took 9.2 / 9.5 / 13.1 / 25.5 us at 64 / 256 /
# 1024 / 4096 tokens, the row blocks 19.1 / 18.8 / 19.5 / 24.4 (32 steps of 128 over H, one
# after another): split up to 1024
SPLIT_MAX_T = 1024
# warps of the split path's second launch (sum of the partials, softmax, top-k): its K rounds of
# row reductions are latency. A module value for benchmarks/step_kernels.py. H100, 2026-12-06
# (its log, in moe_layer-h100-2026-12-06T0445's notes): on 1 or 2 warps it was slower, Qwen3's
# router at one token 19.3 / 15.8 us against 13.1 on 4 (Mixtral 8.8 / 9.1 against 8.4); 8 not run
FINAL_WARPS = 4
# the row-block launches (above the few-token one): tokens and H columns a program takes per
# step, and warps; None: 16 x 64 where experts pad to 128 or more, else 32 x 128. Module values
# for benchmarks/step_kernels.py, which set every row-block launch (and WIDE_FROM_T None) with them
ROW_BLOCK_T: int | None = None
ROW_BLOCK_H: int | None = None
ROW_WARPS = 4
# above WIDE_FROM_T tokens, where experts pad to 128, row blocks of WIDE_BLOCK_T tokens: every
# program reads the whole gate weight (Qwen3's 128 x 2048: 512 KB) from L2 for its rows, so 4x
# the rows a program is 4x less of that traffic. H100 (step_kernels-h100-2026-12-06T1049):
# Qwen3's router at 16384 tokens 48.5 us against 66.7 for 16-token blocks; at 4096, 28.4 against
# 27.0 (and 32 x 64: 28.6), so not below. Mixtral's 8 experts: no change at 4096 or 16384 (61.6
# against 61.5..64.3 for every block tried). 256 padded experts keep 16-token blocks: 64 x 256
# logits spill registers on sm_90 (320 bytes), and nothing there was measured
WIDE_FROM_T: int | None = 4096
WIDE_BLOCK_T, WIDE_BLOCK_H = 64, 64
# above SPLIT_WIDE_FROM_T tokens (and up to SPLIT_MAX_T) the split path's partial launch takes
# SPLIT_WIDE_BLOCK_T tokens a program instead of SMALL_T: each program reads its BLOCK_H columns
# of the gate weight (Qwen3's: 64 KB) from L2 for its rows, so 16-token programs at 1024 tokens
# read 32 MB of it. The second launch keeps SMALL_T rows a program. None: off. H100
# (step_kernels-h100-2026-12-06T1438): Qwen3's router at 256 / 512 / 1024 tokens 13.7 / 14.7 /
# 19.1 us with 16-token partials, 13.5 / 13.7 / 14.9 with 64 from 256 tokens (64 from 64 tokens:
# 14.0 against 13.3 at 128); Mixtral's 9.7 / 10.4 / 12.9 against 9.4 / 10.6 / 12.0
SPLIT_WIDE_FROM_T: int | None = 256
SPLIT_WIDE_BLOCK_T = 64


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def launch_configs(num_experts: int) -> list[tuple[int, int | None, int, int, bool]]:
    """(lo, hi, BLOCK_T, BLOCK_H, split) per token range lo < T <= hi: the few-token launch (H
    split over programs of BLOCK_H columns and BLOCK_T tokens, their sums taken SMALL_T tokens a
    program; or one program with long steps), maybe in two ranges (SPLIT_WIDE_FROM_T), then row blocks
    that keep the [BLOCK_T, E_PAD] logits in registers, wider ones above WIDE_FROM_T tokens
    where experts pad to 128."""
    e_pad = max(_next_pow2(num_experts), 16)  # tl.dot's N
    split = SPLIT_H is not None and e_pad <= SPLIT_MAX_E_PAD
    top = SPLIT_MAX_T if split else SMALL_T
    split_wide = SPLIT_WIDE_FROM_T if split and SPLIT_WIDE_FROM_T is not None and SPLIT_WIDE_FROM_T < top else None
    small = [(0, split_wide or top, SMALL_T, SPLIT_H if split else max(64, min(512, 8192 // e_pad)), split)]
    if split_wide is not None:
        small.append((split_wide, top, SPLIT_WIDE_BLOCK_T, SPLIT_H, True))
    wide = WIDE_FROM_T if WIDE_FROM_T is not None and e_pad == 128 and WIDE_FROM_T > top else None
    rows = (top, wide, ROW_BLOCK_T or (16 if e_pad >= 128 else 32), ROW_BLOCK_H or (64 if e_pad >= 128 else 128), False)
    return [*small, rows] + ([(wide, None, WIDE_BLOCK_T, WIDE_BLOCK_H, False)] if wide is not None else [])


def fused_router(
    hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool, count: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [T, H], gate_weight [E, H] → (topk_weights f32 [T, K], topk_ids i64 [T, K], counts).

    counts i32 [E]: how many of the T*K assignments chose expert e (None unless `count`). E ≤ 256
    (a block of rows of logits per program fits in registers), 1 ≤ K ≤ E.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts = gate_weight.shape[0]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"fused_router: {num_experts} experts; it handles 1..{MAX_EXPERTS}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"fused_router: top_k={top_k} with {num_experts} experts")
    if gate_weight.shape[1] != hidden_size or gate_weight.dtype != hidden.dtype:
        raise ValueError(f"fused_router: gate_weight {tuple(gate_weight.shape)} {gate_weight.dtype} does not fit "
                         f"hidden {tuple(hidden.shape)} {hidden.dtype}")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if gate_weight.stride(-1) != 1:
        gate_weight = gate_weight.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=hidden.device)
    # without counts the kernel never touches the buffer: no memset launch for it
    counts = (torch.zeros(num_experts, dtype=torch.int32, device=hidden.device) if count
              else torch.empty(1, dtype=torch.int32, device=hidden.device))
    e_pad = max(_next_pow2(num_experts), 16)  # tl.dot's N
    meta = dict(TOP_K=top_k, K_PAD=max(_next_pow2(top_k), 2), E_PAD=e_pad, RENORMALIZE=bool(renormalize), COUNT=count,
                IEEE=hidden.dtype == torch.float32, num_warps=4, num_stages=3)
    for lo, hi, block_t, block_h, split in launch_configs(num_experts):
        gate = token_range_gate(num_tokens, lo, hi)
        if never(gate):
            continue
        num_splits = triton.cdiv(hidden_size, block_h) if split else 1
        part_rows = triton.cdiv(hi, block_t) * block_t if split else 0  # the range's most tokens, whole blocks
        final_t = SMALL_T if split else block_t  # the split path sums partials SMALL_T tokens a program
        partial = (torch.empty(num_splits, part_rows, e_pad, dtype=torch.float32, device=hidden.device) if split
                   else weights)  # unread without FROM_PARTIALS
        if split:
            wrap_triton(_router_partial_kernel)[(num_splits * gate, triton.cdiv(num_tokens, block_t) * gate)](
                hidden, gate_weight, partial, part_rows, num_tokens, num_experts, hidden_size, hidden.stride(0),
                gate_weight.stride(0), E_PAD=e_pad, BLOCK_T=block_t, BLOCK_H=block_h, IEEE=meta["IEEE"], num_warps=4,
                num_stages=1,
            )
        wrap_triton(_router_kernel)[(triton.cdiv(num_tokens, final_t) * gate,)](
            hidden, gate_weight, weights, ids, counts, partial, part_rows, num_splits, num_tokens, num_experts,
            hidden_size, hidden.stride(0), gate_weight.stride(0), BLOCK_T=final_t, BLOCK_H=block_h,
            FROM_PARTIALS=split, **(meta | {"num_warps": FINAL_WARPS if split else ROW_WARPS}),
        )
    return weights, ids, counts if count else None
