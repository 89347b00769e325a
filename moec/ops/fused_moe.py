"""`moec::fused_moe`: the routed experts of an MoE block, weighted and summed per token.

hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights f32 [T, K], topk_ids [T, K] → [T, H]:
what `moe_experts` followed by `moe_combine` computes, as one op, so that on CUDA the Triton
kernels of `moec.ops.triton` (align, gate/up GEMM with the activation fused, down GEMM with
the routing weight and the scatter to token order fused) replace the pair.

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

if importlib.util.find_spec("triton") is not None:
    from moec.ops.triton.fused_moe import fused_moe as fused_moe_triton
else:  # CPU-only install: the reference path needs no Triton
    fused_moe_triton = None


@triton_op("moec::fused_moe", mutates_args=())
def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_moe: unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    if hidden.is_cuda and fused_moe_triton is not None:
        return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, activation)
    expert_out = torch.ops.moec.moe_experts(hidden, w13, w2, topk_ids, activation)
    return moe_combine_ref(expert_out, topk_weights)
