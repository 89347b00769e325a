"""Block allocation accounting and the flattened step inputs of a mixed prefill/decode batch."""

from __future__ import annotations

import pytest
import torch

from moec.errors import RequestError
from moec.ops.paged_attention import slot_mapping, write_kv
from moec.runtime.kv_cache import (
    BlockAllocator,
    OutOfBlocks,
    SequenceBlocks,
    StepChunk,
    allocate_kv_cache,
    blocks_needed,
    build_step_inputs,
)


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_accounting():
    alloc = BlockAllocator(8)
    assert (alloc.num_free, alloc.num_used, alloc.usage) == (8, 0, 0.0)
    a = alloc.allocate(3)
    b = alloc.allocate(2)
    assert len(set(a + b)) == 5 and all(0 <= x < 8 for x in a + b)
    assert (alloc.num_free, alloc.num_used, alloc.usage) == (3, 5, 5 / 8)
    assert alloc.allocate(0) == []
    alloc.free(a)
    assert (alloc.num_free, alloc.num_used) == (6, 2)
    c = alloc.allocate(6)
    assert not set(c) & set(b)
    alloc.free(b + c)
    assert (alloc.num_free, alloc.num_used, alloc.usage) == (8, 0, 0.0)


def test_out_of_blocks_allocates_nothing():
    alloc = BlockAllocator(4)
    held = alloc.allocate(3)
    with pytest.raises(OutOfBlocks, match="need 2 blocks, 1 of 4 free"):
        alloc.allocate(2)
    assert (alloc.num_free, alloc.num_used) == (1, 3)
    assert isinstance(OutOfBlocks("x"), RequestError)  # uncaught, it prints as one line

    seq = SequenceBlocks(list(held))
    with pytest.raises(OutOfBlocks):
        seq.ensure_capacity(alloc, 5 * 4, block_size=4)  # needs 2 more, 1 free
    assert seq.blocks == held and alloc.num_free == 1


def test_double_free_and_foreign_free_raise_and_change_nothing():
    alloc = BlockAllocator(4)
    a = alloc.allocate(2)
    alloc.free(a[:1])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a)  # a[0] already free: a[1] must stay allocated
    assert (alloc.num_free, alloc.num_used) == (3, 1)
    with pytest.raises(ValueError):
        alloc.free([a[1], a[1]])
    with pytest.raises(ValueError):
        alloc.free([99])
    assert (alloc.num_free, alloc.num_used) == (3, 1)
    alloc.free([a[1]])
    assert alloc.num_free == 4


def test_sequence_blocks_grow_by_whole_blocks():
    alloc = BlockAllocator(10)
    seq = SequenceBlocks()
    assert len(seq.ensure_capacity(alloc, 5, block_size=4)) == 2
    assert seq.ensure_capacity(alloc, 8, block_size=4) == []
    assert len(seq.ensure_capacity(alloc, 9, block_size=4)) == 1
    assert len(seq.blocks) == 3 and seq.capacity(4) == 12 and alloc.num_used == 3
    seq.release(alloc)
    assert seq.blocks == [] and alloc.num_used == 0


def test_allocate_kv_cache_shape():
    kv = allocate_kv_cache(2, 6, 4, 3, 8, torch.float16, "cpu")
    assert kv.shape == (2, 2, 6, 4, 3, 8) and kv.dtype == torch.float16
    assert not kv.any()


def test_mixed_batch_step_inputs():
    """A 5-token prefill from position 0 and one decode token at position 9, block_size 4."""
    chunks = [([3, 7], [10, 11, 12, 13, 14], 0, True), StepChunk([1, 2, 5], [99], 9, True)]
    inp = build_step_inputs(chunks, device="cpu", block_size=4)
    assert all(t.dtype == torch.int64 for t in inp.values())
    assert inp["input_ids"].tolist() == [10, 11, 12, 13, 14, 99]
    assert inp["positions"].tolist() == [0, 1, 2, 3, 4, 9]
    assert inp["seq_ids"].tolist() == [0, 0, 0, 0, 0, 1]
    assert inp["block_tables"].tolist() == [[3, 7, 0], [1, 2, 5]]
    assert inp["logits_indices"].tolist() == [4, 5]

    no_prefill_logits = build_step_inputs([(chunks[0][0], chunks[0][1], 0, False), chunks[1]])
    assert no_prefill_logits["logits_indices"].tolist() == [5]
    assert build_step_inputs(chunks, all_logits=True)["logits_indices"].tolist() == [0, 1, 2, 3, 4, 5]
    # prompt scoring: positions 1..3 of the prefill before its last token; the sampled rows named
    scored = build_step_inputs(chunks, score={0: range(1, 4)})
    assert scored["logits_indices"].tolist() == [1, 2, 3, 4, 5] and scored["sample_rows"].tolist() == [3, 4]
    middle = build_step_inputs([(chunks[0][0], chunks[0][1], 0, False), chunks[1]], score={0: [0, 4]})
    assert middle["logits_indices"].tolist() == [0, 4, 5] and middle["sample_rows"].tolist() == [2]

    # The kernel's slot arithmetic puts each token where the tables say.
    kv = allocate_kv_cache(1, 8, 4, 1, 1, torch.float32, "cpu")
    marks = torch.arange(1, 7, dtype=torch.float32)[:, None, None]
    write_kv(kv, 0, marks, -marks, slot_mapping(inp["block_tables"], inp["seq_ids"], inp["positions"], 4))
    expected = {(3, 0): 1, (3, 1): 2, (3, 2): 3, (3, 3): 4, (7, 0): 5, (5, 1): 6}  # (block, slot) → mark
    for (block, slot), mark in expected.items():
        assert kv[0, 0, block, slot, 0, 0].item() == mark and kv[0, 1, block, slot, 0, 0].item() == -mark
    assert (kv != 0).sum().item() == 2 * len(expected)


def test_step_inputs_reject_bad_chunks():
    with pytest.raises(ValueError, match="cannot hold"):
        build_step_inputs([([1], [5, 6], 3, True)], block_size=4)  # positions 3..4 need 2 blocks
    with pytest.raises(ValueError):
        build_step_inputs([([1], [], 0, True)])
    with pytest.raises(ValueError):
        build_step_inputs([])


def test_write_kv_places_every_token():
    """Every token's key and value land at its slot of its layer (the CPU path; the Triton one is
    tested in tests/test_paged_attention.py), nothing else changes."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 2, 6, 4, 2, 8, generator=g)
    before = kv.clone()
    slots = torch.randperm(24, generator=g)[:9]
    key, value = torch.randn(9, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    write_kv(kv, 1, key, value, slots)
    planes = kv[1].view(2, 24, 2, 8)
    assert torch.equal(planes[0, slots], key) and torch.equal(planes[1, slots], value)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(planes[:, untouched], before[1].view(2, 24, 2, 8)[:, untouched])
    assert torch.equal(kv[0], before[0])
