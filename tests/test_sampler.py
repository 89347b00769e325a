"""The sampler: greedy, top-k, top-p, seeds, and the distribution it draws from."""

from __future__ import annotations

import pytest
import torch

from moec.errors import RequestError
from moec.runtime.sampler import (Sampler, SamplingParams, _filtered_sorted_probs, adjust_logits, make_generator,
                                  token_logprobs)

V = 50


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits, params, generators=None, outputs=None):
    if isinstance(params, SamplingParams):
        params = [params] * logits.shape[0]
    return Sampler().sample(logits, params, generators or [None] * logits.shape[0], outputs)


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = sample(logits, SamplingParams(temperature=0))
    assert out.dtype == torch.int64 and out.tolist() == logits.argmax(-1).tolist()


def test_top_k_1_is_argmax():
    logits = random_logits(8)
    torch.manual_seed(0)
    assert sample(logits, SamplingParams(top_k=1, temperature=1.5)).tolist() == logits.argmax(-1).tolist()


def test_tiny_top_p_is_argmax():
    logits = random_logits(8)
    torch.manual_seed(0)
    assert sample(logits, SamplingParams(top_p=1e-6)).tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_samples_different_seed_different():
    logits = random_logits(1).expand(64, V).contiguous()
    params = SamplingParams(seed=0)

    def draws(seed):
        return sample(logits, params, [make_generator(seed, "cpu")] + [None] * 63)[0].item()

    def run(seed):  # one generator across many steps, as a request sees it
        g = make_generator(seed, "cpu")
        return [sample(logits[:1], params, [g]).item() for _ in range(100)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert draws(7) == draws(7)


def test_seeded_row_does_not_depend_on_its_batch():
    logits = random_logits(5, seed=3)
    mine = SamplingParams(seed=11, top_k=10, top_p=0.9, temperature=0.8)
    alone = sample(logits[2:3], [mine], [make_generator(11, "cpu")])
    others = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(top_p=0.5), SamplingParams(seed=4)]
    params = others[:2] + [mine] + others[2:]
    gens = [None, None, make_generator(11, "cpu"), None, make_generator(4, "cpu")]
    torch.manual_seed(123)
    assert sample(logits, params, gens)[2].item() == alone.item()


def empirical(counts_of: torch.Tensor) -> torch.Tensor:
    return torch.bincount(counts_of, minlength=V).float() / counts_of.numel()


def test_distribution_matches_softmax():
    row = random_logits(1, seed=5)[0] / 3
    torch.manual_seed(0)
    got = empirical(sample(row.expand(20000, V), SamplingParams(temperature=1.0)))
    assert (got - torch.softmax(row, -1)).abs().max().item() < 0.02
    got = empirical(sample(row.expand(20000, V), SamplingParams(temperature=0.5)))
    assert (got - torch.softmax(row / 0.5, -1)).abs().max().item() < 0.02


def test_top_k_and_top_p_renormalise_over_their_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-9
    logits = probs.log()[None].expand(20000, V)
    torch.manual_seed(0)
    got = empirical(sample(logits, SamplingParams(top_k=3)))
    assert (got[:3] - torch.tensor([4, 3, 2]) / 9).abs().max() < 0.02 and got[3:].sum() == 0
    got = empirical(sample(logits, SamplingParams(top_p=0.65)))  # 0.4 + 0.3 >= 0.65: keep two
    assert (got[:2] - torch.tensor([4, 3]) / 7).abs().max() < 0.02 and got[2:].sum() == 0


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {3: 101.0}}, "logit_bias"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 65}, "min_tokens"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
])
def test_validate_rejects(kwargs, needle):
    with pytest.raises(RequestError, match=needle) as e:
        SamplingParams(**kwargs).validate()
    assert "\n" not in str(e.value)


def test_validate_accepts_defaults_and_greedy():
    SamplingParams().validate()
    p = SamplingParams(temperature=0, top_p=1.0, stop=["\n\n"], seed=3)
    p.validate()
    assert p.greedy and not SamplingParams().greedy


def test_penalties_and_logit_bias_follow_openais_formula():
    """logit - count * frequency_penalty - (count > 0) * presence_penalty + logit_bias, per row,
    on the rows that have them; the others, and the logits passed in, untouched."""
    logits = random_logits(3)
    outputs = [[4, 4, 9, 4], [4, 7], []]
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.5),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias={2: 100.0, 4: -3.0})]
    want = logits.clone()
    want[0, 4] -= 3 * 1.5 + 0.5
    want[0, 9] -= 1.5 + 0.5
    want[2, 2] += 100.0
    want[2, 4] -= 3.0
    before = logits.clone()
    assert torch.equal(adjust_logits(logits, params, outputs), want)
    assert torch.equal(logits, before)
    assert sample(logits, params, None, outputs).tolist()[2] == 2  # the bias decides greedy rows too
    with pytest.raises(ValueError, match="outputs"):
        Sampler().sample(logits, params, [None] * 3)
    plain = [SamplingParams(temperature=0)] * 3
    assert adjust_logits(logits, plain, None) is logits  # nothing to adjust: no copy


