"""The HTTP layer of `moe-runtime serve`, against a fake EngineLoop (no model): fast.

The fake has EngineLoop's interface (submit → RequestStream of StreamEvents, abort, stats,
healthy, start, shutdown) and emits canned words, so these tests pin the wire format, the
errors, auth, limits, metrics, timeouts and disconnects. The real engine behind a real server is
tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import moec

from moec.errors import RequestError
from moec.runtime.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from moec.runtime.sampler import SamplingParams
from moec.runtime.server import build_app
from moec.runtime.stream_event import StreamEvent

MODEL = "tiny-fake"
KEY = "sekret"
MAX_SEQ_LEN = 64
WORDS = ["Hello", " world", ",", " this", " is", " moec", " speaking", "."]


class QueueFull(RequestError):  # EngineLoop's are matched by class name
    pass


class ShuttingDown(RequestError):
    pass


class FakeTokenizer:
    """Characters → ids (BOS 1, EOS 2; specials written as text are matched, like tokenizers does)."""

    def encode(self, text: str, add_special_tokens: bool = True):
        ids, i = [], 0
        while i < len(text):
            for special, tid in (("<s>", 1), ("</s>", 2)):
                if text.startswith(special, i):
                    ids.append(tid)
                    i += len(special)
                    break
            else:
                ids.append(3 + ord(text[i]) % 250)
                i += 1
        return SimpleNamespace(ids=ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        specials = {} if skip_special_tokens else {1: "<s>", 2: "</s>"}
        return "".join(specials.get(t, "") if t in (1, 2) else chr(t - 3) for t in ids)


class FakeStream:
    def __init__(self, loop: FakeLoop, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.loop, self.request_id, self.prompt_ids, self.params = loop, request_id, prompt_ids, params
        self.aborted = False
        self.finished = False

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self):
        return self._events()

    async def _events(self):
        n_prompt, produced, first = len(self.prompt_ids), 0, True
        try:
            while True:
                await asyncio.sleep(self.loop.delay)
                if self.aborted:
                    yield StreamEvent("", [], "abort", n_prompt, produced, time=time.perf_counter())
                    return
                word = WORDS[produced % len(WORDS)]
                produced += 1
                done = produced >= self.params.max_tokens
                yield StreamEvent(word, [100 + produced], "length" if done else None, n_prompt, produced,
                            queue_time_s=0.001 if first else None, time=time.perf_counter())
                first = False
                if done:
                    return
        finally:
            self.finished = True


class FakeLoop:
    def __init__(self, tok_dir: Path, delay: float = 0.0):
        self.engine = SimpleNamespace(
            tokenizer=FakeTokenizer(),
            encode=lambda text: [1] + FakeTokenizer().encode(text, add_special_tokens=False).ids,
            artifact=SimpleNamespace(
                manifest=SimpleNamespace(name=MODEL, step=SimpleNamespace(max_seq_len=MAX_SEQ_LEN)),
                tokenizer_path=tok_dir,
            ),
        )
        self.delay = delay
        self.healthy = True
        self.queue_full = False
        self.fail_with: Exception | None = None
        self.streams: list[FakeStream] = []
        self.started = self.shut_down = False

    def start(self) -> None:
        self.started = True

    async def shutdown(self, cancel_running: bool = False, timeout: float = 30.0) -> None:
        self.shut_down = True

    def submit(self, request_id: str, prompt, params: SamplingParams) -> FakeStream:
        if self.fail_with is not None:
            raise self.fail_with
        if self.queue_full:
            raise QueueFull("256 requests are waiting (--max-queue 256)")
        params.validate()
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + params.max_tokens > MAX_SEQ_LEN:
            raise RequestError(f"prompt of {len(ids)} tokens plus max_tokens {params.max_tokens} exceeds the "
                               f"compiled max_seq_len {MAX_SEQ_LEN}")
        stream = FakeStream(self, request_id, ids, params)
        self.streams.append(stream)
        return stream

    def stats(self) -> dict:
        running = sum(not s.finished for s in self.streams)
        return {"num_running": running, "num_waiting": 0, "kv_usage": running / 10,
                "kv_blocks_total": 10, "kv_blocks_free": 10 - running}


@pytest.fixture
def tok_dir(tmp_path) -> Path:
    d = tmp_path / "tokenizer"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return d


@pytest.fixture
def loop(tok_dir) -> FakeLoop:
    return FakeLoop(tok_dir)


def make_client(loop: FakeLoop, api_key: str | None = None, timeout: float = 30.0, **kw) -> TestClient:
    return TestClient(build_app(loop, MODEL, api_key, timeout, **kw), raise_server_exceptions=False)


@pytest.fixture
def client(loop):
    with make_client(loop) as c:
        yield c


def assert_error(r, status: int, param: str | None = "ANY", code: str | None = "ANY") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param != "ANY":
        assert err["param"] == param, err
    if code != "ANY":
        assert err["code"] == code, err
    return err


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    frames = text.split("\n\n")
    assert frames[-1] == ""
    out = []
    for frame in frames[:-1]:
        assert frame.startswith("data: "), frame
        payload = frame[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return out[:-1]


# --- happy paths ------------------------------------------------------------------------------


def test_completion_n_seed_usage_and_lifespan(loop):
    with make_client(loop) as client:
        assert loop.started
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "n": 2, "seed": 7,
                                                 "stop": "x", "temperature": 0, "some_unknown_field": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert all(c["text"] == "Hello world," and c["finish_reason"] == "length" and c["logprobs"] is None
                   for c in body["choices"])
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
        assert [s.params.seed for s in loop.streams] == [7, 8]
        assert all(s.params.stop == ["x"] and s.params.temperature == 0 for s in loop.streams)
        assert all(s.params.presence_penalty == 0 and s.params.logit_bias == {} for s in loop.streams)
        assert loop.streams[0].prompt_ids == [1, 3 + ord("H"), 3 + ord("i")]  # BOS + text
    assert loop.shut_down


def test_completion_defaults_and_prompt_forms(client, loop):
    r = client.post("/v1/completions", json={"prompt": [[5, 6, 7]], "echo": True, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert loop.streams[-1].prompt_ids == [5, 6, 7]
    assert r.json()["choices"][0]["text"] == FakeTokenizer().decode([5, 6, 7]) + "Hello"
    r = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert loop.streams[-1].params.max_tokens == 16  # OpenAI's default
    # without max_tokens the default is cut to what fits the context
    r = client.post("/v1/completions", json={"prompt": "x" * (MAX_SEQ_LEN - 5)})
    assert r.status_code == 200 and loop.streams[-1].params.max_tokens == 4


def test_chat_uses_template_without_double_bos(client, loop):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 2,
                                                  "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    text = "<s>[system]\nBe brief.</s><s>[user]\nHi there</s><s>[assistant]\n"
    assert loop.streams[-1].prompt_ids == FakeTokenizer().encode(text).ids
    assert loop.streams[-1].prompt_ids[:2] == [1, 3 + ord("[")]  # one BOS
    assert loop.streams[-1].params.max_tokens == 2  # max_completion_tokens wins
    # no max_tokens: as many as fit
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
    assert loop.streams[-1].params.max_tokens == MAX_SEQ_LEN - len(loop.streams[-1].prompt_ids)


def test_chat_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['role'] | upper }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}"}))
    ct = ChatTemplate.from_tokenizer_dir(tmp_path)
    assert not ct.is_default
    assert ct.render([{"role": "user", "content": "hi"}]) == "USER:hi\nASSISTANT:"
    default = ChatTemplate.from_tokenizer_dir(tmp_path / "missing")
    assert default.is_default and default.source == DEFAULT_CHAT_TEMPLATE
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}", "<s>", "</s>")
    with pytest.raises(RequestError):
        sandboxed.render([{"role": "user", "content": "x"}])


def test_streaming_completion_sse_usage_and_done(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "text_completion" and "usage" in e for e in events)
    assert "".join(c["text"] for e in events for c in e["choices"]) == "Hello world,"
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                                   "total_tokens": 6}
    assert all(e["usage"] is None for e in events[:-1])
    # without include_usage: no usage key at all
    events = sse_events(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}).text)
    assert all("usage" not in e for e in events) and all(e["choices"] for e in events)


def test_streaming_chat_roles_deltas_and_n(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                  "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    per_choice = {0: [], 1: []}
    for e in events[:-1]:
        (c,) = e["choices"]
        per_choice[c["index"]].append(c)
    for chunks in per_choice.values():
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in chunks) == "Hello world"
        assert chunks[-1]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_models_health_and_request_id(client, loop):
    r = client.get("/v1/models")
    assert r.json()["object"] == "list" and [m["id"] for m in r.json()["data"]] == [MODEL]
    assert r.json()["data"][0]["max_model_len"] == MAX_SEQ_LEN
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")
    assert client.get("/health").status_code == 200
    r = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/health", headers={"X-Request-Id": "bad id\x01"}).headers[
        "x-request-id"])
    loop.healthy = False
    assert_error(client.get("/health"), 503)
    assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503)


def test_openai_client_against_the_app(loop):
    openai = pytest.importorskip("openai")
    with make_client(loop, api_key=KEY) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2)
        assert [ch.text for ch in c.choices] == ["Hello world"] * 2 and c.usage.completion_tokens == 4
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert chat.choices[0].message.content == "Hello world" and chat.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello world,"
        assert chunks[-1].usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt="Hi")
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
        assert e.value.param == "temperature"
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# --- errors -----------------------------------------------------------------------------------


def test_auth(loop):
    with make_client(loop, api_key=KEY) as client:
        err = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 401, code="invalid_api_key")
        assert err["type"] == "invalid_request_error"
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)
        assert_error(client.get("/nowhere"), 401)  # auth before routing: no path probing
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert_error(client.post("/tokenize", json={"prompt": "x"}), 401)
        assert_error(client.post("/detokenize", json={"tokens": [5]}), 401)
    assert not [s for s in loop.streams]  # refused requests never reached the engine


def test_tokenize_gives_the_ids_a_request_runs_on(client, loop):
    """vLLM's /tokenize and /detokenize: a prompt's ids (BOS included unless add_special_tokens is
    false) and chat messages' rendered ids are what the generation endpoints submit."""
    client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 1})
    r = client.post("/tokenize", json={"prompt": "Hi there", "model": MODEL})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": len(loop.streams[-1].prompt_ids), "max_model_len": MAX_SEQ_LEN,
                        "tokens": loop.streams[-1].prompt_ids}
    bare = client.post("/tokenize", json={"prompt": "Hi there", "add_special_tokens": False}).json()
    assert [1] + bare["tokens"] == r.json()["tokens"] and bare["count"] == r.json()["count"] - 1
    messages = [{"role": "user", "content": "a"}]
    client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    chat = client.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == loop.streams[-1].prompt_ids
    no_prompt = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert chat["tokens"][:no_prompt["count"]] == no_prompt["tokens"] and no_prompt["count"] < chat["count"]
    r = client.post("/detokenize", json={"tokens": bare["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "Hi there"}
    assert client.get("/version").json() == {"version": moec.__version__}

    assert_error(client.post("/tokenize", json={"prompt": "x", "messages": messages}), 400, param="prompt")
    assert_error(client.post("/tokenize", json={}), 400, param="prompt")
    assert_error(client.post("/tokenize", json={"prompt": 5}), 400, param="prompt")
    assert_error(client.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, code="model_not_found")
    assert_error(client.post("/detokenize", json={"tokens": [3, -1]}), 400, param="tokens[1]")
    assert_error(client.post("/detokenize", json={"tokens": "abc"}), 400, param="tokens")


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "temperature": -0.5}', "temperature"),
    (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "x", "top_p": 1.5}', "top_p"),
    (b'{"prompt": "x", "n": 1000}', "n"),
    (b'{"prompt": "x", "n": 0}', "n"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}',
     "stop"),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": []}', "prompt"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"max_tokens": 5}', "prompt"),
    (b'{"prompt": "x"', None),
    (b'not json at all', None),
    (b'', None),
    (b'[1, 2]', None),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "x", "logprobs": -1}', "logprobs"),
    (b'{"prompt": "x", "presence_penalty": 2.5}', "presence_penalty"),
    (b'{"prompt": "x", "frequency_penalty": "1"}', "frequency_penalty"),
    (b'{"prompt": "x", "logit_bias": {"hello": 1}}', "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"5": 101}}', "logit_bias"),
    (b'{"prompt": "x", "repetition_penalty": 0}', "repetition_penalty"),
    (b'{"prompt": "x", "min_p": 1.5}', "min_p"),
    (b'{"prompt": "x", "min_tokens": -1}', "min_tokens"),
    (b'{"prompt": "x", "stop_token_ids": [1, -2]}', "stop_token_ids[1]"),
])
def test_completion_bad_input_is_400(client, loop, body, param):
    err = assert_error(client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}),
                       400, param=param)
    assert err["type"] == "invalid_request_error"
    assert not loop.streams
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("payload, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_chat_bad_input_is_400(client, payload, param):
    assert_error(client.post("/v1/chat/completions", json=payload), 400, param=param)


def test_context_errors_say_how_many_tokens(client):
    err = assert_error(client.post("/v1/completions", json={"prompt": "x" * 100}), 400, code="context_length_exceeded")
    assert "101 tokens" in err["message"] and str(MAX_SEQ_LEN) in err["message"]
    err = assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100}), 400,
                       param="max_tokens", code="context_length_exceeded")
    assert "2 tokens" in err["message"] and "100" in err["message"]


