"""`moec::external_moe`: an MoE layer's routed experts, run by the runtime instead of the graph.

For an artifact whose experts do not sit in one device's memory — offloaded to the host, or
split across ranks by expert parallelism — the compiler replaces each `fused_moe(hidden, w13,
w2, ...)` with this op and the layer's number: the graph then holds no expert weights (one
graph for every rank and every placement), and at run time the op hands the layer to the
process's expert executor. The runtime's `ExpertPager` pages the weights in (resident, one
layer ahead through a double buffer, or a few chosen experts through a cache) and runs
`fused_moe`; its expert-parallel executor dispatches the tokens to the ranks that own their
experts and combines the results. Opaque to the compiler, so AOTInductor calls it through its
proxy executor; the engine runs such artifacts without CUDA graphs.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ExpertExecutor(Protocol):
    def run(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            activation: str, plan: str) -> torch.Tensor:
        """[T, H]: what `fused_moe` gives with MoE layer `layer`'s experts."""


_executor: ExpertExecutor | None = None


def set_expert_executor(executor: ExpertExecutor | None) -> None:
    """Who runs `external_moe` in this process (one: the loaded engine's)."""
    global _executor
    _executor = executor


@torch.library.custom_op("moec::external_moe", mutates_args=())
def external_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    layer: int,
    activation: str,
    plan: str = "",
) -> torch.Tensor:
    if _executor is None:
        raise RuntimeError("moec::external_moe: no expert executor is set; load artifacts whose experts live "
                           "outside the graph (offload, expert parallelism) with moec.runtime.Engine")
    return _executor.run(layer, hidden, topk_weights, topk_ids, activation, plan)


@external_moe.register_fake
def _(hidden, topk_weights, topk_ids, layer, activation, plan=""):
    return torch.empty_like(hidden)