def test_batched_adjustment_equals_the_formula_row_by_row():
    """Many rows mixing penalties, biases, both, neither and no tokens yet, in one batched pass:
    each row equals the formula applied to that row alone."""
    gen = torch.Generator().manual_seed(5)
    logits = random_logits(12)
    params, outputs = [], []
    for i in range(12):
        pen = i % 3 != 0
        bias = {int(t): float(b) for t, b in zip(torch.randint(0, V, (i % 4,), generator=gen).unique(),
                                                  torch.randn(4, generator=gen) * 50)}
        params.append(SamplingParams(temperature=0, presence_penalty=0.25 * (i % 5) if pen else 0.0,
                                     frequency_penalty=-0.5 + 0.2 * i if pen else 0.0, logit_bias=bias))
        outputs.append(torch.randint(0, V, (i * 7 % 11,), generator=gen).tolist())
    got = adjust_logits(logits, params, outputs)
    for i, p in enumerate(params):
        want = logits[i].clone()
        counts = torch.bincount(torch.tensor(outputs[i], dtype=torch.int64), minlength=V).float()
        want -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        for t, b in p.logit_bias.items():
            want[t] += b
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


def test_repetition_penalty_and_min_p_match_transformers():
    """repetition_penalty over prompt + output tokens equals transformers' processor; min_p keeps
    the tokens transformers' MinPLogitsWarper keeps (after temperature)."""
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

    logits = random_logits(2)
    prompts, outputs = [[1, 2, 2, 30], [5]], [[7, 1], []]
    params = [SamplingParams(temperature=0, repetition_penalty=1.7), SamplingParams(temperature=0, repetition_penalty=0.6)]
    got = adjust_logits(logits, params, outputs, prompts)
    for i, p in enumerate(params):
        want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompts[i] + outputs[i]]),
                                                                     logits[i: i + 1].clone())
        torch.testing.assert_close(got[i], want[0], rtol=0, atol=0)
    # the engine hands a penalised prompt over as the tensor it keeps (one copy, not one a step)
    as_tensors = adjust_logits(logits, params, outputs, [torch.tensor(ids) for ids in prompts])
    torch.testing.assert_close(as_tensors, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prompts"):
        adjust_logits(logits, params, outputs)

    for min_p in (0.02, 0.3, 1.0):
        p = SamplingParams(temperature=0.7, min_p=min_p)
        probs, order = _filtered_sorted_probs(logits[:1], [p])
        kept = set(order[0][probs[0] > 0].tolist())
        warped = MinPLogitsWarper(min_p)(None, logits[:1] / 0.7)
        assert kept == set(torch.nonzero(torch.isfinite(warped[0])).flatten().tolist())
    draws = Sampler().sample(logits[:1].expand(8, V).clone(), [SamplingParams(temperature=2.0, min_p=1.0)] * 8, [None] * 8)
    assert set(draws.tolist()) == {int(logits[0].argmax())}  # min_p = 1 keeps only the most likely


def test_min_tokens_rules_out_eos_and_stop_tokens():
    logits = random_logits(3)
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4, 9]),
              SamplingParams(temperature=0, min_tokens=2),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])]
    got = adjust_logits(logits, params, [[1, 2], [1], [1, 2]], eos_id=7)
    assert torch.isinf(got[0, [4, 7, 9]]).all() and torch.isinf(got[1, 7]) and not torch.isinf(got[1, 4])
    assert torch.equal(got[2], logits[2])  # two tokens generated: min_tokens reached
    assert torch.isfinite(got[0]).sum() == V - 3


def test_negative_penalties_favour_repeats():
    logits = torch.zeros(1, V)
    params = [SamplingParams(temperature=0, frequency_penalty=-1.0)]
    assert Sampler().sample(logits, params, [None], [[17, 3, 17]]).tolist() == [17]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_are_the_log_softmax(dtype):
    """Logit less log-sum-exp gives log_softmax's values, for the chosen ids and the top n."""
    logits = (torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    ids = torch.tensor([0, 17, 299, 5, 5])
    want = torch.log_softmax(logits.float(), dim=-1)
    chosen, top, top_ids = token_logprobs(logits, ids, 4)
    assert chosen.dtype == top.dtype == torch.float32
    torch.testing.assert_close(chosen, want.gather(1, ids[:, None]).squeeze(1))
    torch.testing.assert_close(top, want.topk(4, dim=-1).values)
    torch.testing.assert_close(want.gather(1, top_ids), top)
    empty = token_logprobs(logits, ids, 0)
    assert empty[1].shape == empty[2].shape == (5, 0)
