"""Fused router: softmax (float32) + top-k + renormalise + per-expert counts, one kernel.

The logits come from a regular matmul (`hidden @ gate_weight.T`, cuBLAS or Inductor): that
GEMM is [T, H] x [H, E] with E small, already memory-bound and well served. Everything after it
is one pass over the [T, E] logits instead of the four or five elementwise/topk kernels the
reference launches, which at decode is launch overhead on the critical path.

Top-k is K rounds of (row max, lowest index attaining it, mask it out): no sort, and ties go to
the lower expert index. The per-expert counts are int32 atomic adds into a zeroed [E] buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _router_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    counts_ptr,
    num_tokens,
    num_experts,
    stride_lt,
    stride_le,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    ok = row_ok[:, None] & col_ok[None, :]
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
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
    tl.atomic_add(counts_ptr + top_i, tl.full((BLOCK_T, K_PAD), 1, tl.int32), mask=k_ok)


MAX_EXPERTS = 256  # one row of logits per program, held in registers


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def router_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, ids_dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype) → (topk_weights f32 [T, K], topk_ids [T, K], counts i32 [E]).

    counts[e] = how many of the T*K assignments chose expert e. E ≤ 256 (one row per program
    fits in registers), 1 ≤ K ≤ E.
    """
    num_tokens, num_experts = logits.shape
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"router_topk: {num_experts} experts; the fused router handles 1..{MAX_EXPERTS}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"router_topk: top_k={top_k} with {num_experts} experts")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=ids_dtype, device=logits.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=logits.device)
    e_pad = max(_next_pow2(num_experts), 2)
    block_t = max(1, min(128, 4096 // e_pad))
    grid = (triton.cdiv(num_tokens, block_t),)
    wrap_triton(_router_topk_kernel)[grid](
        logits,
        weights,
        ids,
        counts,
        num_tokens,
        num_experts,
        logits.stride(0),
        logits.stride(1),
        TOP_K=top_k,
        K_PAD=max(_next_pow2(top_k), 2),
        E_PAD=e_pad,
        BLOCK_T=block_t,
        RENORMALIZE=bool(renormalize),
        num_warps=4,
    )
    return weights, ids, counts


def fused_router(
    hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], gate_weight [E, H] → as `router_topk` (the logits GEMM stays a matmul)."""
    return router_topk(F.linear(hidden, gate_weight), top_k, renormalize)
