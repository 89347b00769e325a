"""Sampling: logits → next token ids, one row per sequence, each with its own parameters.

Penalties and logit_bias adjust a row's logits first, in this order: vLLM's (and transformers')
`repetition_penalty` divides the positive logit of every token in the prompt or generated so far
by it and multiplies a negative one; OpenAI's `frequency_penalty` and `presence_penalty` take off
that much per occurrence among the generated tokens, and once if it occurs at all; `logit_bias`
adds its value; and below `min_tokens` generated tokens EOS and `stop_token_ids` are ruled out
(the detokenizer holds off stop strings as long).
Sampling then applies temperature, top-k, vLLM's `min_p` (drop a token less likely than min_p
times the most likely) and top-p.

A seeded request draws from its own `torch.Generator`, and every row is computed on its own
(no batch-wide choice of code path), so a seeded request gives the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moec.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # most likely tokens reported a step (OpenAI's top_logprobs limit; vLLM's default)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # |a logit_bias value| (OpenAI's range)
MAX_STOP_TOKEN_IDS = 64


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability sums to >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n: each token's log-probability and the n most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages any token of the prompt or the output
    min_p: float = 0.0  # vLLM's: keep tokens at least min_p times as likely as the most likely
    min_tokens: int = 0  # vLLM's: no EOS, stop_token_ids or stop strings before this many generated tokens
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's: generating one ends the output
    # vLLM's: None: off; n: each prompt token's log-probability given the ones before it and the n
    # most likely there (what OpenAI's echo + logprobs report, and evaluation harnesses score by)
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Its logits depend on which tokens were generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    def adjusts_logits(self) -> bool:
        return self.penalised or bool(self.logit_bias) or self.min_tokens > 0

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not abs(getattr(self, name)) <= MAX_PENALTY:
                raise RequestError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        for token, bias in self.logit_bias.items():
            if not abs(bias) <= MAX_LOGIT_BIAS:
                raise RequestError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                   f"got {bias} for token {token}")
        if not (0 < self.repetition_penalty < float("inf")):
            raise RequestError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}")


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its logits before temperature,
    top-k, top-p, penalties or logit_bias, as vLLM reports by default) and the `n` most likely
    tokens', most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # 1 + how many tokens the model found likelier (prompt tokens: vLLM reports it)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits f32[N, V], the sampled ids i64[N] → (their log-probabilities f32[N], the `n` largest
    f32[N, n] and their ids i64[N, n]), on the logits' device: the host reads them with the ids.
    Each is its logit less the row's log-sum-exp, so no [N, V] log-softmax is kept beside the
    logits (a scored 8192-token prompt at a 151k vocabulary would hold 5 GB more)."""
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    top, top_ids = logits.topk(n, dim=-1) if n else (logits[:, :0], ids[:, None][:, :0])
    return (logits.gather(1, ids[:, None]).float() - lse).squeeze(1), top.float() - lse, top_ids


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on the device the logits live on (multinomial requires they match)."""
    return torch.Generator(device=device).manual_seed(seed)


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]] | None,
                  prompts: Sequence[list[int] | torch.Tensor] | None = None, eos_id: int | None = None) -> torch.Tensor:
    """The rows' logits after their penalties, logit_bias and min_tokens (a copy where any row has
    them; the order is the module docstring's). `outputs`: each row's generated tokens; `prompts`:
    its prompt's (for repetition_penalty; read only at those rows), a list or an int64 tensor: the
    engine keeps each penalised prompt on the device, so a step does not turn a long prompt into a
    tensor again (for 32 rows of 4096-token prompts that took 30-45 ms a step on a 2-core host).
    Batched over the rows: a step copies the rows' tokens and values to the device once and counts
    them in one scatter, not a copy and a pass per row."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits()]
    if not rows:
        return logits
    if outputs is None and any(params[i].penalised or params[i].min_tokens for i in rows):
        raise ValueError("penalties and min_tokens need each row's generated tokens (outputs)")
    if prompts is None and any(params[i].repetition_penalty != 1 for i in rows):
        raise ValueError("repetition_penalty needs each row's prompt tokens (prompts)")
    logits = logits.float().clone()
    device, vocab = logits.device, logits.shape[-1]

    def index(row_ids, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) index tensors for every token of each row's list, in one copy to the device."""
        pairs = torch.tensor([[r for r, toks in zip(row_ids, token_lists) for _ in toks],
                              [t for toks in token_lists for t in toks]], dtype=torch.int64, device=device)
        return pairs[0], pairs[1]

    def count(token_lists: list[list[int]]) -> torch.Tensor:
        """[len(token_lists), V] f32: how often each token occurs in each list (one copy, one scatter)."""
        where = index(range(len(token_lists)), token_lists)
        counts = logits.new_zeros(len(token_lists), vocab)
        return counts.index_put_(where, logits.new_ones(()).expand(where[0].shape[0]), accumulate=True)

    repeated = [i for i in rows if params[i].repetition_penalty != 1]
    if repeated:
        seen = count([outputs[i] for i in repeated]) > 0
        prompt = [torch.as_tensor(prompts[i], dtype=torch.int64).to(device) for i in repeated]
        lengths = [len(ids) for ids in prompt]
        prompt_rows = torch.arange(len(repeated), device=device).repeat_interleave(
            torch.tensor(lengths, device=device), output_size=sum(lengths))  # output_size: no sync
        seen[prompt_rows, torch.cat(prompt)] = True
        at = torch.tensor(repeated, device=device)
        penalty = torch.tensor([params[i].repetition_penalty for i in repeated], device=device)[:, None]
        picked = logits[at]
        logits[at] = torch.where(seen, torch.where(picked > 0, picked / penalty, picked * penalty), picked)
    counted = [i for i in rows if (params[i].presence_penalty or params[i].frequency_penalty) and outputs[i]]
    if counted:
        counts = count([outputs[i] for i in counted])
        scale = torch.tensor([[params[i].frequency_penalty, params[i].presence_penalty] for i in counted],
                             device=device)
        at = torch.tensor(counted, device=device)
        logits[at] -= scale[:, :1] * counts + scale[:, 1:] * (counts > 0)
    biased = [i for i in rows if params[i].logit_bias]
    if biased:
        where = index(biased, [list(params[i].logit_bias) for i in biased])
        bias = torch.tensor([b for i in biased for b in params[i].logit_bias.values()], device=device)
        logits.index_put_(where, bias, accumulate=True)  # a row's ids are distinct
    early = [i for i in rows if params[i].min_tokens and len(outputs[i]) < params[i].min_tokens]
    if early:
        ruled_out = [] if eos_id is None else [eos_id]
        logits[index(early, [ruled_out + params[i].stop_token_ids for i in early])] = float("-inf")
    return logits


