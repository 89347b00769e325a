"""`moe-runtime serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the EngineLoop.

Endpoints:

    POST /v1/completions         prompt: a string, a list of strings, a token-id list or a list of them
    POST /v1/chat/completions    messages rendered with the artifact's chat template (moec.runtime.chat_template)
    GET  /v1/models, /v1/models/{id}
    POST /tokenize               {"prompt"} or {"messages"} → {"count", "max_model_len", "tokens"} (vLLM's),
                                 the ids a completion or chat request with it would run on
    POST /detokenize             {"tokens"} → {"prompt"} (vLLM's)
    GET  /version                {"version"}
    GET  /health                 200 {"status": "ok"}; 503 once the engine thread died or shutdown began
    GET  /metrics                Prometheus text (moec.runtime.server_metrics)

Both generation endpoints stream as server-sent events (`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`)
when `"stream": true`; with `"stream_options": {"include_usage": true}` every chunk carries
`"usage": null` and a last chunk before [DONE] has `"choices": []` and the usage. A request with
`n` > 1 (or several prompts) runs one engine sequence per choice (seed + index when seeded).

Behaviour a client sees:

- Auth: with an API key, every path but `/health` and `/metrics` needs `Authorization: Bearer KEY`
  (401 otherwise). `/metrics` stays open so a Prometheus scraper needs no secret; it shows counts
  and latencies, never request content.
- Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 (bad JSON,
  wrong types, out-of-range values, prompt longer than the context, unsupported parameters),
  401, 404 (unknown model: code `model_not_found`; unknown path), 405, 413 (body above
  `max_body_bytes`, refused before it is parsed), 429 with `Retry-After` (queue full), 500
  (unexpected; logged with the request id, the server keeps serving), 503 (shutting down, i.e.
  EngineLoop's ShuttingDown, or the engine thread died), 504 (request timeout, non-streaming).
- Request timeout (`request_timeout_s`, counted from arrival, queueing included): the engine
  sequence is aborted. Non-streaming: 504 with type `timeout_error`, code `request_timeout` (and
  `x-should-retry: false`, so the openai client does not run it again). Streaming: the stream
  ends normally with `finish_reason: "abort"`, the usage chunk if asked, and [DONE].
- A client that disconnects (streaming or not) has its sequences aborted, which frees their KV
  blocks at the engine's next step.
- `X-Request-Id` is echoed (one is generated when absent or malformed) and every request logs one
  JSON line on the `moec.server` logger: request id, method, path, status, prompt and
  completion tokens, finish reasons, time to first token, end-to-end latency.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections and lets running requests
finish, for at most `shutdown_timeout_s`; requests still running then are cancelled (their
sequences aborted). The app's lifespan then calls `EngineLoop.shutdown(cancel_running=True)`,
which stops the engine thread, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import re
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import moec
from moec.errors import MoecError, RequestError
from moec.runtime import openai_protocol as proto
from moec.runtime.chat_template import ChatTemplate
from moec.runtime.sampler import SamplingParams
from moec.runtime.server_metrics import ServerMetrics
from moec.runtime.stream_event import StreamEvent

log = logging.getLogger("moec.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without the API key
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (cut to what fits)
ABORT_GRACE_S = 10.0  # after a timeout's abort, how long to wait for the engine's final event
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read and dropped, so the client sees the 413
DRAIN_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_BACKGROUND: set[asyncio.Task] = set()  # keep references to fire-and-forget tasks


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(proto.error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


class ServerClosing(APIError):
    def __init__(self, message: str = "the server is shutting down; retry on another replica or later"):
        super().__init__(503, message, "server_error", code="service_unavailable", headers={"Connection": "close"})


def _is_a(e: BaseException, name: str) -> bool:
    # EngineLoop's QueueFull / ShuttingDown, matched by name so this module need not import the engine.
    return any(c.__name__ == name for c in type(e).__mro__)


@dataclass
class _State:
    loop: Any
    model_name: str
    api_key: bytes | None
    request_timeout_s: float | None
    max_body_bytes: int
    metrics: ServerMetrics
    max_seq_len: int | None
    chat_template: ChatTemplate | None
    created: int = field(default_factory=proto.now)
    draining: bool = False

    def check_serving(self) -> None:
        if self.draining:
            raise ServerClosing()
        if not getattr(self.loop, "healthy", True):
            raise APIError(503, "the engine has stopped; see the server log", "server_error",
                           code="engine_dead")


def build_app(loop: Any, model_name: str, api_key: str | None, request_timeout_s: float | None,
              max_body_bytes: int = 1_000_000, *, shutdown_timeout_s: float = 30.0,
              start_loop: bool = True) -> FastAPI:
    """The ASGI app over `loop` (an EngineLoop).

    Its lifespan calls `loop.start()` at startup (unless `start_loop` is False) and
    `await loop.shutdown(cancel_running=True, timeout=shutdown_timeout_s)` at shutdown.
    `request_timeout_s`: None or <= 0 for no limit.
    """
    engine = loop.engine
    state = _State(
        loop=loop, model_name=model_name, api_key=api_key.encode() if api_key else None,
        request_timeout_s=request_timeout_s if request_timeout_s and request_timeout_s > 0 else None,
        max_body_bytes=max_body_bytes, metrics=ServerMetrics(model_name, gpu=_gpu_telemetry(engine)),
        max_seq_len=_max_seq_len(engine), chat_template=_load_chat_template(engine),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_loop:
            loop.start()
        try:
            yield
        finally:
            state.draining = True
            try:
                await loop.shutdown(cancel_running=True, timeout=shutdown_timeout_s)
            except Exception:
                log.exception(_json_line({"event": "engine_shutdown_failed"}))

    app = FastAPI(title="moec", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.moec = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _note(request, error=exc.message)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), "server_error" if exc.status_code >= 500 else
                           "invalid_request_error")
        err.headers.update(exc.headers or {})
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        param = proto.param_of(tuple(x for x in first.get("loc", ()) if x != "body"))
        return APIError(400, f"invalid request: {first.get('msg', 'bad input')}", param=param).response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, state, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return proto.ModelList(data=[_model_card(state)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise _model_not_found(model_id, state)
        return _model_card(state).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req = _parse(await request.body(), proto.TokenizeRequest, state)
        bad = req.which()
        if bad:
            raise APIError(400, bad[1], param=bad[0])
        try:
            ids = await asyncio.to_thread(_tokenize, req, state)
        except RequestError as e:
            raise APIError(400, str(e), param="messages" if req.messages else "prompt") from None
        return proto.TokenizeResponse(count=len(ids), max_model_len=state.max_seq_len, tokens=ids).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = _parse(await request.body(), proto.DetokenizeRequest, state)
        vocab = getattr(getattr(engine, "spec", None), "vocab_size", None)
        if vocab is not None and any(t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens must lie in [0, {vocab}): this model's vocabulary", param="tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, list(req.tokens))
        return proto.DetokenizeResponse(prompt=text).model_dump()

    @app.get("/version")
    async def version() -> dict:
        return {"version": moec.__version__}

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return ServerClosing().response()
        if not getattr(loop, "healthy", True):
            return APIError(503, "the engine thread has stopped", "server_error", code="engine_dead").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            state.metrics.refresh(loop.stats())
        except Exception:  # a scrape must not fail because the engine is gone; the gauges keep their values
            log.warning(_json_line({"event": "stats_failed"}), exc_info=True)
        body, content_type = state.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    return app


# --- generation ------------------------------------------------------------------------------


def _model_card(state: _State) -> proto.ModelCard:
    return proto.ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_seq_len)


def _model_not_found(name: str, state: _State) -> APIError:
    return APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                    param="model", code="model_not_found")


def _max_seq_len(engine: Any) -> int | None:
    try:
        return int(engine.artifact.manifest.step.max_seq_len)
    except (AttributeError, TypeError, ValueError):
        spec = getattr(engine, "spec", None)
        return getattr(spec, "max_seq_len", None)


def _gpu_telemetry(engine: Any) -> Any | None:
    """NVML readings of the engine's GPU for /metrics; None on CPU, where the GPU gauges are absent."""
    device = getattr(engine, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    from moec.runtime.gpu_telemetry import GpuTelemetry

    gpu = GpuTelemetry.for_device(device)
    if not gpu.available:
        log.warning(_json_line({"event": "gpu_telemetry_unavailable", "reason": gpu.reason}))
        return None
    return gpu


def _load_chat_template(engine: Any) -> ChatTemplate | None:
    try:
        tok_dir = engine.artifact.tokenizer_path
    except AttributeError:
        return None
    return ChatTemplate.from_tokenizer_dir(tok_dir)


def _note(request: Request, **fields: Any) -> None:
    info = request.scope.get("moec.log")
    if info is not None:
        info.update(fields)


def _seed(seed: int | None, index: int) -> int | None:
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63  # stays a signed 64-bit value


@dataclass
class _Prepared:
    prompt_ids: list[list[int]]
    prompt_texts: list[str]  # for echo


def _parse(body: bytes, model_cls: type, state: _State) -> Any:
    """A request body as `model_cls`, or the 400 (bad JSON, wrong types) or 404 (another model)."""
    try:
        req = model_cls.model_validate_json(body)
    except ValidationError as e:
        message, param = proto.describe_validation_error(e)
        raise APIError(400, message, param=param) from None
    if req.model is not None and req.model != state.model_name:
        raise _model_not_found(req.model, state)
    return req


def _chat_ids(messages: list[Any], add_generation_prompt: bool, state: _State) -> list[int]:
    """Chat messages rendered with the artifact's template and tokenized."""
    if state.chat_template is None:
        raise APIError(400, "this model has no tokenizer to render chat messages with", param="messages")
    rendered = []
    for m in messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        rendered.append(msg)
    return state.chat_template.encode(state.loop.engine.tokenizer, rendered, add_generation_prompt)


def _tokenize(req: proto.TokenizeRequest, state: _State) -> list[int]:
    """/tokenize's ids: what `_prepare` makes of the same prompt or messages (off the event loop)."""
    if req.messages is not None:
        return _chat_ids(req.messages, req.add_generation_prompt, state)
    engine = state.loop.engine
    if req.add_special_tokens:
        return list(engine.encode(req.prompt))
    return list(engine.tokenizer.encode(req.prompt, add_special_tokens=False).ids)


def _prepare(req: Any, state: _State, chat: bool) -> _Prepared:
    """Tokenize (off the event loop: called in a thread)."""
    engine = state.loop.engine
    if chat:
        ids = _chat_ids(req.messages, req.add_generation_prompt, state)
        if not ids:
            raise APIError(400, "the chat template rendered these messages as no tokens", param="messages")
        return _Prepared([ids], [""])
    try:
        prompts = req.prompts()
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
    ids_list, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            ids_list.append(list(engine.encode(p)))
            texts.append(p)
        else:
            ids_list.append(list(p))
            texts.append(engine.tokenizer.decode(list(p)) if req.echo else "")
    return _Prepared(ids_list, texts)


def _sampling(req: Any, prompt_len: int, state: _State, chat: bool, index: int) -> SamplingParams:
    limit = state.max_seq_len
    param = "messages" if chat else "prompt"
    if limit is not None and prompt_len >= limit:
        raise APIError(400, f"the prompt is {prompt_len} tokens but the model's context is {limit} tokens "
                       f"(max_seq_len), leaving no room to generate; shorten the prompt", param=param,
                       code="context_length_exceeded")
    room = None if limit is None else limit - prompt_len
    # scoring only: the one token the prompt's last step samples anyway, which the response leaves out
    explicit = req.token_limit() if chat else (1 if req.scores_only() else req.max_tokens)
    if explicit is not None:
        max_tokens = explicit
        if room is not None and explicit > room:
            name = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"the prompt of {prompt_len} tokens plus {name} {explicit} exceeds the model's "
                           f"context of {limit} tokens (max_seq_len); shorten the prompt or ask for at most "
                           f"{room} tokens", param=name, code="context_length_exceeded")
    elif chat:
        max_tokens = room if room is not None else DEFAULT_COMPLETION_MAX_TOKENS
    else:
        max_tokens = min(DEFAULT_COMPLETION_MAX_TOKENS, room) if room is not None else DEFAULT_COMPLETION_MAX_TOKENS
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=max(req.top_k or 0, 0),
        seed=_seed(req.seed, index),
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        logprobs=req.logprob_count(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=req.logit_bias_ids(),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        min_p=req.min_p or 0.0,
        min_tokens=req.min_tokens or 0,
        stop_token_ids=list(req.stop_token_ids or []),
        prompt_logprobs=req.prompt_logprob_count(),
    )
    params.validate()
    return params


