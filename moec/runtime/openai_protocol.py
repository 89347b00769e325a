"""The OpenAI-compatible wire format of `moe-runtime serve`: requests, responses, stream chunks, errors.

Requests are validated strictly (wrong types are errors, not coerced: `"max_tokens": "5"` or
`"temperature": NaN` is a 400 that names the parameter) and unknown fields are ignored, as vLLM
does, so clients that send fields moec does not know keep working. Fields that would change the
output in a way moec cannot honour (tools, non-text response formats, image content) are
refused with a 400 rather than silently ignored.
logprobs are the model's own (before temperature, top-k, top-p, penalties and logit_bias), as vLLM
reports them by default.

Extensions beyond OpenAI's API, as in vLLM: `top_k` (0 or -1 = off), `ignore_eos`,
`repetition_penalty`, `min_p`, `min_tokens` and `stop_token_ids` (see `moec.runtime.sampler`),
and `prompt_logprobs` (each prompt token's log-probability, its rank and the most likely there,
in vLLM's shape: a choice's, or a chat response's, `prompt_logprobs`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_serializer

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request (SamplingParams allows the same)
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n
MAX_LOGPROBS = 20  # most likely tokens a step (SamplingParams allows the same)
MAX_STOP_TOKEN_IDS = 64  # SamplingParams allows the same
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the model rules out reads as this (as vLLM)
_INT64 = 2**63

Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
StopString = Annotated[StrictStr, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
LogprobCount = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]  # OpenAI's range, as SamplingParams
LogitBias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class _Request(BaseModel):
    # strict: no "5" → 5 or true → 1; JSON numbers still validate as floats. extra: ignored.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """Fields both endpoints share."""

    model: StrictStr | None = None
    temperature: Temperature | None = None  # None = 1.0 (OpenAI's default)
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # extension: 0 or -1 = off
    seed: Annotated[StrictInt, Field(ge=-_INT64, lt=_INT64)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = False  # extension
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[StrictStr, LogitBias] | None = None  # token id (as a string) → added to its logit
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # extension
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None  # extension
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # extension
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    prompt_logprobs: LogprobCount | None = None  # extension (vLLM): most likely tokens beside each prompt token's

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def logit_bias_ids(self) -> dict[int, float]:
        """`logit_bias` keyed by token id. Raises ValueError for a key that is not one."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key[:40]!r}")
            out[int(key)] = float(value)
        return out

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, message) for a field set to something moec cannot do, else None."""
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs are not available with stream: true (as in vLLM); drop one"
        return None

    def prompt_logprob_count(self) -> int | None:
        """How many most likely tokens the engine reports beside each prompt token's own
        log-probability (None: off)."""
        return self.prompt_logprobs

    def scores_only(self) -> bool:
        return False


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    # None = 16 (OpenAI's default), cut to fit; 0 with echo scores the prompt and generates nothing
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    logprobs: LogprobCount | None = None  # each token's and this many most likely
    best_of: StrictInt | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts: strings, or token-id lists. Raises ValueError for an empty one."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if any(isinstance(x, str) and not x for x in prompts):
            raise ValueError("prompt must not be empty: give at least one character of text")
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts x n={self.n} exceeds {MAX_CHOICES} choices per request")
        return prompts

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        """With echo, logprobs covers the prompt's tokens too (the engine scores the prompt once for both)."""
        counts = [c for c in (self.logprobs if self.echo else None, self.prompt_logprobs) if c is not None]
        return max(counts) if counts else None

    def scores_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs), nothing generated (as OpenAI's and
        vLLM's legacy completions)."""
        return self.max_tokens == 0

    def unsupported(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", ("max_tokens 0 generates nothing: with echo (and logprobs) it scores the prompt; "
                                  "otherwise ask for at least 1 token")
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by this server (leave it unset or equal to n)"
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Request):
    type: StrictStr


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # deprecated by OpenAI, still sent
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # wins over max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: LogprobCount | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: StrictBool = True  # extension (vLLM)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        """How many most likely tokens to report with each token's own log-probability (None: off).
        Raises ValueError for top_logprobs without logprobs, which OpenAI refuses too."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools (function calling) are not supported by this server"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool_choice is not supported by this server"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", f"response_format {self.response_format.type!r} is not supported; only 'text'"
        return super().unsupported()


# --- responses -------------------------------------------------------------------------------


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, tokenized as /v1/completions would (with the BOS a prompt gets
    unless `add_special_tokens` is false), or chat messages, rendered as /v1/chat/completions
    would; exactly one of the two."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    def which(self) -> tuple[str, str] | None:
        """(parameter, message) if not exactly one of prompt and messages is given, else None."""
        if (self.prompt is None) == (self.messages is None):
            return "prompt", "give exactly one of prompt (text) and messages (chat) to tokenize"
        return None


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeResponse(_Response):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


