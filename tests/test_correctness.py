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


def test_streamed_pieces_join_to_each_completions_text(engine):
    """generate(on_text=...) (what `moe-runtime generate` prints as it decodes): each prompt's
    pieces, in order, are its completion's text, stop strings held back and cut as in the text."""
    full = engine.generate(PROMPTS[1], max_tokens=24)[0]
    stop = full.text[6:8]
    pieces = {0: [], 1: []}
    results = engine.generate(PROMPTS[1:3], max_tokens=24, stop=[stop],
                              on_text=lambda i, piece: pieces[i].append(piece))
    assert results[0].finish_reason == "stop" and stop not in results[0].text
    for i, r in enumerate(results):
        assert "".join(pieces[i]) == r.text and all(pieces[i])
    assert len(pieces[1]) > 1  # piece by piece, not once at the end


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 3}])
def test_logprobs_are_the_models_as_transformers_gives_them(engine, hf_model, sampling):
    """Each token's log-probability, and the most likely ones, from the model's own distribution
    (before temperature and top-k) as transformers computes it; asking for them changes no token."""
    asked = engine.generate(PROMPTS[:2], max_tokens=10, logprobs=3, **sampling)
    plain = engine.generate(PROMPTS[:2], max_tokens=10, **sampling)
    for prompt, result, other in zip(PROMPTS, asked, plain):
        assert result.token_ids == other.token_ids and other.logprobs is None
        ids = engine.encode(prompt)
        want = torch.log_softmax(hf_logits(hf_model, ids + result.token_ids[:-1])[len(ids) - 1:], dim=-1)
        assert [lp.token for lp in result.logprobs] == result.token_ids
        for row, lp in zip(want, result.logprobs):
            assert abs(lp.logprob - row[lp.token].item()) <= 1e-4
            top = row.topk(3)
            assert len(lp.top) == 3
            assert max(abs(got - w) for (_, got), w in zip(lp.top, top.values.tolist())) <= 1e-4
            assert all(abs(row[i].item() - got) <= 1e-4 for i, got in lp.top)
            if not sampling:  # greedy: the token taken is the most likely
                assert lp.top[0][0] == lp.token


def test_prompt_logprobs_are_the_models_as_transformers_gives_them(tiny_artifact, engine, hf_model):
    """vLLM's prompt_logprobs (OpenAI's echo + logprobs): every prompt token after the first, its
    log-probability given the ones before and the most likely there, as transformers computes them;
    the same with the prompts fed in chunks of 5 tokens and after preemptions (each token scored
    once); the generated tokens unchanged."""
    plain = engine.generate(PROMPTS, max_tokens=6, ignore_eos=True)

    def check(results):
        for prompt, result, other in zip(PROMPTS, results, plain):
            assert result.token_ids == other.token_ids and other.prompt_logprobs is None
            ids = engine.encode(prompt)
            want = torch.log_softmax(hf_logits(hf_model, ids), dim=-1)
            assert len(result.prompt_logprobs) == len(ids) and result.prompt_logprobs[0] is None
            for i, lp in enumerate(result.prompt_logprobs[1:], start=1):
                assert lp.token == ids[i] and abs(lp.logprob - want[i - 1, ids[i]].item()) <= 1e-4
                likelier = [1 + int((want[i - 1] > want[i - 1, ids[i]] + d).sum()) for d in (1e-4, -1e-4)]
                assert likelier[0] <= lp.rank <= likelier[1]  # vLLM's rank, within the logprobs' tolerance
                top = want[i - 1].topk(3)
                assert [t for t, _ in lp.top] == top.indices.tolist()
                assert max(abs(got - w) for (_, got), w in zip(lp.top, top.values.tolist())) <= 1e-4

    check(engine.generate(PROMPTS, max_tokens=6, ignore_eos=True, prompt_logprobs=3))
    budget = engine.scheduler.max_tokens_per_step
    engine.scheduler.max_tokens_per_step = 5
    try:
        check(engine.generate(PROMPTS, max_tokens=6, ignore_eos=True, prompt_logprobs=3))
    finally:
        engine.scheduler.max_tokens_per_step = budget
    small = Engine.load(tiny_artifact, num_blocks=3)
    check(small.generate(PROMPTS, max_tokens=6, ignore_eos=True, prompt_logprobs=3))
    assert small.scheduler.num_preemptions > 0 and small.allocator.num_used == 0


