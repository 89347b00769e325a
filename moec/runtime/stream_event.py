"""One event of a request's stream: what the engine thread hands the HTTP side after a step.

Its own module, free of torch and the engine, so the server can name it without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StreamEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    queue_time_s: float | None = None
    time: float = 0.0
    logprobs: list[Any] | None = None  # `TokenLogprob`s of `token_ids`, where the request asked
    # the prompt's `TokenLogprob`s (None for its first token), on a request's first event, where asked
    prompt_logprobs: list[Any] | None = None
