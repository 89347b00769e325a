"""`moec::moe_router`: router logits → softmax → top-k → optional renormalisation.

A `triton_op`: export keeps it as one node (the MoE pass and `--explain` see it), and Inductor
traces its body. On CUDA the body is the fused Triton router (`moec.ops.triton.router`: one
kernel for the logits matvec, softmax and top-k, where the reference launches a cuBLAS GEMM with
its split-K reduction, softmax, a sort-based top-k and the renormalisation — 8 us of sort
kernels alone a layer at decode on an H200), compiled into the `.pt2` like `fused_moe`;
elsewhere the reference below is compiled like any other PyTorch code.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.library import triton_op

if importlib.util.find_spec("triton") is not None:
    from moec.ops.triton.router import MAX_EXPERTS, fused_router
else:  # CPU-only install: the reference needs no Triton
    fused_router, MAX_EXPERTS = None, 0


def moe_router_ref(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool):
    """Plain-PyTorch router, computed in float32 as Hugging Face does."""
    logits = F.linear(hidden, gate_weight)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@triton_op("moec::moe_router", mutates_args=())
def moe_router(
    hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H], gate_weight [E, H] → (topk_weights f32 [T, K], topk_ids i64 [T, K])."""
    if hidden.is_cuda and fused_router is not None and gate_weight.shape[0] <= MAX_EXPERTS:
        weights, ids, _ = fused_router(hidden, gate_weight, top_k, renormalize, count=False)
        return weights, ids
    return moe_router_ref(hidden, gate_weight, top_k, renormalize)