def test_wrong_model_is_404_and_unknown_route(client):
    err = assert_error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404,
                       param="model", code="model_not_found")
    assert "gpt-4" in err["message"]
    assert_error(client.get("/v2/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/completions"), 405)


def test_body_over_the_limit_is_413(client, loop):
    big = b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    err = assert_error(client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}),
                       413, code="request_too_large")
    assert "1000000" in err["message"]

    def chunked():  # no Content-Length: the size is counted as it arrives
        for _ in range(20):
            yield b"x" * 100_000

    assert_error(client.post("/v1/completions", content=chunked()), 413)
    assert not loop.streams
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_queue_full_is_429_with_retry_after(client, loop):
    loop.queue_full = True
    r = client.post("/v1/completions", json={"prompt": "x"})
    err = assert_error(r, 429)
    assert err["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1


def test_partial_submit_is_rolled_back(client, loop):
    original = loop.submit
    calls = []

    def submit_then_fail(request_id, prompt, params):
        calls.append(request_id)
        if len(calls) == 2:
            raise QueueFull("full")
        return original(request_id, prompt, params)

    loop.submit = submit_then_fail
    assert_error(client.post("/v1/completions", json={"prompt": "x", "n": 3}), 429)
    assert len(loop.streams) == 1 and loop.streams[0].aborted


def test_unexpected_error_is_500_and_server_keeps_serving(client, loop, caplog):
    loop.fail_with = RuntimeError("boom")
    with caplog.at_level("INFO", logger="moec.server"):
        r = client.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "req-500"})
    err = assert_error(r, 500, code="internal_error")
    assert err["type"] == "server_error" and "req-500" in err["message"]
    assert any("req-500" in rec.getMessage() and "boom" in rec.getMessage() for rec in caplog.records)
    loop.fail_with = None
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_shutting_down_is_503(client, loop):
    loop.fail_with = ShuttingDown("the server is shutting down and takes no new requests")
    err = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503, code="service_unavailable")
    assert "shutting down" in err["message"]


