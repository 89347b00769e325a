"""`moec::fused_moe`: the routed experts of an MoE block, weighted and summed per token.

hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights f32 [T, K], topk_ids [T, K] → [T, H]:
what `moe_experts` followed by `moe_combine` computes, as one op, so that on CUDA the Triton
kernels of `moec.ops.triton` (align, gate/up GEMM with the activation fused, down GEMM with
the routing weight and the scatter to token order fused) replace the pair.

`plan` (a string constant in the graph, see `moec.ops.triton.configs.parse_plan`) is the
compile-time tuner's choice for this call: Triton configs per token range, or the
`torch._grouped_mm` path; "" is the untuned default. The runtime never chooses or tunes.

A `triton_op`: export keeps it as one node; Inductor/AOTInductor trace its body. On CUDA tensors
the body launches the kernels through `torch.library.wrap_triton`, which AOTInductor compiles
into the `.pt2` as cubin (no Python, no Triton at run time). Elsewhere the body is the
reference: `moec::moe_experts` (opaque: its shapes depend on the routing) then the combine.
"""

from __future__ import annotations

import importlib.util

import torch
from torch.library import triton_op

from moec.ops.moe_combine import moe_combine_ref
from moec.ops.moe_experts import ACTIVATIONS
from moec.ops.triton.configs import parse_plan

if importlib.util.find_spec("triton") is not None:
    from moec.ops.triton import moe_permute
    from moec.ops.triton.align import align_scatter, expert_histograms
    from moec.ops.triton.configs import GROUPED_MM_GATE_UP, MAX_EXPERTS, split_config
    from moec.ops.triton.fused_moe import fused_moe as fused_moe_triton
    from moec.ops.triton.grouped_gemm import gate_up_grouped
else:  # CPU-only install: the reference path needs no Triton
    fused_moe_triton = moe_permute = None
    MAX_EXPERTS = 0


def fused_moe_grouped_mm(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    row_kernels: bool | None = None,
) -> torch.Tensor:
    """The CUTLASS alternative the tuner times against the Triton kernels: assignments sorted by
    expert (stable), `torch._grouped_mm` for gate/up and for down, the activation between, and
    the weighted sum per token in fp32 in a fixed order (deterministic). Static shapes only: the
    per-expert row ends come from a scan or a searchsorted, not a bincount.

    `row_kernels` (default: on CUDA tensors) orders the assignments with the align kernels
    (count, scan and one scatter, `align_scatter(order=True)`, which also gives the gate/up's
    padded blocks; a stable sort is a radix sort of many launches),
    runs gate/up as the Triton GEMM (`configs.GROUPED_MM_GATE_UP`: the activation fused, x read
    in place, each row written where the sorted order puts it: no gather of x, no [T*K, 2I]
    pre-activation, no activation pass) and combines with the Triton kernels of
    `moec.ops.triton.moe_permute`, whose launch configs do not depend on the token count Inductor
    compiled for; CUTLASS runs the down GEMM. Otherwise (and above `MAX_EXPERTS`) the same steps
    are aten ops and two grouped GEMMs (the reference, and what runs on CPU)."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_experts, two_i, _ = w13.shape
    if row_kernels is None:
        row_kernels = hidden.is_cuda and moe_permute is not None
    if row_kernels and num_experts <= MAX_EXPERTS:  # the align kernels' count/scan/scatter, no radix sort
        hist = expert_histograms(topk_ids, num_experts)
        gate_up_cfg, _ = split_config(GROUPED_MM_GATE_UP)
        # one scatter: the gate/up's padded blocks, and each row's place in the unpadded order
        *align, offs, position = align_scatter(hist, gate_up_cfg["BLOCK_M"], order=True)
        h = gate_up_grouped(hidden, w13, *align, top_k, gate_up_cfg, activation, out_rows=position)  # [T*K, I], sorted rows
        y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # [T*K, H], sorted rows
        return moe_permute.combine_rows(y, position, topk_weights)
    sorted_experts, order = torch.sort(topk_ids.reshape(-1), stable=True)
    experts = torch.arange(num_experts, device=hidden.device, dtype=sorted_experts.dtype)
    offs = torch.searchsorted(sorted_experts, experts, right=True).to(torch.int32)
    position = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    if row_kernels:
        x = moe_permute.gather_rows(hidden, order, top_k)
    else:
        x = hidden.index_select(0, order // top_k)
    gate_up = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)  # [T*K, 2I], sorted rows
    if row_kernels:
        h = moe_permute.gated_act(gate_up, activation)
    else:
        h = ACTIVATIONS[activation](gate_up[:, : two_i // 2]) * gate_up[:, two_i // 2 :]
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # [T*K, H], sorted rows
    if row_kernels:
        return moe_permute.combine_rows(y, position, topk_weights)
    rows = y.index_select(0, position)  # back to assignment order
    return moe_combine_ref(rows.view(num_tokens, top_k, hidden_size), topk_weights)


@triton_op("moec::fused_moe", mutates_args=())
def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    plan: str = "",
) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_moe: unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    parsed = parse_plan(plan)
    if hidden.is_cuda:
        if parsed is not None and parsed["path"] == "grouped_mm":
            return fused_moe_grouped_mm(hidden, w13, w2, topk_weights, topk_ids, activation)
        if fused_moe_triton is not None:
            return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, activation, plan=parsed)
    expert_out = torch.ops.moec.moe_experts(hidden, w13, w2, topk_ids, activation)
    return moe_combine_ref(expert_out, topk_weights)
