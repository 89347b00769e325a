"""`moe-runtime serve` for real: a server process on 127.0.0.1, driven by the openai client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import ROOT, run_cli

API_KEY = "test-key"
SERVED_NAME = "moec-tiny"  # --served-model-name, in place of the artifact's name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moec.runtime", "serve", str(artifact), "--host", "127.0.0.1",
             "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def metric(self, name: str) -> float:
        return sum(v for k, v in self.metrics().items() if k.split("{")[0] == name)


def greedy_texts(base: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions of `prompts`, all sent at once, in prompt order."""
    import asyncio

    async def ask(client: httpx.AsyncClient, prompt: str) -> str:
        r = await client.post(f"{base}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    async def all_of_them() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(ask(client, p) for p in prompts))

    return asyncio.run(all_of_them())


@pytest.fixture(scope="module")
def server(tiny_artifact):
    srv = Server(tiny_artifact, "--api-key", API_KEY, "--served-model-name", SERVED_NAME)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_served_model_name_tokenize_and_detokenize(client, model_name, server):
    """--served-model-name is the id clients see and send; /tokenize counts a prompt as the
    completion's usage does; /detokenize turns the ids back into the text."""
    assert model_name == SERVED_NAME
    prompt = "The mixture of experts"
    usage = client.completions.create(model=model_name, prompt=prompt, max_tokens=1).usage
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{server.base}/tokenize", json={"model": model_name, "prompt": prompt}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == usage.prompt_tokens == len(r.json()["tokens"])
    bare = httpx.post(f"{server.base}/tokenize", json={"prompt": prompt, "add_special_tokens": False},
                      headers=auth).json()["tokens"]
    assert httpx.post(f"{server.base}/detokenize", json={"tokens": bare}, headers=auth).json() == {"prompt": prompt}
    r = httpx.post(f"{server.base}/detokenize", json={"tokens": [10**6]}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_echo_with_logprobs_scores_the_prompt(client, model_name, tiny_artifact, server):
    """OpenAI's echo + logprobs (how evaluation harnesses score a text): the prompt's tokens (the
    first with no log-probability) as the engine's prompt_logprobs, then the generated ones, their
    offsets into the echoed text; streamed, the echo chunk carries the prompt's part."""
    from moec.runtime import Engine

    prompt = "The mixture of experts"
    engine = Engine.load(tiny_artifact)
    want = engine.generate(prompt, max_tokens=2, logprobs=2, prompt_logprobs=2)[0]
    ids = engine.encode(prompt)
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0, logprobs=2,
                                  echo=True)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert text.startswith(prompt) and len(lp.tokens) == len(ids) + 2 == r.usage.prompt_tokens + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([w.logprob for w in want.prompt_logprobs[1:] + want.logprobs],
                                                  abs=1e-5)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    # each token's text stands at its offset (the BOS, which the echoed text does not show, at 0)
    assert all(text[at:at + len(tok)] == tok for tok, at in zip(lp.tokens[1:], lp.text_offset[1:]))
    assert lp.text_offset[len(ids)] == len(prompt)

    chunks = list(client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0,
                                            logprobs=2, echo=True, stream=True))
    first = chunks[0].choices[0]
    assert first.text == prompt and first.logprobs.tokens == lp.tokens[:len(ids)]
    assert first.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == text
    rest = [x for c in streamed[1:] if c.logprobs for x in c.logprobs.token_logprobs]
    assert rest == pytest.approx(lp.token_logprobs[len(ids):], abs=1e-5)
    assert [at for c in streamed[1:] if c.logprobs for at in c.logprobs.text_offset] == lp.text_offset[len(ids):]

    # max_tokens 0: the prompt scored, nothing generated (OpenAI's and vLLM's scoring form)
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(ids)], abs=1e-5)
    chunks = list(client.completions.create(model=model_name, prompt=prompt, max_tokens=0, logprobs=1, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt and chunks[-1].choices[0].finish_reason == "length"
    r = httpx.post(f"{server.base}/v1/completions", json={"model": model_name, "prompt": prompt, "max_tokens": 0},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_vllm_prompt_logprobs(client, model_name, tiny_artifact, server):
    """vLLM's prompt_logprobs: per prompt token (None for the first) its id's log-probability and
    rank and the n most likely, keyed by id; on a completion choice beside echo's own count, and
    at the top of a chat response; refused when streamed, as vLLM does."""
    from moec.runtime import Engine

    prompt = "The mixture of experts"
    engine = Engine.load(tiny_artifact)
    want = engine.generate(prompt, max_tokens=1, prompt_logprobs=3)[0].prompt_logprobs
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, logprobs=1, echo=True,
                                  extra_body={"prompt_logprobs": 3})
    choice = r.model_dump()["choices"][0]
    got = choice["prompt_logprobs"]
    assert len(got) == len(want) == r.usage.prompt_tokens and got[0] is None
    for position, w in zip(got[1:], want[1:]):
        ids = [w.token] + [t for t, _ in w.top if t != w.token]
        assert list(position) == [str(t) for t in ids] and len(ids) in (3, 4)
        assert position[str(w.token)]["logprob"] == pytest.approx(w.logprob, abs=1e-5)
        assert position[str(w.token)]["rank"] == w.rank >= 1
        tops = [position[str(t)] for t, _ in w.top]
        assert [t["logprob"] for t in tops] == pytest.approx([lp for _, lp in w.top], abs=1e-5)
        assert all(t["rank"] == i for i, t in enumerate(tops, start=1) if t is not position[str(w.token)])
        assert position[str(w.token)]["decoded_token"] == engine.tokenizer.decode([w.token])
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # echo's own count, 1

    auth = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "prompt_logprobs": 2}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=chat, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None
    assert all(2 <= len(p) <= 3 for p in body["prompt_logprobs"][1:])
    plain = client.completions.create(model=model_name, prompt=prompt, max_tokens=1).model_dump()
    assert plain["choices"][0]["prompt_logprobs"] is None
    r = httpx.post(f"{server.base}/v1/chat/completions", json={**chat, "stream": True}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_completion_and_usage(client, model_name):
    r = client.completions.create(model=model_name, prompt="The mixture of experts", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].text


def test_greedy_equals_moe_runtime_generate(client, model_name, tiny_artifact):
    prompt = "Once upon a time, in a kitchen far away, a baker"
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=20, temperature=0)
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", prompt, "--max-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == prompt + r.choices[0].text


def test_logprobs_through_the_openai_client(client, model_name, tiny_artifact):
    """Completions (legacy shape) and chat (content entries), whole and streamed: the engine's
    log-probabilities for the same greedy tokens, the top ones most likely first."""
    from moec.runtime import Engine

    prompt = "The mixture of experts"
    want = Engine.load(tiny_artifact).generate(prompt, max_tokens=8, logprobs=2)[0].logprobs
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(want) == r.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx([w.logprob for w in want], abs=1e-5)
    for top, w in zip(lp.top_logprobs, want):  # keyed by text: ids that decode alike share a key
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(w.top[0][1], abs=1e-5)
        assert all(min(abs(v - x) for _, x in w.top) <= 1e-5 for v in top.values())
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(top[tok] == pytest.approx(v, abs=1e-5)  # greedy: each token is its step's most likely
               for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))

    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
               and c.bytes == list(c.token.encode()) for c in content)
    streamed = [c for chunk in client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    plain = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


def test_logit_bias_and_penalties_through_the_openai_client(client, model_name, server):
    """A +100 bias makes greedy decoding repeat its token; a bad token id is a 400, and the server
    goes on serving."""
    forced = client.completions.create(model=model_name, prompt="Rain", max_tokens=5, temperature=0,
                                       logit_bias={"42": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [forced.choices[0].logprobs.tokens[0]] * 5
    plain = client.completions.create(model=model_name, prompt="Rain", max_tokens=12, temperature=0)
    penalised = client.completions.create(model=model_name, prompt="Rain", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].text != plain.choices[0].text
    headers = {"Authorization": f"Bearer {API_KEY}"}
    err = error_of(httpx.post(f"{server.base}/v1/completions", headers=headers, json={
        "model": model_name, "prompt": "Rain", "max_tokens": 2, "logit_bias": {"99999999": 1}}), 400)
    assert "logit_bias" in err["message"]
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_vllm_extensions_through_the_openai_client(client, model_name):
    """vLLM's sampling extensions, sent as a vLLM user sends them (extra_body), change the output
    (the engine's tests check each against its formula and transformers)."""
    plain = client.completions.create(model=model_name, prompt="Rain", max_tokens=8, temperature=0)
    repeated = client.completions.create(model=model_name, prompt="Rain", max_tokens=8, temperature=0,
                                         extra_body={"repetition_penalty": 3.0, "min_tokens": 8, "min_p": 0.1,
                                                     "stop_token_ids": [1]})
    assert repeated.choices[0].finish_reason == "length" and repeated.choices[0].text != plain.choices[0].text


def test_chat_completion(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 8


def test_streaming_with_usage(client, model_name):
    full = client.completions.create(model=model_name, prompt="Rain fell", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=model_name, prompt="Rain fell", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    chat = list(client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, stream=True, temperature=0))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("stop", "length")


def test_n_and_seed(client, model_name):
    r = client.completions.create(model=model_name, prompt="Compilers", max_tokens=10, n=3, temperature=1.0,
                                  seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model=model_name, prompt="Compilers", max_tokens=10, n=3, temperature=1.0,
                                      seed=11)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]


def test_stop_strings(client, model_name):
    full = client.completions.create(model=model_name, prompt="The history of bread", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = client.completions.create(model=model_name, prompt="The history of bread", max_tokens=24,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)


def test_64_concurrent_streams_then_all_blocks_free(server, model_name):
    words = "the weather over the old printing house changed every hour while bread baked".split()

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        prompt = " ".join(words[j % len(words)] for j in range(1 + (i * 7) % 60))
        want = 4 + i % 13
        body = {"model": model_name, "prompt": prompt, "max_tokens": want, "temperature": 0.7, "seed": i,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        pieces, usage = 0, None
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    pieces += 1
        return want, usage["completion_tokens"]

    async def all_of_them():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.base, headers=headers, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert all(want == got for want, got in results), results
    assert server.metric("moec:kv_cache_usage_perc") == 0
    assert server.metric("moec:num_requests_running") == 0
    assert server.metric("moec:num_requests_waiting") == 0
    assert server.metric("moec:request_success_total") >= 64
    assert server.metric("moec:time_to_first_token_seconds_count") >= 64


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "hi", "max_tokens": 4, "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 4, "temperature": float("nan")}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 4, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "max_tokens": 4, "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "max_tokens": 4, "n": 100000}, 400, "n"),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": 12, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": "four"}, 400, "max_tokens"),
    ({"prompt": "word " * 600, "max_tokens": 4}, 400, "max_seq_len"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 4, "model": "gpt-9"}, 404, "gpt-9"),
])
def test_bad_requests(server, model_name, body, status, needle):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    payload = json.dumps({"model": model_name, **body}, allow_nan=True)
    err = error_of(httpx.post(f"{server.base}/v1/completions", content=payload, headers=headers), status)
    assert needle.lower() in (err["message"] + str(err.get("param"))).lower(), err
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_invalid_json_and_huge_body(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    error_of(httpx.post(f"{server.base}/v1/completions", content=b"{not json", headers=headers), 400)
    big = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    error_of(httpx.post(f"{server.base}/v1/completions", content=big, headers=headers, timeout=60), 413)
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_api_key(server, model_name):
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2}
    error_of(httpx.post(f"{server.base}/v1/completions", json=body), 401)
    error_of(httpx.post(f"{server.base}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.get(f"{server.base}/v1/models"), 401)
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_client_disconnect_frees_blocks(server, model_name):
    body = {"model": model_name, "prompt": "A storm crossed the valley and", "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=headers, timeout=60) as resp:
        lines = resp.iter_lines()  # kept alive: abandoning the iterator would close the stream
        for _ in range(6):
            next(lines)
        assert server.metric("moec:kv_cache_usage_perc") > 0
        assert server.metric("moec:num_requests_running") == 1
    deadline = time.time() + 30
    while server.metric("moec:kv_cache_usage_perc") > 0 and time.time() < deadline:
        time.sleep(0.2)
    assert server.metric("moec:kv_cache_usage_perc") == 0
    assert server.metric("moec:num_requests_running") == 0
    assert server.metrics()[f'moec:request_success_total{{finished_reason="abort",model_name="{SERVED_NAME}"}}'] >= 1
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_artifact):
    srv = Server(tiny_artifact, "--max-queue", "1")
    try:
        body = {"prompt": "The weather", "max_tokens": 300, "ignore_eos": True}

        async def flood():
            async with httpx.AsyncClient(base_url=srv.base, timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(20)))

        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        assert 429 in statuses and 200 in statuses, statuses
        limited = next(r for r in responses if r.status_code == 429)
        error_of(limited, 429)
        assert int(limited.headers["Retry-After"]) >= 1
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_running_requests_and_exits_zero(tiny_artifact):
    srv = Server(tiny_artifact)
    body = {"prompt": "The weather", "max_tokens": 200, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    usage, signalled = None, False
    with httpx.stream("POST", f"{srv.base}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not signalled and line.startswith("data: "):
                srv.proc.send_signal(signal.SIGTERM)  # mid-stream: the request must still finish
                signalled = True
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None and usage["completion_tokens"] == 200
    assert srv.proc.wait(timeout=60) == 0
    out = srv.proc.stdout.read()
    assert "127.0.0.1" in out and "load" in out.lower()
