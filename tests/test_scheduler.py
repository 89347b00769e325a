"""Continuous-batching decisions, without a model."""

from __future__ import annotations

from moec.runtime.kv_cache import BlockAllocator
from moec.runtime.sampler import SamplingParams
from moec.runtime.scheduler import Scheduler
from moec.runtime.sequence import Sequence


def seq(prompt_len: int, generated: int = 0, cached: int | None = None) -> Sequence:
    s = Sequence(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=64), detok=None, generator=None)
    s.output_ids = [7] * generated
    s.num_cached = s.num_tokens - 1 if cached is None and generated else (cached or 0)
    return s


def run(scheduler: Scheduler, plan) -> None:
    """Pretend the step ran: the fed tokens are cached; decoders produce one more token."""
    for s, take in plan:
        s.num_cached += take
        if s.num_cached == s.num_tokens:
            s.output_ids.append(7)


def test_decodes_first_then_prompt_chunks_within_budget():
    sch = Scheduler(BlockAllocator(64), block_size=4, max_batch=8, max_tokens_per_step=10)
    decoding = seq(5)
    sch.add(decoding)
    run(sch, sch.schedule())  # prefill of 5
    long = seq(30)
    sch.add(long)
    plan = sch.schedule()
    assert plan == [(decoding, 1), (long, 9)]  # the long prompt gets what the decoder leaves
    run(sch, plan)
    assert sch.schedule() == [(decoding, 1), (long, 9)]


def test_admission_bounded_by_max_batch_and_free_blocks():
    sch = Scheduler(BlockAllocator(4), block_size=4, max_batch=2, max_tokens_per_step=100)
    a, b, c = seq(4), seq(4), seq(4)
    for s in (a, b, c):
        sch.add(s)
    plan = sch.schedule()
    assert [s for s, _ in plan] == [a, b] and list(sch.waiting) == [c]
    big = Scheduler(BlockAllocator(2), block_size=4, max_batch=8, max_tokens_per_step=100)
    x, y = seq(8), seq(4)
    big.add(x)
    big.add(y)
    assert [s for s, _ in big.schedule()] == [x]  # y waits for blocks instead of failing


def test_out_of_blocks_preempts_newest_and_finish_frees():
    alloc = BlockAllocator(3)
    sch = Scheduler(alloc, block_size=4, max_batch=4, max_tokens_per_step=100)
    old, new = seq(4), seq(7)
    sch.add(old)
    sch.add(new)
    run(sch, sch.schedule())  # old: 1 block, new: 2 blocks; cache full
    assert alloc.num_free == 0
    plan = sch.schedule()  # old needs a 2nd block for position 5... it has 4 cached + 1 generated
    assert [s for s, _ in plan] == [old]
    assert list(sch.waiting) == [new] and new.num_cached == 0 and new.num_preemptions == 1
    sch.finish(old)
    assert alloc.num_free == 3 - len(new.blocks.blocks)
    plan = sch.schedule()
    assert plan == [(new, new.num_tokens)]  # recomputed from all its tokens


def test_stuck_prefills_make_progress():
    alloc = BlockAllocator(4)
    sch = Scheduler(alloc, block_size=4, max_batch=4, max_tokens_per_step=8)
    a, b = seq(14), seq(14)
    sch.add(a)
    sch.add(b)
    for _ in range(20):
        plan = sch.schedule()
        assert plan, "the scheduler must never stall with work left"
        run(sch, plan)
        for s in list(sch.running):
            if s.output_ids:
                sch.finish(s)
        if not sch.has_work():
            break
    assert not sch.has_work() and alloc.num_free == 4
