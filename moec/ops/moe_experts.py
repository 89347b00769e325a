"""`moec::moe_experts`: each token's chosen experts, as a gated MLP (gate·up, act, down).

Output is per assignment, [T, K, H], unweighted: `moe_combine` applies the routing weights.
The reference groups assignments by expert (a sort, then one matmul per expert that received
tokens), which is what a grouped GEMM does on a GPU. Its shapes depend on the routing, so on
CPU it stays an opaque op that the compiled graph calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def moe_experts_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, activation: str
) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_ids [T, K]."""
    num_tokens, top_k = topk_ids.shape
    act = ACTIVATIONS[activation]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    rows = hidden[order // top_k]
    out = hidden.new_empty(num_tokens * top_k, hidden.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        sel = order[start : start + count]
        gate, up = F.linear(rows[start : start + count], w13[expert]).chunk(2, dim=-1)
        out[sel] = F.linear(act(gate) * up, w2[expert])
        start += count
    return out.view(num_tokens, top_k, hidden.shape[1])


@torch.library.custom_op("moec::moe_experts", mutates_args=())
def moe_experts(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, activation: str
) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    return moe_experts_ref(hidden, w13, w2, topk_ids, activation)


@moe_experts.register_fake
def _(hidden, w13, w2, topk_ids, activation):
    return hidden.new_empty(topk_ids.shape[0], topk_ids.shape[1], hidden.shape[1])
