"""One request's state inside the engine: its tokens, its KV blocks, its sampling and text."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from moec.runtime.detokenizer import IncrementalDetokenizer
from moec.runtime.kv_cache import SequenceBlocks
from moec.runtime.sampler import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrived: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token_at: float | None = None
    num_preemptions: int = 0
    logits: list[torch.Tensor] | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if asked
    # one per prompt token scored so far, if asked (params.prompt_logprobs): None for the first,
    # which nothing precedes
    prompt_logprobs: list[TokenLogprob | None] | None = None
    _prompt_tensor: torch.Tensor | None = field(default=None, repr=False)

    def prompt_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt's ids on `device`, copied once: repetition_penalty reads them every step."""
        if self._prompt_tensor is None or self._prompt_tensor.device != device:
            self._prompt_tensor = torch.tensor(self.prompt_ids, dtype=torch.int64, device=device)
        return self._prompt_tensor

    def prompt_positions_to_score(self, start: int, take: int) -> range:
        """Positions of the chunk [start, start + take) whose logits score a prompt token not yet
        scored (position p scores token p + 1), for a sequence whose prompt_logprobs are asked. A
        chunk run again after a preemption scores nothing twice."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        return range(max(start, len(self.prompt_logprobs) - 1), min(start + take, len(self.prompt_ids) - 1))

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """`tokens[start:stop]` without building the whole list (a decode step wants one token)."""
        prompt = len(self.prompt_ids)
        if start >= prompt:
            return self.output_ids[start - prompt : stop - prompt]
        return self.prompt_ids[start:stop] + self.output_ids[: max(stop - prompt, 0)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens to feed next: the uncached rest of the prompt (or of everything, after a
        preemption), else the last generated token."""
        return self.num_tokens - self.num_cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
