"""The padded, static-buffer decode step that CUDA graphs replay, run directly on CPU.

On a GPU the engine captures one graph per batch bucket; the graph replays exactly the call
checked here (the first B rows are real, the rest pad into a scratch block). So the padding,
the static block tables and the scratch block are proven against transformers on CPU.
"""

from __future__ import annotations

import torch

from moec.runtime import Engine
from moec.runtime.decode_graphs import DecodeGraphs, batch_buckets
from moec.runtime.kv_cache import blocks_needed

PROMPTS = ["The mixture of experts", "Rain", "Once upon a time, in a kitchen far away, a baker"]


def with_padded_decode(engine: Engine) -> Engine:
    spec = engine.spec
    engine.decode_graphs = DecodeGraphs(
        engine.step_fn, engine.kv_cache, spec.max_batch, blocks_needed(spec.max_seq_len, spec.kv_block_size),
        engine.scratch_block, capture=False,
    )
    return engine


def test_batch_buckets_cover_every_batch():
    for max_batch in (1, 3, 8, 50, 128, 200):
        buckets = batch_buckets(max_batch)
        assert buckets == sorted(buckets) and buckets[-1] == max_batch and buckets[0] == 1
        for b in range(1, max_batch + 1):
            fit = next(x for x in buckets if x >= b)
            assert fit - b < (b if b <= 8 else 8 if b <= 64 else 16), (max_batch, b, fit)


def test_padded_decode_matches_transformers(tiny_artifact, hf_model):
    """3 sequences padded to the bucket of 4: every decode step's logits equal HF's."""
    engine = with_padded_decode(Engine.load(tiny_artifact))
    calls = []
    run = engine.decode_graphs.run
    engine.decode_graphs.run = lambda chunks, *ahead: calls.append(len(chunks)) or run(chunks, *ahead)
    results = engine.generate(PROMPTS, max_tokens=12, record_logits=True)
    assert calls and set(calls) == {3}, calls  # the decode steps went through the padded path
    for prompt, result in zip(PROMPTS, results):
        ids = engine.encode(prompt)
        with torch.no_grad():
            want = hf_model(torch.tensor([ids + result.token_ids[:-1]])).logits[0, len(ids) - 1:].float()
        got = torch.stack(result.logits)
        assert (got - want).abs().max().item() <= 1e-4
    assert engine.allocator.num_used == 0
    # padding rows wrote only the scratch block, which no sequence is ever given
    assert engine.scratch_block not in range(engine.allocator.num_free + engine.allocator.num_used)


def test_padded_decode_greedy_equals_direct_steps(tiny_artifact):
    direct = Engine.load(tiny_artifact).generate(PROMPTS * 2, max_tokens=16)
    padded = with_padded_decode(Engine.load(tiny_artifact)).generate(PROMPTS * 2, max_tokens=16)  # 6 → bucket 8
    assert [r.token_ids for r in padded] == [r.token_ids for r in direct]


def test_decode_graphs_take_only_single_token_steps(tiny_artifact):
    engine = with_padded_decode(Engine.load(tiny_artifact))
    graphs = engine.decode_graphs
    assert graphs.fits([([1], [5], 3, True)] * 2)
    assert not graphs.fits([([1], [5, 6], 3, True)])  # a prefill chunk
    assert not graphs.fits([([1], [5], 3, False)])  # a chunk that wants no logits
    assert not graphs.fits([([1], [5], 3, True)] * (engine.spec.max_batch + 1))


def test_failed_capture_stops_the_load_and_names_the_way_out(tiny_artifact):
    """A capture that fails (here: no CUDA at all) must not leave a half-working engine behind."""
    import pytest

    from moec.errors import CudaGraphError, MoecError

    engine = Engine.load(tiny_artifact)
    spec = engine.spec
    with pytest.raises(CudaGraphError, match="--no-cuda-graphs") as info:
        DecodeGraphs(engine.step_fn, engine.kv_cache, spec.max_batch,
                     blocks_needed(spec.max_seq_len, spec.kv_block_size), engine.scratch_block)
    assert isinstance(info.value, MoecError) and "\n" not in str(info.value)


def _greedy_by_length(engine: Engine, prompts: list[str], lengths: list[int]) -> list[list[int]]:
    from moec.runtime.sampler import SamplingParams

    seqs = [engine.new_sequence(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for p, n in zip(prompts, lengths)]
    for seq in seqs:
        engine.scheduler.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    return [list(seq.output_ids) for seq in seqs]


def test_padded_decode_rows_reused_by_other_sequences(tiny_artifact):
    """Sequences end at different steps, so a row of the static host table passes to another
    sequence with fewer blocks (its stale tail is never read) and the batch crosses buckets."""
    prompts = [PROMPTS[2] * 3, "Rain", PROMPTS[0], PROMPTS[2], "A"]
    lengths = [5, 40, 9, 23, 2]
    direct = _greedy_by_length(Engine.load(tiny_artifact), prompts, lengths)
    engine = with_padded_decode(Engine.load(tiny_artifact))
    padded = _greedy_by_length(engine, prompts, lengths)
    assert padded == direct and [len(t) for t in padded] == lengths
    assert engine.allocator.num_used == 0