def test_request_engine_error_is_400(client, loop):
    loop.fail_with = RequestError("prompt token ids must lie in [0, 512)")
    assert "must lie" in assert_error(client.post("/v1/completions", json={"prompt": [9999]}), 400)["message"]


# --- timeouts, disconnects, logs, metrics -------------------------------------------------------


def test_timeout_aborts(tok_dir):
    loop = FakeLoop(tok_dir, delay=0.05)
    with make_client(loop, timeout=0.2) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 40})
        err = assert_error(r, 504, code="request_timeout")
        assert err["type"] == "timeout_error" and r.headers["x-should-retry"] == "false"
        assert loop.streams[-1].aborted
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 40, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "abort"
        assert events[-1]["usage"]["completion_tokens"] < 40
        assert loop.streams[-1].aborted
        metrics = client.get("/metrics").text
        assert 'moec:request_success_total{finished_reason="abort",model_name="tiny-fake"} 2.0' in metrics


async def _asgi_call(app, path: str, payload: dict, disconnect_after: float) -> list[dict]:
    """Call the app as a server would, with a client that goes away after `disconnect_after` s."""
    body = json.dumps(payload).encode()
    sent: list[dict] = []
    queue: asyncio.Queue = asyncio.Queue()
    await queue.put({"type": "http.request", "body": body, "more_body": False})

    async def receive():
        return await queue.get()

    async def send(message):
        sent.append(message)

    async def leave():
        await asyncio.sleep(disconnect_after)
        await queue.put({"type": "http.disconnect"})

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    leaver = asyncio.create_task(leave())
    await asyncio.wait_for(app(scope, receive, send), 5)
    leaver.cancel()
    return sent


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_engine_request(tok_dir, stream):
    loop = FakeLoop(tok_dir, delay=0.02)
    app = build_app(loop, MODEL, None, 30.0)

    async def go():
        await _asgi_call(app, "/v1/completions", {"prompt": "x", "max_tokens": 50, "stream": stream}, 0.15)
        await asyncio.sleep(0.1)  # the engine sends its abort event; the pump records it

    asyncio.run(go())
    (s,) = loop.streams
    assert s.aborted and s.finished