async def _generate(request: Request, state: _State, chat: bool) -> Response:
    info = request.scope.setdefault("moec.log", {})
    arrival = request.scope.get("moec.arrival") or time.perf_counter()
    state.check_serving()
    req = _parse(await request.body(), proto.ChatCompletionRequest if chat else proto.CompletionRequest, state)
    bad = req.unsupported()
    if bad:
        raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
    for param, check in (("top_logprobs", req.logprob_count), ("logit_bias", req.logit_bias_ids)):
        try:
            check()
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
    info.update(stream=req.stream, n=req.n)
    try:
        prepared = await asyncio.to_thread(_prepare, req, state, chat)
    except RequestError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    n = req.n
    jobs = []  # (choice index, prompt index, params)
    try:
        for p, ids in enumerate(prepared.prompt_ids):
            for j in range(n):
                jobs.append((p * n + j, p, _sampling(req, len(ids), state, chat, p * n + j)))
    except RequestError as e:
        raise APIError(400, str(e)) from None

    response_id = proto.new_id("chatcmpl" if chat else "cmpl")
    info["response_id"] = response_id
    state.check_serving()
    streams = []
    try:
        for index, p, params in jobs:
            streams.append(state.loop.submit(f"{response_id}-{index}", prepared.prompt_ids[p], params))
    except BaseException as e:
        for s in streams:
            _safe_abort(s)
        if _is_a(e, "ShuttingDown"):
            raise ServerClosing(str(e)) from None
        if _is_a(e, "QueueFull"):
            raise APIError(429, f"the server is at capacity: {e}",
                           "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if isinstance(e, RequestError):
            raise APIError(400, str(e), code=_code_of(str(e))) from None
        raise
    run = _Run(streams, state.metrics, arrival, state.request_timeout_s)
    prompt_tokens = sum(len(ids) for ids in prepared.prompt_ids)
    info["prompt_tokens"] = prompt_tokens
    if req.stream:
        stream = _sse(run, req, state, chat, response_id, prepared, prompt_tokens, info)
        return _SSEResponse(stream, run, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, run, req, state, chat, response_id, prepared, prompt_tokens, info)


def _token_text(state: _State) -> proto.TokenText:
    """A token id as text, alone (how logprobs name tokens); a request's repeats decoded once."""
    tokenizer = getattr(state.loop.engine, "tokenizer", None)
    if tokenizer is None:  # token ids in, token ids out: name tokens by id
        return str
    return functools.lru_cache(maxsize=4096)(lambda token: tokenizer.decode([token], skip_special_tokens=False))


def _prompt_entries(entries: list[Any] | None, prompt_ids: list[int], count: int) -> list[Any]:
    """The prompt's `TokenLogprob`s, one per prompt token (None where the engine gave none: the
    first), each with its `count` most likely (the engine keeps as many as the larger of echo's
    logprobs and prompt_logprobs asks)."""
    entries = [None if e is None else dataclasses.replace(e, top=e.top[:count]) for e in entries or []]
    return entries + [None] * (len(prompt_ids) - len(entries))


def _silent(state: _State, echoed: str) -> frozenset[int]:
    """Token ids whose text the echoed prompt does not show: the BOS the engine puts first."""
    engine = state.loop.engine
    bos = getattr(engine, "bos_id", None)
    tokenizer = getattr(engine, "tokenizer", None)
    if bos is None or tokenizer is None or echoed.startswith(tokenizer.decode([bos], skip_special_tokens=False)):
        return frozenset()
    return frozenset({bos})


def _code_of(message: str) -> str | None:
    return "context_length_exceeded" if "max_seq_len" in message else None


def _safe_abort(stream: Any) -> None:
    try:
        stream.abort()
    except Exception:
        log.warning(_json_line({"event": "abort_failed", "engine_request_id": getattr(stream, "request_id", None)}),
                    exc_info=True)


class _Run:
    """The engine streams of one request (one per choice), merged into one sequence of (index, event).

    Each stream is read by its own task, which feeds the metrics whether or not the client still
    listens. The run enforces the request timeout: at the deadline it aborts what still runs and
    waits (ABORT_GRACE_S at most) for the engine's final events.
    """

    def __init__(self, streams: list[Any], metrics: ServerMetrics, arrival: float, timeout_s: float | None):
        self.streams = streams
        self.trackers = [metrics.track(arrival) for _ in streams]
        self.final: list[Any] = [None] * len(streams)
        self.aborted = [False] * len(streams)
        self.deadline = arrival + timeout_s if timeout_s else None
        self.timed_out = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._pump(i)) for i in range(len(streams))]
        for t in self.tasks:
            _BACKGROUND.add(t)
            t.add_done_callback(_BACKGROUND.discard)

    async def _pump(self, i: int) -> None:
        tracker = self.trackers[i]
        try:
            async for ev in self.streams[i]:
                tracker.on_event(ev)
                self.queue.put_nowait((i, ev))
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.queue.put_nowait((i, e))
        finally:
            tracker.abandon()  # counts an abort if no final event came
            self.queue.put_nowait((i, None))

    @property
    def finished(self) -> bool:
        return all(f is not None for f in self.final)

    def abort(self) -> None:
        """Abort every stream that has not finished (idempotent)."""
        for i, s in enumerate(self.streams):
            if self.final[i] is None and not self.aborted[i]:
                self.aborted[i] = True
                _safe_abort(s)

    def _made_up_final(self, i: int) -> StreamEvent:
        """A final event for a stream the engine never finished."""
        tr = self.trackers[i]
        return StreamEvent("", [], "abort", tr.prompt_tokens, tr.completion_tokens, time=time.perf_counter())

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, event) until every stream has sent its final event."""
        grace_until = 0.0
        while not self.finished:
            now = time.perf_counter()
            if not self.timed_out and self.deadline is not None and now >= self.deadline:
                self.timed_out = True
                self.abort()
                grace_until = now + ABORT_GRACE_S
            if self.timed_out and now >= grace_until:
                log.error(_json_line({"event": "abort_unanswered", "grace_s": ABORT_GRACE_S}))
                for i in range(len(self.streams)):
                    if self.final[i] is None:
                        self.tasks[i].cancel()
                        self.final[i] = self._made_up_final(i)
                        yield i, self.final[i]
                return
            if self.queue.empty():
                until = grace_until if self.timed_out else self.deadline
                try:
                    i, item = await asyncio.wait_for(self.queue.get(), None if until is None else until - now)
                except asyncio.TimeoutError:
                    continue  # the deadline (or the grace after it) is handled at the top
            else:
                i, item = self.queue.get_nowait()
            if self.final[i] is not None:
                continue  # the end marker after the final event, or anything after a made-up final
            if item is None:  # the stream ended without a final event
                self.final[i] = self._made_up_final(i)
                yield i, self.final[i]
            elif isinstance(item, BaseException):
                self.abort()
                raise item
            else:
                if item.finish_reason is not None:
                    self.final[i] = item
                yield i, item

    def summary(self, info: dict[str, Any]) -> None:
        firsts = [t.first_token_at for t in self.trackers if t.first_token_at is not None]
        arrival = self.trackers[0].arrival if self.trackers else 0.0
        info.update(
            completion_tokens=sum(t.completion_tokens for t in self.trackers),
            finish_reasons=[t.finish_reason or ("abort" if aborted else None)
                            for t, aborted in zip(self.trackers, self.aborted)],
            ttft_s=round(min(firsts) - arrival, 6) if firsts else None,
        )
        if self.timed_out:
            info["timed_out"] = True


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _complete(request: Request, run: _Run, req: Any, state: _State, chat: bool, response_id: str,
                    prepared: _Prepared, prompt_tokens: int, info: dict[str, Any]) -> Response:
    k = len(run.streams)
    texts: list[list[str]] = [[] for _ in range(k)]
    logprobs: list[list[Any]] = [[] for _ in range(k)]
    prompt_logprobs: list[list[Any] | None] = [None] * k

    async def collect() -> None:
        async for i, ev in run.events():
            texts[i].append(ev.text)
            logprobs[i] += ev.logprobs or []
            if ev.prompt_logprobs is not None:
                prompt_logprobs[i] = ev.prompt_logprobs

    collector = asyncio.create_task(collect())
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():  # the client left, or this handler was cancelled (shutdown)
            run.abort()
            collector.cancel()
        run.summary(info)
    if not collector.done() or collector.cancelled():
        info["disconnected"] = True
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    collector.result()  # an engine error becomes a 500 here
    if run.timed_out:
        raise APIError(504, f"the request did not finish within the server's request timeout of "
                       f"{state.request_timeout_s:g}s and was aborted; ask for fewer tokens or raise "
                       "--request-timeout", "timeout_error", code="request_timeout",
                       headers={"x-should-retry": "false"})
    n = req.n
    completion_tokens = sum(t.completion_tokens for t in run.trackers)
    finals = [f.finish_reason for f in run.final]
    if req.scores_only():  # the token sampled after the prompt is not the client's
        texts, logprobs, completion_tokens, finals = [[] for _ in range(k)], [[] for _ in range(k)], 0, ["length"] * k
    usage = proto.Usage.of(prompt_tokens, completion_tokens)
    asked = req.logprob_count() is not None
    text_of = _token_text(state)

    def vllm_prompt_logprobs(i: int) -> proto.PromptLogprobs | None:
        if req.prompt_logprobs is None:
            return None
        ids = prepared.prompt_ids[i // n]
        return proto.prompt_logprobs_of(_prompt_entries(prompt_logprobs[i], ids, req.prompt_logprobs), text_of)

    if chat:
        body = proto.ChatCompletionResponse(
            id=response_id, created=proto.now(), model=state.model_name, usage=usage,
            choices=[proto.ChatChoice(index=i, message=proto.AssistantMessage(content="".join(texts[i])),
                                      logprobs=proto.ChatLogprobs.of(logprobs[i], text_of) if asked else None,
                                      finish_reason=finals[i]) for i in range(k)],
            prompt_logprobs=vllm_prompt_logprobs(0),
        )
    else:
        echo = [prepared.prompt_texts[i // n] if req.echo else "" for i in range(k)]

        def choice_logprobs(i: int) -> proto.CompletionLogprobs | None:
            if not asked:
                return None
            if not req.echo:
                return proto.CompletionLogprobs.of(logprobs[i], text_of, len(echo[i]))
            ids = prepared.prompt_ids[i // n]
            return proto.CompletionLogprobs.echoed(ids, _prompt_entries(prompt_logprobs[i], ids, req.logprobs),
                                                   logprobs[i], text_of, len(echo[i]), _silent(state, echo[i]))

        body = proto.CompletionResponse(
            id=response_id, created=proto.now(), model=state.model_name, usage=usage,
            choices=[proto.CompletionResponseChoice(index=i, text=echo[i] + "".join(texts[i]), finish_reason=finals[i],
                                                    logprobs=choice_logprobs(i),
                                                    prompt_logprobs=vllm_prompt_logprobs(i)) for i in range(k)],
        )
    return JSONResponse(body.model_dump())


def _frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _sse(run: _Run, req: Any, state: _State, chat: bool, response_id: str, prepared: _Prepared,
               prompt_tokens: int, info: dict[str, Any]) -> AsyncIterator[bytes]:
    created = proto.now()
    include_usage = req.include_usage()
    k, n = len(run.streams), req.n
    asked, text_of = req.logprob_count() is not None, _token_text(state)
    sent = [0] * k  # characters of each choice's text sent so far: where the next token's starts

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False,
              logprobs: list[Any] | None = None, echoed: proto.CompletionLogprobs | None = None) -> bytes:
        if chat:
            delta = proto.DeltaMessage(role="assistant" if role else None, content=text)
            lp = proto.ChatLogprobs.of(logprobs, text_of) if asked and logprobs else None
            c = proto.ChatCompletionChunk(id=response_id, created=created, model=state.model_name,
                                          choices=[proto.ChatChunkChoice(index=index, delta=delta, logprobs=lp,
                                                                         finish_reason=finish)])
        else:
            lp = echoed or (proto.CompletionLogprobs.of(logprobs, text_of, sent[index]) if asked and logprobs else None)
            sent[index] += len(text or "")
            c = proto.CompletionStreamResponse(id=response_id, created=created, model=state.model_name,
                                               choices=[proto.CompletionChoice(index=index, text=text or "",
                                                                               logprobs=lp, finish_reason=finish)])
        d = c.model_dump()
        if not include_usage:
            d.pop("usage", None)
        return _frame(d)

    # with logprobs, an echo chunk carries the prompt's, known once the prompt has run: it waits for
    # its choice's first event
    echo_waits = not chat and req.echo and asked
    echo_sent = [False] * k
    try:
        for i in range(k):
            if chat:
                yield chunk(i, "", None, role=True)
            elif req.echo and prepared.prompt_texts[i // n] and not echo_waits:
                yield chunk(i, prepared.prompt_texts[i // n], None)
        async for i, ev in run.events():
            if echo_waits and not echo_sent[i]:  # its first event (without logprobs only if it ended before any token)
                echo_sent[i] = True
                text, ids = prepared.prompt_texts[i // n], prepared.prompt_ids[i // n]
                yield chunk(i, text, None, echoed=proto.CompletionLogprobs.echoed(
                    ids, _prompt_entries(ev.prompt_logprobs, ids, req.logprobs), [], text_of, 0, _silent(state, text))
                    if ev.prompt_logprobs is not None else None)
            if req.scores_only():  # the token sampled after the prompt is not the client's
                if ev.finish_reason is not None:
                    yield chunk(i, "", "abort" if ev.finish_reason == "abort" else "length")
                continue
            if ev.text or ev.finish_reason is not None or (asked and ev.logprobs):
                yield chunk(i, ev.text if (ev.text or not chat) else None, ev.finish_reason, logprobs=ev.logprobs)
        if include_usage:
            usage = proto.Usage.of(prompt_tokens, 0 if req.scores_only() else sum(t.completion_tokens
                                                                                  for t in run.trackers))
            cls = proto.ChatCompletionChunk if chat else proto.CompletionStreamResponse
            yield _frame(cls(id=response_id, created=created, model=state.model_name, choices=[],
                             usage=usage).model_dump())
    except Exception as e:
        log.error(_json_line({"event": "stream_failed", "request_id": info.get("request_id"),
                              "response_id": response_id, "error": repr(e)}), exc_info=True)
        info["error"] = f"stream failed: {e!r}"
        yield _frame(proto.error_body("the server failed while generating; see its log", "server_error",
                                      code="internal_error"))
    finally:
        run.summary(info)
    yield b"data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that aborts its engine sequences however it ends (done, disconnect, cancel),
    even when the body iterator was never started."""

    def __init__(self, content: AsyncIterator[bytes], run: _Run, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._run = run

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._run.finished:
                scope.setdefault("moec.log", {})["disconnected"] = True
            self._run.abort()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass


# --- the gate: request id, auth, body limit, 500s, the access log -----------------------------


def _json_line(fields: dict[str, Any]) -> str:
    return json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields},
                      ensure_ascii=False, default=str)


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class _Gate:
    """Outer ASGI middleware: everything that must happen before (and after) FastAPI sees a request.

    The body is read here, at most `max_body_bytes` of it, and handed on whole; a larger one is
    answered 413 without ever being parsed or kept (it is read and dropped up to DRAIN_LIMIT_BYTES,
    so that a client still writing it reads the 413 instead of a broken pipe).
    """

    def __init__(self, app: Any, state: _State):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        info: dict[str, Any] = {"event": "request", "request_id": request_id, "method": scope.get("method"),
                                "path": scope.get("path"), "status": None}
        scope["moec.log"] = info
        scope["moec.arrival"] = start
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                info["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self._refuse(scope, headers)
            if refusal is not None:
                if refusal.status == 413:
                    await self._drain(receive, headers)
                await _send_json(send_with_id, refusal.status, proto.error_body(
                    refusal.message, refusal.type, refusal.param, refusal.code), refusal.headers)
                info["error"] = refusal.message
                return
            body, status = await self._read_body(receive)
            if status == 413:
                err = self._too_large()
                await _send_json(send_with_id, 413, proto.error_body(err.message, err.type, err.param, err.code),
                                 err.headers)
                info["error"] = err.message
                return
            if status == 499:
                info["status"] = 499
                info["disconnected"] = True
                return
            await self.app(scope, _replay(body, receive), send_with_id)
        except Exception as e:
            info["error"] = f"internal error: {e!r}"
            log.error(_json_line({"event": "internal_error", "request_id": request_id, "path": scope.get("path"),
                                  "error": repr(e)}), exc_info=True)
            if not started:
                info["status"] = 500
                await _send_json(send_with_id, 500, proto.error_body(
                    f"internal server error (request id {request_id}); the server keeps serving", "server_error",
                    code="internal_error"))
        finally:
            info["e2e_s"] = round(time.perf_counter() - start, 6)
            log.info(_json_line({k: v for k, v in info.items() if v is not None}))

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.state.max_body_bytes} "
                        "bytes", code="request_too_large", headers={"Connection": "close"})

    def _refuse(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> APIError | None:
        state = self.state
        if state.api_key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, key = auth.partition(b" ")
            if not auth:
                return APIError(401, "You didn't provide an API key. Provide it in an Authorization header using "
                                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), state.api_key):
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return APIError(400, "the Content-Length header is not a number", code="bad_content_length")
            if size > state.max_body_bytes:
                return self._too_large()
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, int]:
        """(body, 0), or (b"", 413) past the limit, or (b"", 499) if the client left."""
        chunks, size, limit = [], 0, self.state.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await self._drain(receive, {}, already=size)
                return b"", 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), 0

    async def _drain(self, receive: Any, headers: dict[bytes, bytes], already: int = 0) -> None:
        """Read and drop the rest of an oversized body (bounded in bytes and time)."""
        if b"100-continue" in headers.get(b"expect", b"").lower():
            return  # the client waits for our answer before sending: nothing to drain
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT_BYTES:
            return
        deadline = time.perf_counter() + DRAIN_TIMEOUT_S
        size = already
        try:
            while size <= DRAIN_LIMIT_BYTES:
                message = await asyncio.wait_for(receive(), max(deadline - time.perf_counter(), 0.001))
                if message["type"] != "http.request":
                    return
                size += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except asyncio.TimeoutError:
            return


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: waits for http.disconnect

    return replay