class Sampler:
    def __init__(self, eos_id: int | None = None):
        self.eos_id = eos_id  # what min_tokens rules out, beside a row's stop_token_ids

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
        outputs: list[list[int]] | None = None, prompts: Sequence[list[int] | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """logits f32[N, V] → token ids i64[N]. `outputs`: each row's tokens generated so far, and
        `prompts` its prompt's (for its penalties and min_tokens; needed where a row has them)."""
        n = logits.shape[0]
        if not len(params) == len(generators) == n:
            raise ValueError(f"{n} logits rows, {len(params)} params, {len(generators)} generators")
        logits = adjust_logits(logits, params, outputs, prompts, self.eos_id)
        if all(p.greedy for p in params):  # the common case (and n == 0): one kernel, no row gathers
            return logits.argmax(dim=-1)
        out = torch.empty(n, dtype=torch.int64, device=logits.device)
        logits = logits.float()
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            rows = torch.tensor(greedy, device=logits.device)
            out[rows] = logits[rows].argmax(dim=-1)
        # Two paths, chosen per row: rows that filter sample over sorted probabilities.
        plain = [i for i, p in enumerate(params) if not p.greedy and p.top_k == 0 and p.top_p >= 1 and not p.min_p]
        filtered = [i for i, p in enumerate(params) if not p.greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p)]
        if plain:
            rows = torch.tensor(plain, device=logits.device)
            probs = torch.softmax(logits[rows] / _column([params[i].temperature for i in plain], logits), dim=-1)
            out[rows] = _multinomial(probs, [generators[i] for i in plain])
        if filtered:
            rows = torch.tensor(filtered, device=logits.device)
            probs, order = _filtered_sorted_probs(logits[rows], [params[i] for i in filtered])
            picked = _multinomial(probs, [generators[i] for i in filtered])
            out[rows] = order.gather(1, picked[:, None]).squeeze(1)
        return out


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _filtered_sorted_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities in descending order after temperature, top-k, min_p and top-p, and the order
    (sorted → vocab id)."""
    scaled = logits / _column([p.temperature for p in params], logits)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    # min_p: p < min_p * p_max, i.e. logit < max logit + log(min_p); log(0) = -inf drops nothing
    floor = sorted_logits[:, :1] + torch.log(_column([p.min_p for p in params], sorted_logits))
    sorted_logits = sorted_logits.masked_fill((sorted_logits < floor) & (rank > 0), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the tokens before it already reach top_p; the first always stays.
    # Rows with top_p = 1 skip this, so rounding in the cumsum never trims their tail.
    top_p = _column([p.top_p for p in params], probs)
    before = probs.cumsum(dim=-1) - probs
    drop = (before >= top_p) & (top_p < 1) & (rank > 0)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), order


def _multinomial(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row: rows with a generator draw alone from it; the rest share the global RNG."""
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        rows = torch.tensor(shared, device=probs.device)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out
