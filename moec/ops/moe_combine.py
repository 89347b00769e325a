"""`moec::moe_combine`: weight each token's expert outputs by its routing weights and sum them."""

from __future__ import annotations

import torch
from torch.library import triton_op


def moe_combine_ref(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """expert_out [T, K, H], topk_weights f32 [T, K] → [T, H], summed in float32."""
    out = (expert_out.float() * topk_weights.unsqueeze(-1)).sum(dim=1)
    return out.to(expert_out.dtype)


@triton_op("moec::moe_combine", mutates_args=())
def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return moe_combine_ref(expert_out, topk_weights)
