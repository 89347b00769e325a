"""The compiled artifact against Hugging Face transformers eager on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from moec.runtime import Engine
from moec.runtime.kv_cache import SequenceBlocks, build_step_inputs

PROMPTS = [
    "The mixture of experts",
    "Once upon a time, in a kitchen far away, a baker",
    "Rain",
    "Printing presses changed how people shared ideas, and the weather of the",
]


@pytest.fixture(scope="module")
def engine(tiny_artifact) -> Engine:
    return Engine.load(tiny_artifact)


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def test_prefill_logits_match_transformers(engine, hf_model):
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        blocks = SequenceBlocks()
        blocks.ensure_capacity(engine.allocator, len(ids), engine.spec.kv_block_size)
        inputs = build_step_inputs([(blocks.blocks, ids, 0, True)], device=engine.device, all_logits=True)
        got = engine.step_fn(inputs["input_ids"], inputs["positions"], inputs["seq_ids"], inputs["block_tables"],
                             engine.kv_cache, inputs["logits_indices"])
        engine.allocator.free(blocks.blocks)
        want = hf_logits(hf_model, ids)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


def test_every_decode_step_matches_transformers(engine, hf_model):
    """A batch of different lengths decoded together: each step's logits equal HF on the same prefix."""
    results = engine.generate(PROMPTS, max_tokens=24, record_logits=True)
    for prompt, result in zip(PROMPTS, results):
        ids = engine.encode(prompt)
        full = ids + result.token_ids[:-1]
        want = hf_logits(hf_model, full)[len(ids) - 1:]
        got = torch.stack(result.logits)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4
    assert engine.allocator.num_used == 0


def test_greedy_tokens_identical_to_transformers_generate(engine, hf_model):
    results = engine.generate(PROMPTS, max_tokens=32)
    eos = hf_model.config.eos_token_id
    for prompt, result in zip(PROMPTS, results):
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=32, do_sample=False, pad_token_id=eos)
        want = out[0, len(ids):].tolist()
        if eos in want:
            want = want[: want.index(eos) + 1]
        assert result.token_ids == want, prompt
        assert result.finish_reason == ("stop" if want[-1] == eos else "length")


def test_chunked_prefill_equals_one_shot(engine):
    """Prompts fed in small chunks (tight step budget) give the same tokens as one-shot prefill."""
    want = [r.token_ids for r in engine.generate(PROMPTS, max_tokens=8)]
    budget = engine.scheduler.max_tokens_per_step
    engine.scheduler.max_tokens_per_step = 5
    try:
        got = [r.token_ids for r in engine.generate(PROMPTS, max_tokens=8)]
        assert engine.stats.steps > 8 + max(len(engine.encode(p)) for p in PROMPTS) // 5
    finally:
        engine.scheduler.max_tokens_per_step = budget
    assert got == want


def test_preemption_under_a_small_cache_recomputes_exactly(tiny_artifact, engine):
    """Four sequences share 6 blocks of 16 positions: the scheduler must preempt and recompute,
    and the tokens must not change."""
    want = [r.token_ids for r in engine.generate(PROMPTS, max_tokens=30, ignore_eos=True)]
    small = Engine.load(tiny_artifact, num_blocks=6)
    got = [r.token_ids for r in small.generate(PROMPTS, max_tokens=30, ignore_eos=True)]
    assert small.scheduler.num_preemptions > 0
    assert got == want
    assert small.allocator.num_used == 0


def test_sampled_generation_is_reproducible_with_seed(engine):
    a = engine.generate(PROMPTS[:2], max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    b = engine.generate(PROMPTS[:2], max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    c = engine.generate(PROMPTS[:2], max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_stop_string_truncates_output(engine):
    full = engine.generate(PROMPTS[1], max_tokens=24)[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate(PROMPTS[1], max_tokens=24, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
