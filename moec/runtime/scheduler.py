"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step first gives each running, decoding sequence its one token, then spends what is left
of the step's token budget on prompt chunks (running prefills first, then new arrivals). A long
prompt is thus split into chunks and never stalls the decoding sequences for more than one
budget's worth of work. New requests join between steps, finished ones leave and free their
blocks at once. When the KV cache runs out, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed from its tokens.
"""

from __future__ import annotations

from collections import deque

from moec.runtime.kv_cache import BlockAllocator, OutOfBlocks, blocks_needed
from moec.runtime.sequence import Sequence


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch: int, max_tokens_per_step: int):
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks now."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.blocks.release(self.allocator)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        try:
            seq.blocks.ensure_capacity(self.allocator, num_tokens, self.block_size)
            return True
        except OutOfBlocks:
            return False

    def reserve(self, seqs: list[Sequence], tokens: int) -> bool:
        """KV room for `tokens` more tokens past what each sequence has cached, without
        preempting anyone (a step launched ahead, `Engine._launch_ahead`); False if it lacks."""
        return all(self._grow(seq, seq.num_cached + tokens) for seq in seqs)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.blocks.release(self.allocator)
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's work as (sequence, tokens to feed), in running order."""
        while True:
            plan = self._plan()
            if plan or not self.running:
                return plan
            # running prompts all stuck on a full cache: give the older ones the newest one's blocks
            self._preempt(self.running[-1])

    def _plan(self) -> list[tuple[Sequence, int]]:
        plan: dict[Sequence, int] = {}
        preempted: set[Sequence] = set()  # not `in self.running`: that is O(batch) per sequence
        # 1. one token for every decoding sequence; preempt the newest when blocks run out
        for seq in list(self.running):
            if seq in preempted or seq.num_pending != 1:
                continue
            while not self._grow(seq, seq.num_cached + 1):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim)
                plan.pop(victim, None)
                if victim is seq:
                    break
            if seq not in preempted:
                plan[seq] = 1
        budget = self.max_tokens_per_step - len(plan)
        # 2. prompt chunks of running sequences, then 3. admit new ones, while the budget lasts
        for seq in self.running:
            if budget <= 0:
                break
            if seq not in plan and seq.num_pending > 1:
                take = min(seq.num_pending, budget)
                if self._grow(seq, seq.num_cached + take):
                    plan[seq] = take
                    budget -= take
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            take = min(seq.num_pending, budget)
            if blocks_needed(seq.num_cached + take, self.block_size) > self.allocator.num_free:
                break  # wait for blocks to free up rather than preempt running work for a newcomer
            self.waiting.popleft()
            self._grow(seq, seq.num_cached + take)
            self.running.append(seq)
            plan[seq] = take
            budget -= take
        return [(seq, plan[seq]) for seq in self.running if seq in plan]
