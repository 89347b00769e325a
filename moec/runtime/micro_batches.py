"""One step as several micro-batches in flight at once: CGOPipe's schedule for offloaded artifacts.

An offloaded plan with n micro-batches splits each step's sequences into n groups of balanced
work (`balanced_micro_batches`, MoE-Lightning's Algorithm 2) and runs the compiled graph on every
group at once, one thread each. The threads share the expert pager, which brings each streamed
layer in once for all of them and overwrites a slot only after every micro-batch has moved past
it; and while one micro-batch's attention runs on the CPU (placement `cpu`), another's dense
work and experts run on the GPU, and the next layer's pages cross the link. The compiled graph
releases the GIL while it runs, and the CPU attention's torch ops do too, so the threads overlap
for real. Each micro-batch's logits come back in the step's chunk order.
"""

from __future__ import annotations

import heapq
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence

import torch

from moec.ops.external_attention import attention_executor, set_attention_executor
from moec.ops.external_moe import expert_executor, set_expert_executor
from moec.runtime.kv_cache import build_step_inputs


def balanced_micro_batches(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices of `sizes` in at most `count` groups of near-equal total size: longest first, each to
    the group with the least so far (Algorithm 2; within 4/3 of the best split). Groups keep the
    indices in ascending order; empty groups are dropped."""
    if count < 1:
        raise ValueError(f"micro-batch count must be >= 1, got {count}")
    heap = [(0, g) for g in range(min(count, len(sizes)))]
    groups: list[list[int]] = [[] for _ in heap]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (total + sizes[i], g))
    return [sorted(g) for g in groups if g]


def chunk_work(chunk) -> int:
    """What a chunk costs a step, for balancing: its tokens attend to everything before them, so
    its context after the step (start + new tokens), as the plan's per-request length."""
    _, token_ids, start, _ = chunk
    return start + len(token_ids)


class MicroBatchRunner:
    """Runs a step's chunks as the plan's micro-batches, each through `step_fn` in its own thread."""

    def __init__(self, step_fn, pager, count: int, device: torch.device, block_size: int):
        self.step_fn, self.pager, self.count = step_fn, pager, count
        self.device, self.block_size = device, block_size
        self.pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="moec-micro-batch")
        self.steps = 0  # steps that ran as more than one micro-batch

    def run(self, chunks: Sequence, kv_cache: torch.Tensor) -> torch.Tensor:
        """The step's logits, rows in chunk order (as one call of `step_fn` on all chunks gives)."""
        groups = balanced_micro_batches([chunk_work(c) for c in chunks], self.count)
        # the workers' graph calls reach the executors of the engine whose step this is
        experts, attention = expert_executor(), attention_executor()

        def one(index: int) -> torch.Tensor:
            set_expert_executor(experts, this_thread_only=True)
            set_attention_executor(attention, this_thread_only=True)
            part = [chunks[i] for i in groups[index]]
            inputs = build_step_inputs(part, device=self.device, block_size=self.block_size)
            with self.pager.micro_batch(index):
                return self.step_fn(inputs["input_ids"], inputs["positions"], inputs["seq_ids"],
                                    inputs["block_tables"], kv_cache, inputs["logits_indices"])

        with self.pager.micro_batches(len(groups)):
            parts = list(self.pool.map(one, range(len(groups))))
        self.steps += len(groups) > 1
        # each part's rows are its chunks that want logits, in its order: put them back in the step's
        rows = [i for g in groups for i in g if chunks[i][3]]
        order = sorted(range(len(rows)), key=rows.__getitem__)
        logits = torch.cat(parts)
        return logits if order == list(range(len(rows))) else logits[torch.tensor(order, device=logits.device)]
