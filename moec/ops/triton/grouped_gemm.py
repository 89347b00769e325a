"""Grouped GEMMs over expert-major blocks (see `align`): gate/up and down.

Both kernels take the sort/align output: block b covers sorted_ids[b*BLOCK_M : (b+1)*BLOCK_M],
all assignments of expert expert_ids[b]; padding entries (== T*K) are masked rows. The grid is
sized for the worst case (EM rows) and blocks past num_post return at once, so nothing is read
back to the host.

gate/up: out[a, n] = act(x[a // K] · w13[e, n]) * (x[a // K] · w13[e, I + n]). One program
owns BLOCK_N gate columns *and* the matching BLOCK_N up columns (two accumulators), so the
activation and the product happen in registers: the [T*K, 2I] pre-activation never exists. The
result is written in assignment order ([T*K, I]), not sorted order, so the buffer has no
padding rows; the down GEMM gathers its A rows through sorted_ids (rows stay contiguous).

down: y[a, :] = topk_weight[a] * (inter[a] · w2[e]^T), the weight applied to the fp32
accumulator, each row stored at its assignment's place in token order ([T, K, H]): the scatter
back to token order is the store. The K rows of a token are then summed by `moe_sum`, in a
fixed order, in fp32 (one read of [T, K, H], one write of [T, H]; vLLM does the same).
Why not accumulate into out[T, H] with fp32 atomics instead: that needs a zero-filled fp32
buffer (a pass) and a cast to the activation dtype (another pass), moves no fewer bytes unless
the fp32 buffer stays in L2 (it does not at prefill sizes), and makes the result depend on the
order in which blocks finish (not reproducible run to run); bf16/fp16 atomics would avoid the
passes but round K times. With K == 1 the down GEMM writes the output directly and no sum runs.

Types: x/w bf16, fp16 or fp32 (fp32 dots use IEEE precision, not TF32); accumulation fp32.
Any H, I (K and N tails are masked), any E and K. Rows may be strided; the last dim of every
operand is taken as contiguous (the launchers copy if it is not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# activation code (a constexpr) per `moec.ops.moe_experts.ACTIVATIONS` name
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        # tanh(z) = 2*sigmoid(2z) - 1 (tl has no tanh in every Triton release we support)
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * z)  # = 0.5 * x * (1 + tanh(z))
    return y


@triton.jit
def _block_coords(pid, em, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each column block's weights in L2."""
    num_pid_m = tl.cdiv(em, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_ptr,
    num_assign,
    top_k,
    em,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m, pid_n = _block_coords(tl.program_id(0), em, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_ok = assign < num_assign
    token = assign // top_k
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + N * stride_wn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        k_ok = offs_k < k_left
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=b_ok, other=0.0)
        u = tl.load(u_ptrs, mask=b_ok, other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    h = _activation(acc_g, ACT) * acc_u
    o_ptrs = out_ptr + assign[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    topk_weights_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_ptr,
    num_assign,
    em,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m, pid_n = _block_coords(tl.program_id(0), em, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_ok = assign < num_assign
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + assign[:, None] * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        k_ok = offs_k < k_left
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if MUL_WEIGHT:
        w = tl.load(topk_weights_ptr + assign, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    o_ptrs = out_ptr + assign[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_sum_kernel(src_ptr, out_ptr, num_rows, top_k, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, n] = sum_k src[t*K + k, n], in fp32, k in order (deterministic)."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < num_rows)[:, None] & (cols < N)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k in range(0, top_k):
        src = src_ptr + (rows * top_k + k)[:, None] * N + cols[None, :]
        acc += tl.load(src, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume unit stride along the reduction/column dim (no stride argument):
    then Triton knows the loads are contiguous and vectorises/pipelines them, whether or not
    the compiler that launches the kernel specialises stride-1 arguments."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def _grid_m_n(em, n_cols: int, cfg: dict) -> tuple:
    return (triton.cdiv(em, cfg["BLOCK_M"]) * triton.cdiv(n_cols, cfg["BLOCK_N"]),)


def gate_up_grouped(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_post: torch.Tensor,
    top_k: int,
    cfg: dict,
    activation: str = "silu",
) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H] → act(gate)·up per assignment, [T*K, I] in assignment order."""
    hidden, w13 = _unit_last_stride(hidden), _unit_last_stride(w13)
    num_tokens, hidden_size = hidden.shape
    inter = w13.shape[1] // 2
    num_assign = num_tokens * top_k
    out = torch.empty(num_assign, inter, dtype=hidden.dtype, device=hidden.device)
    em = sorted_ids.shape[0]
    wrap_triton(_gate_up_kernel)[_grid_m_n(em, inter, cfg)](
        hidden,
        w13,
        out,
        sorted_ids,
        expert_ids,
        num_post,
        num_assign,
        top_k,
        em,
        inter,
        hidden_size,
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        out.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        ACT=ACTIVATION_CODES[activation],
        IEEE=_dot_ieee(hidden.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def down_grouped(
    inter: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_post: torch.Tensor,
    cfg: dict,
    out: torch.Tensor | None = None,
    mul_weight: bool = True,
) -> torch.Tensor:
    """inter [T*K, I], w2 [E, H, I], topk_weights [T, K] → rows [T*K, H] in token order
    (row t*K + k: token t's k-th expert output, times its routing weight when `mul_weight`).
    `out`, if given, is any [T*K, H] tensor with unit column stride that receives the rows.
    """
    inter, w2 = _unit_last_stride(inter), _unit_last_stride(w2)
    num_assign, inter_size = inter.shape
    hidden_size = w2.shape[1]
    if out is None:
        out = torch.empty(num_assign, hidden_size, dtype=inter.dtype, device=inter.device)
    if out.stride(1) != 1:
        raise ValueError("down_grouped: out must have unit column stride")
    weights = topk_weights.reshape(-1)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    em = sorted_ids.shape[0]
    wrap_triton(_down_kernel)[_grid_m_n(em, hidden_size, cfg)](
        inter,
        w2,
        out,
        weights,
        sorted_ids,
        expert_ids,
        num_post,
        num_assign,
        em,
        hidden_size,
        inter_size,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        MUL_WEIGHT=bool(mul_weight),
        IEEE=_dot_ieee(inter.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def moe_sum(rows: torch.Tensor, top_k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows [T*K, H] (contiguous, token-major) → out [T, H] = sum over each token's K rows."""
    num_assign, hidden_size = rows.shape
    num_tokens = num_assign // top_k
    rows = rows.contiguous()
    if out is None:
        out = torch.empty(num_tokens, hidden_size, dtype=rows.dtype, device=rows.device)
    if not out.is_contiguous():
        raise ValueError("moe_sum: out must be contiguous")
    block_n = min(1024, max(16, 1 << (hidden_size - 1).bit_length()))
    block_r = max(1, 2048 // block_n)
    grid = (triton.cdiv(num_tokens, block_r), triton.cdiv(hidden_size, block_n))
    wrap_triton(_moe_sum_kernel)[grid](
        rows, out, num_tokens, top_k, hidden_size, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4
    )
    return out