def test_request_log_line(client, caplog):
    with caplog.at_level("INFO", logger="moec.server"):
        client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True},
                    headers={"X-Request-Id": "log-me"})
        client.post("/v1/completions", json={"prompt": "Hi", "top_p": 0}, headers={"X-Request-Id": "bad-one"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "moec.server"]
    ok = next(line for line in lines if line.get("request_id") == "log-me")
    assert ok["status"] == 200 and ok["prompt_tokens"] == 3 and ok["completion_tokens"] == 2
    assert ok["finish_reasons"] == ["length"] and ok["ttft_s"] >= 0 and ok["e2e_s"] >= ok["ttft_s"]
    bad = next(line for line in lines if line.get("request_id") == "bad-one")
    assert bad["status"] == 400 and "top_p" in bad["error"]


def test_metrics_names_and_labels(client):
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 2})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    label = f'model_name="{MODEL}"'
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert f"# TYPE moec:{name} histogram" in text
        count = 4 if name == "inter_token_latency_seconds" else 2  # 2 choices x (3 tokens - 1)
        assert re.search(rf'^moec:{name}_count\{{{label}\}} {count}\.0$', text, re.M), name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"# TYPE moec:{name} gauge" in text and f"moec:{name}{{{label}}}" in text
    assert f"moec:prompt_tokens_total{{{label}}} 6.0" in text
    assert f"moec:generation_tokens_total{{{label}}} 6.0" in text
    assert f'moec:request_success_total{{finished_reason="length",{label}}} 2.0' in text
    assert "_total_total" not in text