# --- serve -----------------------------------------------------------------------------------


class ServeError(MoecError):
    """The server cannot start as asked (port in use, bad host)."""


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host") from None
    last: OSError | None = None
    for family, type_, proto_, _, addr in infos:
        sock = socket.socket(family, type_, proto_)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.set_inheritable(True)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise ServeError(f"cannot listen on {host}:{port}: {last.strerror if last else 'no address'}; "
                     "pick another --port or --host") from None


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 256, request_timeout_s: float | None = 600.0, verify: bool = True, *,
          shutdown_timeout_s: float = 30.0, max_body_bytes: int = 1_000_000, model_name: str | None = None,
          uvicorn_log_level: str = "warning", cuda_graphs: bool = True, ep_chunks: int | None = None,
          overlap: bool = True) -> int:
    """Load the artifact, start the engine loop and serve until SIGTERM/SIGINT. Returns the exit status (0).

    Raises MoecError (ArtifactError, ServeError, ...) for what the user can fix.
    """
    import uvicorn

    from moec.runtime.engine import Engine, describe_load_phases
    from moec.runtime.engine_loop import EngineLoop

    _configure_logging()
    t0 = time.perf_counter()
    engine = Engine.load(artifact, verify=verify, cuda_graphs=cuda_graphs, ep_chunks=ep_chunks, overlap=overlap)
    if getattr(engine, "rank", 0) != 0:  # expert parallel: the other ranks follow rank 0's orders, no HTTP
        from moec.runtime.rank_loop import FollowerLoop

        return FollowerLoop(engine).run()
    loop = EngineLoop(engine, max_queue=max_queue)
    load_s = time.perf_counter() - t0
    name = model_name or engine.artifact.manifest.name
    sock = _bind(host, port)
    app = build_app(loop, name, api_key, request_timeout_s, max_body_bytes, shutdown_timeout_s=shutdown_timeout_s)
    state: _State = app.state.moec
    config = uvicorn.Config(app, log_level=uvicorn_log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout_s, timeout_keep_alive=5)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                bound_host, bound_port = sock.getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                phases = describe_load_phases(getattr(engine, "load_phases", {}))  # test fakes have none
                print(f"moec serve: model '{name}' loaded in {load_s:.2f}s ({phases}); listening on "
                      f"http://{shown}:{bound_port} (max_seq_len {state.max_seq_len}, max queue {max_queue}, "
                      f"request timeout {request_timeout_s or 'none'}s, "
                      f"{'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.draining:
                print(f"moec serve: shutting down (running requests get up to {shutdown_timeout_s:g}s)",
                      file=sys.stderr, flush=True)
            state.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down (exit status 143 for SIGTERM);
            # a graceful shutdown is a success, so forget it and return 0.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    server = Server(config)
    failed = []

    def engine_failed() -> None:  # a rank of the group is gone: nothing can be served any more
        if getattr(loop, "group", False):
            failed.append(True)
            print("moec serve: the expert-parallel group failed; stopping (exit 1)", file=sys.stderr, flush=True)
            server.should_exit = True

    loop.on_failure = engine_failed
    try:
        server.run(sockets=[sock])
    except SystemExit as e:  # uvicorn exits 3 when the app's startup fails
        code = e.code if isinstance(e.code, int) else 1
        if code:
            print(f"moec serve: startup failed (exit {code}); see the log above", file=sys.stderr, flush=True)
        return code
    finally:
        sock.close()
    print("moec serve: stopped", file=sys.stderr, flush=True)
    return 1 if failed else 0
