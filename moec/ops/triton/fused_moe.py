"""The routed-experts part of an MoE block from the Triton kernels: align → gate/up → down
(→ K-way sum), and the plain-PyTorch composition of the existing references to compare with.

Launches, all sized from shapes (no host sync, no data-dependent shapes, so the sequence can be
captured in a CUDA graph and traced with a symbolic token count): 3 for the sort/align, 1 per
GEMM, 1 for the K-way sum (none when K == 1).
"""

from __future__ import annotations

import copy

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moec.ops.moe_combine import moe_combine_ref
from moec.ops.moe_experts import moe_experts_ref
from moec.ops.triton.align import moe_align_block_size
from moec.ops.triton.configs import DYNAMIC_CONFIG, default_config, split_config
from moec.ops.triton.grouped_gemm import ACTIVATION_CODES, down_grouped, gate_up_grouped, moe_sum

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def select_config(num_tokens, num_experts: int, top_k: int) -> dict:
    """The default table's config for a concrete token count; DYNAMIC_CONFIG for a symbolic one
    (choosing by a symbolic size would guard on it and specialise the compiled graph)."""
    if isinstance(num_tokens, int):
        return default_config(num_tokens, num_experts, top_k)
    return copy.deepcopy(DYNAMIC_CONFIG)


def check_shapes(hidden, w13, w2, topk_weights, topk_ids, activation: str) -> None:
    """Raise ValueError naming the problem for inputs the kernels do not support."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"fused_moe: unknown activation {activation!r}; one of {sorted(ACTIVATION_CODES)}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"fused_moe: want hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
            f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    num_experts, two_i, hidden_size = w13.shape
    if two_i % 2 or tuple(w2.shape) != (num_experts, hidden_size, two_i // 2) or hidden.shape[1] != hidden_size:
        raise ValueError(
            f"fused_moe: inconsistent shapes hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    if topk_ids.dim() != 2 or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must be [T, K]"
        )
    if not 1 <= topk_ids.shape[1] <= num_experts:
        raise ValueError(f"fused_moe: top_k={topk_ids.shape[1]} with {num_experts} experts")
    if hidden.dtype not in SUPPORTED_DTYPES or w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(
            f"fused_moe: hidden/w13/w2 must share one of bf16/fp16/fp32; got {hidden.dtype}, {w13.dtype}, {w2.dtype}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    config: dict | None = None,
) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights
    [T, K] (f32); topk_ids [T, K] → [T, H] = sum_k w[t,k] * expert_{id[t,k]}(hidden[t]).

    `config`: see `moec.ops.triton.configs`; None picks the default for this token count.
    """
    check_shapes(hidden, w13, w2, topk_weights, topk_ids, activation)
    num_tokens, hidden_size = hidden.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    if config is None:
        config = select_config(num_tokens, num_experts, top_k)
    gate_up_cfg, down_cfg = split_config(config)
    if statically_known_true(num_tokens == 0):
        return hidden.new_empty(0, hidden_size)

    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, num_experts, gate_up_cfg["BLOCK_M"])
    inter = gate_up_grouped(hidden, w13, sorted_ids, expert_ids, num_post, top_k, gate_up_cfg, activation)
    if top_k == 1:
        out = torch.empty(num_tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
        down_grouped(inter, w2, topk_weights, sorted_ids, expert_ids, num_post, down_cfg, out=out)
        return out
    rows = down_grouped(inter, w2, topk_weights, sorted_ids, expert_ids, num_post, down_cfg)
    return moe_sum(rows, top_k)


def fused_moe_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The existing references composed (moe_experts_ref, then moe_combine_ref): the oracle."""
    return moe_combine_ref(moe_experts_ref(hidden, w13, w2, topk_ids, activation), topk_weights)