# --- the process: startup line, SIGTERM → exit 0 ------------------------------------------------


def _serve_child(tok_dir: Path, write_fd: int) -> None:
    """`serve` in a forked child (torch is already imported there), with fake engine modules."""
    import types

    os.dup2(write_fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)

    class Engine:
        @staticmethod
        def load(path, verify=True, cuda_graphs=True, ep_chunks=None, overlap=True):
            return FakeLoop(tok_dir).engine

    class EngineLoop(FakeLoop):
        def __init__(self, engine, max_queue=256):
            super().__init__(tok_dir, delay=0.01)
            self.engine = engine

        async def shutdown(self, cancel_running=False, timeout=30.0):
            print(f"engine shutdown cancel_running={cancel_running}", file=sys.stderr, flush=True)

    from moec.runtime.engine import describe_load_phases

    sys.modules["moec.runtime.engine"] = types.SimpleNamespace(Engine=Engine, describe_load_phases=describe_load_phases)
    sys.modules["moec.runtime.engine_loop"] = types.SimpleNamespace(EngineLoop=EngineLoop)
    from moec.runtime.server import serve

    sys.exit(serve("unused", "127.0.0.1", 0, "k", 4, 30.0, False, shutdown_timeout_s=5.0))


def test_serve_process_prints_address_and_exits_0_on_sigterm(tok_dir):
    import multiprocessing

    import httpx

    read_fd, write_fd = os.pipe()
    proc = multiprocessing.get_context("fork").Process(target=_serve_child, args=(tok_dir, write_fd))
    proc.start()
    os.close(write_fd)
    stderr = os.fdopen(read_fd, "r")
    try:
        line = ""
        deadline = time.monotonic() + 10
        while "listening on" not in line and time.monotonic() < deadline:
            line = stderr.readline()
            assert line or proc.is_alive(), "server exited early"
        url = re.search(r"listening on (http://\S+)", line).group(1)
        assert re.search(r"loaded in \d+\.\d+s", line)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer k"}, timeout=5)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        # a streaming request in flight when SIGTERM comes still finishes
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 30, "stream": True},
                          headers={"Authorization": "Bearer k"}, timeout=5) as resp:
            it = resp.iter_lines()
            assert next(it).startswith("data: ")
            os.kill(proc.pid, signal.SIGTERM)
            rest = list(it)
        assert "data: [DONE]" in rest
        proc.join(timeout=10)
        assert proc.exitcode == 0
        err = stderr.read()
        assert "engine shutdown cancel_running=True" in err and "stopped" in err
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        stderr.close()