def test_logprobs_for_one_sequence_of_a_batch(engine):
    """Rows that ask and rows that do not share a step; 0 gives the token's own and no others."""
    from moec.runtime.sampler import SamplingParams

    seqs = [engine.new_sequence(p, SamplingParams(max_tokens=6, temperature=0, logprobs=n))
            for p, n in zip(PROMPTS, [None, 0, 5, None])]
    for seq in seqs:
        engine.scheduler.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    assert [len(s.output_logprobs) for s in seqs] == [0, 6, 6, 0]
    assert all(lp.top == [] and lp.logprob <= 0 for lp in seqs[1].output_logprobs)
    assert all(len(lp.top) == 5 and lp.top[0][0] == lp.token for lp in seqs[2].output_logprobs)
    assert engine.allocator.num_used == 0


def test_penalties_and_logit_bias_against_transformers(engine, hf_model):
    """Greedy decoding with OpenAI's penalties and a logit_bias equals a loop over transformers'
    logits adjusted by their formula, and differs from plain greedy decoding."""
    prompt_ids = engine.encode(PROMPTS[1])
    plain = engine.generate(PROMPTS[1], max_tokens=16, ignore_eos=True)[0].token_ids
    bias = {plain[0]: -5.0, plain[1]: 2.0}
    got = engine.generate(PROMPTS[1], max_tokens=16, ignore_eos=True, presence_penalty=0.6,
                          frequency_penalty=1.2, logit_bias=bias)[0].token_ids
    out: list[int] = []
    for _ in range(16):
        logits = hf_logits(hf_model, prompt_ids + out)[-1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - 1.2 * counts - 0.6 * (counts > 0).float()
        for token, value in bias.items():
            logits[token] += value
        out.append(int(logits.argmax()))
    assert got == out and got != plain


def test_repetition_penalty_against_transformers(engine, hf_model):
    """vLLM's repetition_penalty, greedy: a loop over transformers' logits through transformers'
    own RepetitionPenaltyLogitsProcessor (prompt and generated tokens) picks the same tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt_ids = engine.encode(PROMPTS[2])
    plain = engine.generate(PROMPTS[2], max_tokens=16, ignore_eos=True)[0].token_ids
    got = engine.generate(PROMPTS[2], max_tokens=16, ignore_eos=True, repetition_penalty=1.8)[0].token_ids
    penalise = RepetitionPenaltyLogitsProcessor(1.8)
    out: list[int] = []
    for _ in range(16):
        ids = torch.tensor([prompt_ids + out])
        logits = penalise(ids, hf_logits(hf_model, prompt_ids + out)[-1:])[0]
        out.append(int(logits.argmax()))
    assert got == out and got != plain


def test_stop_token_ids_and_min_tokens(engine, hf_model):
    """A stop token ends the output (kept in token_ids, not in the text, finish "stop"); below
    min_tokens it and EOS are ruled out, so greedy decoding takes the next most likely token."""
    plain = engine.generate(PROMPTS[0], max_tokens=12, ignore_eos=True)[0]
    j = next(j for j in range(1, 12) if plain.token_ids[j] not in plain.token_ids[:j])
    stopped = engine.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, stop_token_ids=[plain.token_ids[j]])[0]
    assert stopped.token_ids == plain.token_ids[: j + 1] and stopped.finish_reason == "stop"
    assert stopped.text == engine.generate(PROMPTS[0], max_tokens=j, ignore_eos=True)[0].text

    first = plain.token_ids[0]
    held = engine.generate(PROMPTS[0], max_tokens=4, stop_token_ids=[first], min_tokens=1)[0]
    logits = hf_logits(hf_model, engine.encode(PROMPTS[0]))[-1]
    logits[[first, engine.eos_id]] = float("-inf")
    assert held.token_ids[0] == int(logits.argmax()) != first
    # a stop string is held off as long: the greedy text's first piece stops at once, not below min_tokens
    piece = plain.text[:2]
    assert engine.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, stop=[piece])[0].text == ""
    late = engine.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, stop=[piece], min_tokens=4)[0]
    assert len(late.token_ids) >= 4 and late.text.startswith(piece)
