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

from moec.ops.executor_slot import ExecutorSlot


class ExpertExecutor(Protocol):
    def run(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            activation: str, plan: str) -> torch.Tensor:
        """[T, H]: what `fused_moe` gives with MoE layer `layer`'s experts."""


_slot: ExecutorSlot[ExpertExecutor] = ExecutorSlot()


def set_expert_executor(executor: ExpertExecutor | None, this_thread_only: bool = False) -> None:
    """Who runs `external_moe` (`moec.ops.executor_slot`: per thread, with a process-wide fallback)."""
    _slot.set(executor, this_thread_only)


def expert_executor() -> ExpertExecutor | None:
    """The executor the calling thread's `external_moe` calls reach."""
    return _slot.get()


@torch.library.custom_op("moec::external_moe", mutates_args=())
def external_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    layer: int,
    activation: str,
    plan: str = "",
) -> torch.Tensor:
    executor = expert_executor()
    if executor is None:
        raise RuntimeError("moec::external_moe: no expert executor is set; load artifacts whose experts live "
                           "outside the graph (offload, expert parallelism) with moec.runtime.Engine")
    return executor.run(layer, hidden, topk_weights, topk_ids, activation, plan)


@external_moe.register_fake
def _(hidden, topk_weights, topk_ids, layer, activation, plan=""):
    return torch.empty_like(hidden)