def test_penalties_and_logit_bias_reach_the_sampling(client, loop):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                  "presence_penalty": 0.5, "frequency_penalty": -1,
                                                  "logit_bias": {"17": -100, " 3": 2.5}})
    assert r.status_code == 200, r.text
    params = loop.streams[-1].params
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.5, -1.0, {17: -100.0, 3: 2.5})


def test_vllm_sampling_extensions_reach_the_sampling(client, loop):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "repetition_penalty": 1.3,
                                             "min_p": 0.05, "min_tokens": 2, "stop_token_ids": [5, 9]})
    assert r.status_code == 200, r.text
    params = loop.streams[-1].params
    assert (params.repetition_penalty, params.min_p, params.min_tokens, params.stop_token_ids) == (1.3, 0.05, 2, [5, 9])
    err = assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "min_tokens": 5}), 400)
    assert "min_tokens must be in [0, max_tokens = 4]" in err["message"]


def test_echo_with_logprobs_asks_for_the_prompts(client, loop):
    """echo + logprobs N asks the engine for the prompt's log-probabilities with N top ones (the
    real server's output: tests/test_server.py); logprobs alone, or chat, do not."""
    for body, want in (({"echo": True, "logprobs": 2}, 2), ({"logprobs": 2}, None), ({"echo": True}, None)):
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **body})
        assert r.status_code == 200, r.text
        assert loop.streams[-1].params.prompt_logprobs == want, body
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 1,
                                               "logprobs": True, "top_logprobs": 2})
    assert loop.streams[-1].params.prompt_logprobs is None
