"""`moec::moe_router`: router logits → softmax → top-k → optional renormalisation.

A `triton_op`: export keeps it as one node (the MoE pass and `--explain` see it), and Inductor
traces its body, so on CPU the reference below is compiled into the artifact like any other
PyTorch code. A fused Triton kernel for CUDA slots in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op


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
    return moe_router_ref(hidden, gate_weight, top_k, renormalize)