TokenText = Callable[[int], str]  # a token id as text, alone


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, token: int, logprob: float, text: TokenText) -> TopLogprob:
        piece = text(token)
        return cls(token=piece, logprob=_logprob(logprob), bytes=list(piece.encode()))


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, entries: list[Any], text: TokenText) -> ChatLogprobs:
        """From the engine's `TokenLogprob`s."""
        return cls(content=[ChatTokenLogprob(**TopLogprob.of(e.token, e.logprob, text).model_dump(),
                                             top_logprobs=[TopLogprob.of(t, lp, text) for t, lp in e.top])
                            for e in entries])


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the echoed prompt's first token, which nothing precedes
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token's text starts in the choice's text

    @classmethod
    def of(cls, entries: list[Any], text: TokenText, offset: int = 0) -> CompletionLogprobs:
        tokens = [text(e.token) for e in entries]
        starts = [offset]
        for piece in tokens[:-1]:
            starts.append(starts[-1] + len(piece))
        return cls(tokens=tokens, token_logprobs=[_logprob(e.logprob) for e in entries],
                   top_logprobs=[_top_by_text(e, text) for e in entries], text_offset=starts[: len(tokens)])

    @classmethod
    def echoed(cls, prompt_ids: list[int], prompt_entries: list[Any], entries: list[Any], text: TokenText,
               echo_length: int, silent: frozenset[int] = frozenset()) -> CompletionLogprobs:
        """OpenAI's echo with logprobs: the prompt's tokens (the first with none), then the generated
        ones from `echo_length` on. A token in `silent` (a BOS the echoed text does not show)
        takes no width in the offsets."""
        tokens, starts, at = [], [], 0
        for token in prompt_ids:
            tokens.append(text(token))
            starts.append(at)
            at += 0 if token in silent else len(tokens[-1])
        rest = cls.of(entries, text, echo_length)
        return cls(tokens=tokens + rest.tokens,
                   token_logprobs=[None if e is None else _logprob(e.logprob) for e in prompt_entries]
                   + rest.token_logprobs,
                   top_logprobs=[None if e is None else _top_by_text(e, text) for e in prompt_entries]
                   + rest.top_logprobs,
                   text_offset=starts + rest.text_offset)


def _top_by_text(entry: Any, text: TokenText) -> dict[str, float]:
    """The most likely tokens keyed by text: of two ids that decode alike, the more likely is kept."""
    top: dict[str, float] = {}
    for t, lp in entry.top:
        top.setdefault(text(t), _logprob(lp))
    return top


class PromptLogprob(_Response):
    """vLLM's Logprob: a prompt token's, or one of the most likely there."""
    logprob: float
    rank: int | None  # 1 + how many tokens are likelier
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # a prompt position's tokens by id; None: the first


def prompt_logprobs_of(entries: list[Any], text: TokenText) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` from the engine's `TokenLogprob`s (None for the first token): each
    position's token and the most likely there, keyed by token id."""
    out: PromptLogprobs = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        position = {str(e.token): PromptLogprob(logprob=_logprob(e.logprob), rank=e.rank, decoded_token=text(e.token))}
        for rank, (token, lp) in enumerate(e.top, start=1):
            position.setdefault(str(token), PromptLogprob(logprob=_logprob(lp), rank=rank, decoded_token=text(token)))
        out.append(position)
    return out


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None  # "stop" | "length" | "abort" (timed out or cancelled; as vLLM)


class CompletionResponseChoice(CompletionChoice):
    prompt_logprobs: PromptLogprobs | None = None  # extension (vLLM), where asked


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: Usage


class CompletionStreamResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # extension (vLLM), where asked: the first choice's


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moec"
    max_model_len: int | None = None  # extension (vLLM): the compiled max_seq_len


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


# --- validation errors -> one line naming the parameter ---------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before",
              "function-wrap", "function-plain", "constrained-str", "constrained-int", "constrained-float"}


def param_of(loc: tuple[Any, ...]) -> str | None:
    """`("messages", 0, "content", "list[TextPart]", 0, "type")` → `messages[0].content[0].type`.

    Pydantic tags errors inside a union with the member's name ("str", "list[...]"); those are dropped.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the parameter it is about, from pydantic's errors."""
    errors = err.errors(include_url=False)
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    if first["type"] == "model_type" and not first["loc"]:
        return "the request body must be a JSON object", None
    if first["type"] == "missing":
        param = param_of(tuple(first["loc"]))
        return f"missing required parameter: {param!r}", param
    # A union reports one error per member: the deepest is usually the member the client meant.
    depth = max(len(e["loc"]) for e in errors)
    best = next(e for e in errors if len(e["loc"]) == depth)
    param = param_of(tuple(best["loc"]))
    same = [e for e in errors if len(e["loc"]) == depth and param_of(tuple(e["loc"])) == param]
    msg = "; ".join(dict.fromkeys(e["msg"] for e in same))
    if len(msg) > 300:
        msg = msg[:300] + "..."
    got = best.get("input")
    shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
    if len(shown) > 60:
        shown = shown[:60] + "..."
    return f"invalid value for {param or 'the request'} ({shown}): {msg}", param
