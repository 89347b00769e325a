"""`moec::external_attention`: a layer's attention and KV-cache write, run by the runtime off the GPU.

An offloaded plan with placement `cpu` keeps the KV cache in host memory and computes decode
attention on the CPU (MoE-Lightning: at long contexts, moving q, k, v and the output across the
link costs far less than moving the cache, and the GPU's memory goes to expert pages instead).
The compiler then replaces each layer's `write_kv` + `paged_attention` pair with this op
(`moec.compiler.passes.external_attention`); at run time it hands the layer's new keys, values
and queries to the process's attention executor (`moec.runtime.host_attention.HostAttention`),
which writes them into its cache and returns the attention output on the query's device.
Opaque to the compiler, like `external_moe`.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from moec.ops.executor_slot import ExecutorSlot


class AttentionExecutor(Protocol):
    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
            block_tables: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, layer: int, scale: float,
            sliding_window: Optional[int]) -> torch.Tensor:
        """[T, H, D]: `write_kv` then `paged_attention` of layer `layer`, on the executor's cache."""


_slot: ExecutorSlot[AttentionExecutor] = ExecutorSlot()


def set_attention_executor(executor: AttentionExecutor | None, this_thread_only: bool = False) -> None:
    """Who runs `external_attention` (`moec.ops.executor_slot`: per thread, with a process-wide fallback)."""
    _slot.set(executor, this_thread_only)


def attention_executor() -> AttentionExecutor | None:
    """The executor the calling thread's `external_attention` calls reach."""
    return _slot.get()


@torch.library.custom_op("moec::external_attention", mutates_args=())
def external_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    executor = attention_executor()
    if executor is None:
        raise RuntimeError("moec::external_attention: no attention executor is set; load artifacts whose attention "
                           "runs on the CPU (offload placement cpu) with moec.runtime.Engine")
    return executor.run(query, key, value, slots, block_tables, seq_ids, positions, layer, scale, sliding_window)


@external_attention.register_fake
def _(query, key, value, slots, block_tables, seq_ids, positions, layer, scale, sliding_window=None):
    return torch.empty_like(query)
