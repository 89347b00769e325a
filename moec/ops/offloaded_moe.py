"""`moec::offloaded_moe`: `fused_moe` whose expert weights are not in the graph but paged in.

For an artifact compiled with `offload`, the compiler replaces each `fused_moe(hidden, w13, w2,
...)` with this op and a layer number: the graph then holds no expert weights, and at run time
the op asks the process's expert source (the runtime's `ExpertPager`) for that layer's weights —
resident on the device, copied from host memory one layer ahead, or, for a few tokens, only the
experts they chose, from a cache — and runs `fused_moe` on them. Opaque to the compiler (its weights come from outside the graph), so AOTInductor calls it
through its proxy executor; the engine runs such artifacts without CUDA graphs.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ExpertSource(Protocol):
    def experts(self, layer: int, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w13 [E', 2I, H], w2 [E', H, I], ids [T, K]) for MoE layer `layer`, ready on the compute
        device: the layer's experts and `topk_ids` as they are, or a cache of E' experts holding
        every one the tokens chose and the ids mapped to its slots."""


_source: ExpertSource | None = None


def set_expert_source(source: ExpertSource | None) -> None:
    """Where `offloaded_moe` gets its weights (one per process: the loaded offloaded engine)."""
    global _source
    _source = source


@torch.library.custom_op("moec::offloaded_moe", mutates_args=())
def offloaded_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    layer: int,
    activation: str,
    plan: str = "",
) -> torch.Tensor:
    if _source is None:
        raise RuntimeError("moec::offloaded_moe: no expert source is set; load offloaded artifacts with "
                           "moec.runtime.Engine, which pages the experts in")
    w13, w2, ids = _source.experts(layer, topk_ids)
    return torch.ops.moec.fused_moe(hidden, w13, w2, topk_weights, ids, activation, plan)


@offloaded_moe.register_fake
def _(hidden, topk_weights, topk_ids, layer, activation, plan=""):
    return torch.empty_like(hidden)
