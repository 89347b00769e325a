"""The row moves around the `torch._grouped_mm` MoE path: gather into expert order, the gated
activation, and the weighted gather back to token order.

The grouped_mm path (`moec.ops.fused_moe.fused_moe_grouped_mm`) was these three steps as aten
ops that Inductor fused into pointwise kernels. Their launch configs come from Inductor's size
hints, which in a graph with a symbolic token count are the example's T: the tuner's graph
was first compiled at T = 4, the artifact's at the export example's 5 tokens. Measured on an
H200 (grouped_mm_path-h200-2026-12-03T1842) with the graph first compiled at T = 4 and run
at 16384 tokens on Mixtral's shape, the gather into expert order took 657 µs and the one
back 238 µs, against 143 and 103 compiled for that T; with T symbolic on Qwen3's shape
(K = 8) the two took 889 and 529 µs, against 261 and 214 with T static. These kernels have
one launch config each whatever T is: one program per row and column block, every load a
contiguous run of a row. At 16384 tokens, through the tuner's graph first compiled at T = 4
(grouped_mm_path-h200-2026-12-03T1847): 135 and 97 µs on Mixtral's shape, 244 and 140 µs on
Qwen3's, the activation 672 and 136 µs (its bytes over copy bandwidth: 670 and 143 µs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moec.ops.triton.grouped_gemm import ACTIVATION_CODES, _activation, unit_last_stride

BLOCK_COLS = 1024  # columns per program: 2 KiB of a bf16 row, 8 elements a thread at 4 warps


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, out_ptr, n_cols, divisor, stride_src, stride_out,
                        BLOCK: tl.constexpr):
    """out[r, :] = src[index[r] // divisor, :]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    src_row = tl.load(index_ptr + row).to(tl.int64) // divisor
    vals = tl.load(src_ptr + src_row * stride_src + cols, mask=mask)
    tl.store(out_ptr + row * stride_out + cols, vals, mask=mask)


@triton.jit
def _gated_act_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """out[r, n] = act(x[r, n]) * x[r, inter + n], in fp32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (_activation(gate, ACT) * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_rows_kernel(rows_ptr, position_ptr, weights_ptr, out_ptr, n_cols, top_k, stride_rows, stride_out,
                         BLOCK: tl.constexpr):
    """out[t, :] = sum over k, in order, of weights[t, k] * rows[position[t*K + k], :], in fp32."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(top_k):
        row = tl.load(position_ptr + token * top_k + k).to(tl.int64)
        weight = tl.load(weights_ptr + token * top_k + k)
        acc += weight * tl.load(rows_ptr + row * stride_rows + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_rows(src: torch.Tensor, index: torch.Tensor, divisor: int) -> torch.Tensor:
    """src [N, C], index [R] → [R, C], row r = src[index[r] // divisor] (the assignments sorted
    by expert: index = the sort's order, divisor = top_k)."""
    src = unit_last_stride(src)
    out = torch.empty(index.shape[0], src.shape[1], dtype=src.dtype, device=src.device)
    wrap_triton(_gather_rows_kernel)[(index.shape[0], triton.cdiv(src.shape[1], BLOCK_COLS))](
        src, index, out, src.shape[1], divisor, src.stride(0), out.stride(0), BLOCK=BLOCK_COLS, num_warps=4)
    return out


def gated_act(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x [R, 2I] (gate columns, then up columns) → [R, I] = act(gate) * up."""
    x = unit_last_stride(x)
    inter = x.shape[1] // 2
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    wrap_triton(_gated_act_kernel)[(x.shape[0], triton.cdiv(inter, BLOCK_COLS))](
        x, out, inter, x.stride(0), out.stride(0), ACT=ACTIVATION_CODES[activation], BLOCK=BLOCK_COLS, num_warps=4)
    return out


def combine_rows(rows: torch.Tensor, position: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """rows [T*K, C] in expert order, position [T*K] (assignment t*K + k's row), topk_weights
    f32 [T, K] → [T, C]: each token's rows weighted and summed in a fixed order (deterministic)."""
    rows = unit_last_stride(rows)
    num_tokens, top_k = topk_weights.shape
    weights = topk_weights.contiguous()
    out = torch.empty(num_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    wrap_triton(_combine_rows_kernel)[(num_tokens, triton.cdiv(rows.shape[1], BLOCK_COLS))](
        rows, position, weights, out, rows.shape[1], top_k, rows.stride(0), out.stride(0), BLOCK=BLOCK_COLS,
        num_warps=4)
    return out
