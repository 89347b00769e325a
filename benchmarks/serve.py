"""`moe-runtime serve` under load, against `transformers` `generate` in static batches, in one run.

    .venv/bin/python benchmarks/serve.py --quick                  # CI-sized: 16 requests at 32 req/s, short
    .venv/bin/python benchmarks/serve.py                          # 200 requests, Poisson at 16 req/s
    .venv/bin/python benchmarks/serve.py --rate inf --num-requests 64 --prompt-len 8:64 --output-len 16:64
    .venv/bin/python benchmarks/serve.py --artifact artifacts/tiny-mixtral --hf-dir /path/to/hf   # reuse

What it does, in order:

1. Source and artifact. Without `--artifact` it writes the synthetic Hugging Face model of `--recipe`
   (default recipes/tiny-mixtral.yaml) and compiles it into a temporary directory, exactly as
   benchmarks/cpu_tiny.py does. With `--artifact`, the HF weights for the baseline come from
   `--hf-dir`, else from the `model.path` the artifact's manifest recorded.
2. Workload, seeded (`--seed`): `--num-requests` requests whose prompt and output lengths are drawn
   uniformly from `--prompt-len A:B` and `--output-len A:B` (inclusive; `N` alone = fixed). Prompts
   are random English words, grown until they reach the drawn token count and then cut at that
   token (kept only if the cut text re-encodes to exactly that many tokens, else the whole-word
   version is kept: lengths are "roughly" controlled, the actual counts are recorded). Token ids are
   those the runtime's tokenizer gives (BOS + text), and the server's `usage.prompt_tokens` is
   checked against them. Arrivals are a Poisson process at `--rate` req/s (`inf`: all at t=0).
3. moec: `python -m moec.runtime serve ARTIFACT --host 127.0.0.1 --port <free>` in a subprocess,
   waited on through `GET /health`; 2 warm-up requests; then every request is sent at its arrival
   time by an `httpx.AsyncClient` as a streaming `POST /v1/completions` (`ignore_eos`, greedy,
   `stream_options.include_usage`). Per request: TTFT (send → first SSE chunk with text), ITL
   (gaps between chunk arrivals with text, as vLLM's benchmark_serving counts them), TPOT
   ((e2e − TTFT)/(completion tokens − 1), robust to chunks that carry several tokens or none),
   e2e (send → `data: [DONE]`), completion tokens from `usage`. The server is stopped with SIGTERM
   at the end and its exit status is recorded (0 expected).
4. Baseline — what a user has today: the same requests (same prompt token ids, same output lengths)
   through `model.generate` of `transformers` on the same HF weights, device and dtype, in static
   batches: greedy, left padding, `min_new_tokens = max_new_tokens =` the longest output of the
   batch (every sequence runs until the batch's longest is done: the "wasted" decode slots are
   reported), default attention implementation. The same arrival times are replayed on a virtual
   clock: when the model is free, the up-to-`--hf-batch` requests that have arrived form the next
   batch (at `--rate inf` every batch is full); the batches run back to back for real and the clock
   advances by their measured time. A request's TTFT = its wait + the time until its batch's first
   token; e2e = its wait + its batch's whole generate (a static batch returns all at once); ITL =
   the batch's decode-step intervals over the request's own tokens (what it would see if that batch
   were streamed). Step times are measured, not approximated: a `streamer` records the time at
   which each step's tokens reach the host (`generate` calls it once per step, after the token is
   sampled), so the batch's first-token time is its prefill + first sampling, without a separate
   1-token `generate` to approximate it (the two agree within ~0.3 ms on the tiny model, CPU). The
   baseline's TPOT, (e2e − TTFT)/(tokens − 1), therefore includes the wait for the batch's longest
   output: that is what a caller of a static batch sees; its ITL is the streamed view.
5. Results: benchmarks/results/serve-<device>-<date>.json (config, versions, commit, metrics with
   unit and direction, per-request raw timings) and a .png next to it (CDFs of TTFT, ITL, e2e;
   throughput bars), then a table on stdout.

Both sides run on the same machine one after the other (server first, then the baseline, with the
server stopped), so they do not share CPU. The load generator itself runs on the same machine as the
server and takes some of its CPU; the baseline has no HTTP at all. On a CPU both sides get
`--threads` torch threads (default cores − 1: a core is left to the load generator, and torch's
OpenMP threads slow down many-fold — 2 ms → 400 ms a step was seen — when another process takes
one of their cores); the CPU that other processes used during each phase is recorded and warned
about, since a shared machine skews the numbers. Everything is bounded in time
(`--startup-timeout`, `--request-timeout`, `--load-timeout`) and talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import free_port  # noqa: E402
PERCENTILES = (50, 90, 99)

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be this are not but had "
    "have it were they all their one been has there more when who will would time year people way day man "
    "thing woman life child world school state family student group country problem hand part place case "
    "week company system program question work government number night point home water room mother area "
    "money story fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party "
    "result change morning reason research girl guy moment air teacher force education foot boy age policy "
    "music market sense nation plan college interest death experience effect class control care field "
    "development role effort rate heart drug show leader light voice wife police mind price report decision "
    "son view relationship town road arm difference value building action model season society tax director "
    "position player record paper space ground form event official matter center couple site project activity "
    "star table need court oil situation cost industry figure street image phone data picture practice piece "
    "land product doctor wall patient worker news test movie north love support technology step baby computer "
    "type attention film tree source organization hair window evidence population site bread river mountain "
    "expert mixture compiler kernel memory garden storm valley baker kitchen printing weather"
).split()


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class Request:
    index: int
    arrival_s: float  # offset from the start of the load
    prompt: str
    prompt_ids: list[int]
    target_prompt_len: int
    output_len: int


@dataclass
class Outcome:
    """One request's measurements, all times in seconds."""
    index: int
    ok: bool = False
    error: str | None = None
    send_s: float = 0.0  # offset from the start of the load
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    chunks: int = 0
    empty_chunks: int = 0
    text_chars: int = 0
    finish_reason: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


def parse_range(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or A:B (integers)") from None
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= A <= B")
    return lo, hi


def parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of requests/s or 'inf'") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate must be > 0 (or inf)")
    return rate


class PromptTokenizer:
    """The runtime's encoding (moec.runtime.engine: BOS, then the text without special tokens)."""

    def __init__(self, tok_dir: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        cfg_file = tok_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return self.tokenizer.token_to_id(tok) if tok else None

        self.bos_id = token_id("bos_token") if cfg.get("add_bos_token", True) else None
        self.eos_id = token_id("eos_token")

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def make_prompt(rng: np.random.Generator, tok: PromptTokenizer, target: int) -> tuple[str, list[int]]:
    words: list[str] = []
    ids = tok.encode("")
    while len(ids) < target:
        words.append(str(rng.choice(WORDS)))
        ids = tok.encode(" ".join(words))
    if len(ids) > target:  # cut at the target token if that text re-encodes to exactly it
        skip = 1 if tok.bos_id is not None else 0
        cut = tok.decode(ids[skip:target])
        cut_ids = tok.encode(cut)
        if cut and len(cut_ids) == target:
            return cut, cut_ids
    return " ".join(words), ids


def make_workload(args, tok: PromptTokenizer) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    prompt_lens = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, size=n)
    output_lens = rng.integers(args.output_len[0], args.output_len[1] + 1, size=n)
    if math.isinf(args.rate):
        arrivals = np.zeros(n)
    else:
        gaps = rng.exponential(1.0 / args.rate, size=n)
        gaps[0] = 0.0
        arrivals = np.cumsum(gaps)
    reqs = []
    for i in range(n):
        prompt, ids = make_prompt(rng, tok, int(prompt_lens[i]))
        reqs.append(Request(i, float(arrivals[i]), prompt, ids, int(prompt_lens[i]), int(output_lens[i])))
    return reqs


# ------------------------------------------------------------------------------------ source and artifact


def prepare_model(args, work: Path | None) -> tuple[Path, Path | None, dict, float | None]:
    """Return (artifact, hf_dir, manifest, compile_s); build what was not given into `work`."""
    import yaml

    compile_s = None
    if args.artifact:
        artifact = Path(args.artifact)
        hf_dir = Path(args.hf_dir) if args.hf_dir else None
    else:
        from rich.console import Console

        from moec.compiler.pipeline import compile_recipe
        from moec.compiler.recipe import parse_recipe
        from moec.compiler.synthetic import write_synthetic_model

        assert work is not None
        recipe_data = yaml.safe_load(Path(args.recipe).read_text())
        if args.hf_dir:
            hf_dir = Path(args.hf_dir)
        elif "synthetic" in recipe_data["model"]:
            syn = recipe_data["model"]["synthetic"]
            print(f"writing the synthetic {syn['architecture']} of {args.recipe} …", file=sys.stderr)
            # the recipe's checkpoint dtype (bf16 halves a GPU-sized model on disk), drawn on the GPU
            # when the recipe targets one (seconds instead of minutes for billions of parameters)
            import torch

            init_device = "cuda" if str(recipe_data.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available() else "cpu"
            hf_dir = write_synthetic_model(syn["architecture"], syn["config"], syn["seed"], work / "hf",
                                           dtype=syn.get("dtype", "float32"), init_device=init_device)
        else:
            hf_dir = Path(recipe_data["model"]["path"])
        recipe_data["model"] = {"path": str(hf_dir)}
        recipe_data.pop("output_dir", None)
        artifact = work / "artifact"
        print(f"compiling {args.recipe} → {artifact} …", file=sys.stderr)
        start = time.perf_counter()
        compile_recipe(parse_recipe(recipe_data), artifact, console=Console(stderr=True, quiet=True))
        compile_s = time.perf_counter() - start
        print(f"compiled in {compile_s:.1f}s", file=sys.stderr)
    manifest = json.loads((artifact / "manifest.json").read_text())
    if hf_dir is None:
        recorded = ((manifest.get("recipe") or {}).get("model") or {}).get("path")
        hf_dir = Path(recorded) if recorded else None
    if hf_dir is not None and not (hf_dir / "config.json").is_file():
        print(f"warning: {hf_dir} is not a Hugging Face model directory; no baseline", file=sys.stderr)
        hf_dir = None
    return artifact, hf_dir, manifest, compile_s


# ------------------------------------------------------------------------------------------------ server


class CpuWatch:
    """How many cores other processes kept busy since creation (Linux /proc/stat; None elsewhere).

    Machine-wide busy time minus this process's and its waited-for children's (the server, once stopped).
    """

    def __init__(self):
        self.start = (time.perf_counter(), self._busy(), self._own())

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self) -> float | None:
        wall0, busy0, own0 = self.start
        busy, wall = self._busy(), time.perf_counter() - wall0
        if busy is None or busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - busy0) - (self._own() - own0)) / wall


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    def __init__(self, artifact: Path, log_path: Path, extra_args: list[str], threads: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "moec.runtime", "serve", str(artifact), "--host", "127.0.0.1",
                    "--port", str(self.port), *extra_args]
        self.env = dict(os.environ)
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.exit: dict | None = None

    def start(self, timeout: float) -> None:
        import httpx

        self._log = open(self.log_path, "wb")
        print(f"starting: {shlex.join(self.cmd)}", file=sys.stderr)
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env=self.env)
        deadline = start + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was healthy:\n"
                                       f"{tail(self.log_path)}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the server was not healthy after {timeout:.0f}s:\n{tail(self.log_path)}")
                time.sleep(0.1)
        self.startup_s = time.perf_counter() - start
        print(f"server healthy on {self.url} after {self.startup_s:.1f}s", file=sys.stderr)

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGTERM, wait; SIGKILL only if it does not exit within `timeout`."""
        if self.proc is None:
            return {"stopped": False}
        if self.exit is not None:
            return self.exit
        if self.proc.poll() is not None:
            self.exit = {"signal": None, "returncode": self.proc.returncode, "exited_before_sigterm": True,
                         "clean": False}
        else:
            start = time.perf_counter()
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout)
                self.exit = {"signal": "SIGTERM", "returncode": rc, "seconds_to_exit": time.perf_counter() - start,
                             "clean": rc == 0}
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(timeout=10)
                self.exit = {"signal": "SIGTERM", "returncode": rc, "killed_after_s": timeout, "clean": False}
        self._log.close()
        return self.exit


# ------------------------------------------------------------------------------------------ load generator


async def send_one(client, model: str, req: Request, t0: float, args, out: Outcome) -> None:
    """Wait for the request's arrival, stream it, fill `out` (never raises)."""
    import httpx

    try:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    except asyncio.CancelledError:
        out.error = f"not sent within --load-timeout {args.load_timeout}s"
        raise
    payload = {
        "model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    start = time.perf_counter()
    out.send_s = start - t0
    last = None
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                out.error = f"HTTP {resp.status_code}: {body[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return
                choices = event.get("choices") or []
                if choices:
                    text = choices[0].get("text") or ""
                    out.finish_reason = choices[0].get("finish_reason") or out.finish_reason
                    if text:
                        out.chunks += 1
                        out.text_chars += len(text)
                        if last is None:
                            out.ttft_s = now - start
                        else:
                            out.itl_s.append(now - last)
                        last = now
                    else:
                        out.empty_chunks += 1
                if event.get("usage"):
                    out.completion_tokens = event["usage"].get("completion_tokens")
                    out.prompt_tokens = event["usage"].get("prompt_tokens")
        out.e2e_s = time.perf_counter() - start
        if not done:
            out.error = "stream ended without data: [DONE]"
        elif out.completion_tokens is None:
            out.error = "no usage in the stream"
        elif out.ttft_s is None:
            out.error = "no text in the stream"
        else:
            out.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        out.error = f"{type(e).__name__}: {str(e)[:300]}"
    except asyncio.CancelledError:
        out.error = f"not finished within --load-timeout {args.load_timeout}s"
        raise


async def run_load(url: str, model: str, reqs: list[Request], args) -> tuple[list[Outcome], float, float]:
    """Warm up, then send every request at its arrival time. Returns (outcomes, t0, makespan_s)."""
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False) as client:
        warm = [Request(-1 - i, 0.0, "warm up the server", [], 0, 4) for i in range(2)]
        warm_out = [Outcome(r.index) for r in warm]
        t = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(send_one(client, model, r, t, args, o)
                                                for r, o in zip(warm, warm_out))), args.request_timeout)
        for o in warm_out:
            if not o.ok:
                raise RuntimeError(f"warm-up request failed: {o.error}")

        outcomes = [Outcome(r.index) for r in reqs]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(send_one(client, model, r, t0, args, o)) for r, o in zip(reqs, outcomes)]
        finished, pending = await asyncio.wait(tasks, timeout=args.load_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        ends = [o.send_s + o.e2e_s for o in outcomes if o.ok]
        makespan = max(ends) if ends else float("nan")
    return outcomes, t0, makespan


def model_name(url: str, fallback: str) -> str:
    import httpx

    try:
        r = httpx.get(f"{url}/v1/models", timeout=5.0, trust_env=False)
        data = r.json().get("data") or []
        if r.status_code == 200 and data:
            return data[0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    return fallback


def scrape_metrics(url: str) -> dict[str, float]:
    """The moec: counters and gauges from /metrics (best effort; histograms' buckets left out)."""
    import httpx

    try:
        r = httpx.get(f"{url}/metrics", timeout=5.0, trust_env=False)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    found = {}
    for line in r.text.splitlines():
        m = re.match(r"^(moec:[a-zA-Z_:]+?)(\{[^}]*\})?\s+([-+0-9.eEinfINFaN]+)$", line)
        if m and not m.group(1).endswith("_bucket") and not m.group(1).endswith("_created"):
            labels = re.sub(r'model_name="[^"]*",?', "", m.group(2) or "").replace(",}", "}").replace("{}", "")
            found[m.group(1) + labels] = float(m.group(3))
    return found


# ----------------------------------------------------------------------------------------------- baseline


class StepTimer:
    """A `generate` streamer that only records when each step's tokens reach the host."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:  # the first call hands over the prompt, before any forward
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_baseline(hf_dir: Path, manifest: dict, reqs: list[Request], args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(manifest.get("device", "cpu"))
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    print(f"baseline: loading {hf_dir} ({dtype}, {device}) …", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None:
        pad = 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_batch(batch: list[Request], max_new: int) -> tuple[float, list[float], int]:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                            device=device)
        timer = StepTimer()
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad, streamer=timer)
            sync()
            duration = time.perf_counter() - start
        if out.shape[1] != width + max_new or len(timer.times) != max_new:
            raise RuntimeError(f"baseline generate returned {out.shape[1] - width} tokens "
                               f"({len(timer.times)} steps), asked for {max_new}")
        return duration, [t - start for t in timer.times], width

    run_batch(reqs[: args.hf_batch], 4)  # warm-up

    per_request: dict[int, dict] = {}
    batches = []
    clock = 0.0  # virtual: the arrival schedule replayed on the measured batch times
    busy = 0.0
    i = 0
    n = len(reqs)
    wall_start = time.perf_counter()
    while i < n:
        if time.perf_counter() - wall_start > args.load_timeout:
            raise RuntimeError(f"the baseline did not finish within --load-timeout {args.load_timeout}s")
        clock = max(clock, reqs[i].arrival_s)
        j = i
        while j < n and j - i < args.hf_batch and reqs[j].arrival_s <= clock:
            j += 1
        batch = reqs[i:j]
        max_new = max(r.output_len for r in batch)
        duration, steps, width = run_batch(batch, max_new)
        for r in batch:
            wait = clock - r.arrival_s
            per_request[r.index] = {
                "index": r.index, "ok": True, "queue_s": wait,
                "ttft_s": wait + steps[0], "e2e_s": wait + duration,
                "itl_s": list(np.diff(steps[: r.output_len])),
                "completion_tokens": r.output_len, "prompt_tokens": len(r.prompt_ids),
            }
        batches.append({
            "size": len(batch), "start_s": clock, "duration_s": duration, "first_token_s": steps[0],
            "max_new_tokens": max_new, "useful_tokens": sum(r.output_len for r in batch),
            "padded_width": width, "prompt_tokens": sum(len(r.prompt_ids) for r in batch),
        })
        clock += duration
        busy += duration
        i = j
    return {
        "requests": [per_request[r.index] for r in reqs],
        "batches": batches,
        "makespan_s": clock - reqs[0].arrival_s,
        "busy_s": busy,
        "pad_token_id": pad,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


# ------------------------------------------------------------------------------------------------ metrics


def metric(name: str, value, unit: str, direction: str, note: str | None = None) -> dict:
    m = {"name": name, "value": None if value is None or (isinstance(value, float) and math.isnan(value))
         else value, "unit": unit, "direction": direction}
    if note:
        m["note"] = note
    return m


def latency_metrics(prefix: str, values: list[float], unit: str = "ms") -> list[dict]:
    scale = 1000.0 if unit == "ms" else 1.0
    arr = np.asarray(values, dtype=float) * scale
    out = [metric(f"{prefix}_mean", float(arr.mean()) if arr.size else None, unit, "lower")]
    for p in PERCENTILES:
        out.append(metric(f"{prefix}_p{p}", float(np.percentile(arr, p)) if arr.size else None, unit, "lower"))
    return out


def summarize(requests: list[dict], makespan_s: float) -> list[dict]:
    ok = [r for r in requests if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in ok)
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in ok if r["completion_tokens"] > 1]
    return [
        metric("output_throughput", tokens / makespan_s if ok else None, "tokens/s", "higher",
               "completion tokens of finished requests / (last finish − first arrival)"),
        metric("request_throughput", len(ok) / makespan_s if ok else None, "requests/s", "higher"),
        metric("completed_requests", len(ok), "requests", "higher"),
        metric("failed_requests", len(requests) - len(ok), "requests", "lower"),
        metric("output_tokens", tokens, "tokens", "higher"),
        metric("makespan", makespan_s, "s", "lower"),
        *latency_metrics("ttft", [r["ttft_s"] for r in ok]),
        *latency_metrics("itl", [x for r in ok for x in r["itl_s"]]),
        *latency_metrics("tpot", tpot),
        *latency_metrics("e2e", [r["e2e_s"] for r in ok]),
    ]


def value(metrics: list[dict], name: str):
    return next((m["value"] for m in metrics if m["name"] == name), None)


# ------------------------------------------------------------------------------------------ plot and table


def plot(path: Path, moec_reqs: list[dict], base_reqs: list[dict] | None, moec_m: list[dict],
         base_m: list[dict] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    series = [("moec serve", moec_reqs, "tab:blue")]
    if base_reqs is not None:
        series.append(("HF generate, static batches", base_reqs, "tab:orange"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "TTFT", lambda rs: [r["ttft_s"] * 1000 for r in rs if r["ok"]], "ms"),
        (axes[0][1], "inter-token latency", lambda rs: [x * 1000 for r in rs if r["ok"] for x in r["itl_s"]], "ms"),
        (axes[1][0], "end-to-end latency", lambda rs: [r["e2e_s"] * 1000 for r in rs if r["ok"]], "ms"),
    ]
    for ax, name, get, unit in panels:
        for label, reqs, color in series:
            xs = np.sort(np.asarray(get(reqs), dtype=float))
            if xs.size:
                ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label, color=color)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"{name} ({unit}, log)")
        ax.set_ylabel("fraction of " + ("tokens" if "inter" in name else "requests"))
        ax.set_title(f"{name}: CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[1][1]
    labels = ["moec serve"] + (["HF static"] if base_m is not None else [])
    vals = [value(moec_m, "output_throughput") or 0.0] + ([value(base_m, "output_throughput") or 0.0]
                                                         if base_m is not None else [])
    bars = ax.bar(labels, vals, color=["tab:blue", "tab:orange"][: len(vals)])
    for bar, v in zip(bars, vals):
        ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel("useful output tokens/s")
    ax.set_title("throughput")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(moec_m: list[dict], base_m: list[dict] | None, hf_batch: int) -> str:
    head = ["", "moec serve"] + ([f"HF static bs={hf_batch}"] if base_m is not None else [])

    def fmt(ms, name, spec):
        v = value(ms, name)
        return "-" if v is None else format(v, spec)

    rows = [("output tokens/s", "output_throughput", ".1f"), ("requests/s", "request_throughput", ".2f"),
            ("completed / failed", None, None)]
    for label, prefix in (("TTFT ms", "ttft"), ("ITL ms", "itl"), ("TPOT ms", "tpot"), ("e2e ms", "e2e")):
        rows.append((f"{label} p50/p90/p99", prefix, "pct"))
    lines = []
    for label, name, spec in rows:
        cells = [label]
        for ms in [moec_m] + ([base_m] if base_m is not None else []):
            if name is None:
                cells.append(f"{value(ms, 'completed_requests')} / {value(ms, 'failed_requests')}")
            elif spec == "pct":
                cells.append(" / ".join(fmt(ms, f"{name}_p{p}", ".1f") for p in PERCENTILES))
            else:
                cells.append(fmt(ms, name, spec))
        lines.append(cells)
    widths = [max(len(r[k]) for r in [head] + lines) for k in range(len(head))]
    render = lambda r: "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([render(head)] + [render(r) for r in lines])


# --------------------------------------------------------------------------------------------------- main


def device_info(manifest: dict) -> tuple[dict, str]:
    import torch

    if manifest.get("device", "cpu").startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return {"kind": "cuda", "name": name, "count": torch.cuda.device_count()}, slug
    return {"kind": "cpu", "processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}, "cpu"


def git_commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI-sized: 16 requests at 32 req/s, prompts 8:32, outputs 8:24 (explicit flags still win)")
    p.add_argument("--rate", type=parse_rate, default=None, help="Poisson arrival rate, req/s, or 'inf' (default 16)")
    p.add_argument("--num-requests", type=int, default=None, help="default 200")
    p.add_argument("--prompt-len", type=parse_range, default=None, help="tokens, uniform A:B inclusive (default 8:64)")
    p.add_argument("--output-len", type=parse_range, default=None, help="tokens, uniform A:B inclusive (default 16:64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch", type=int, default=8, help="static batch size of the baseline")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-mixtral.yaml"),
                   help="compiled when --artifact is not given (its synthetic model is written first)")
    p.add_argument("--artifact", help="a compiled artifact to serve instead of compiling --recipe")
    p.add_argument("--hf-dir", help="HF weights for the baseline (default: the manifest's model.path)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (model, artifact, server log)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `serve`; repeatable")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds until /health must answer 200")
    p.add_argument("--request-timeout", type=float, default=120.0, help="httpx timeout per read, seconds")
    p.add_argument("--load-timeout", type=float, default=None,
                   help="seconds for all requests (and, separately, for the baseline); default 600, --quick 120")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides (OMP_NUM_THREADS of the server, torch.set_num_threads of the "
                        "baseline); default for a CPU artifact: cores − 1 (at least 1), leaving a core to the load "
                        "generator; 0 = torch's default")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    quick = dict(rate=32.0, num_requests=16, prompt_len=(8, 32), output_len=(8, 24), load_timeout=120.0)
    full = dict(rate=16.0, num_requests=200, prompt_len=(8, 64), output_len=(16, 64), load_timeout=600.0)
    for key, default in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.num_requests < 1 or args.hf_batch < 1:
        p.error("--num-requests and --hf-batch must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    run_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="moec-serve-bench-"))
    server: Server | None = None
    try:
        artifact, hf_dir, manifest, compile_s = prepare_model(args, work)
        if args.threads is None:
            args.threads = max(1, (os.cpu_count() or 2) - 1) if manifest.get("device", "cpu") == "cpu" else 0
        max_seq = (manifest.get("step") or {}).get("max_seq_len")
        if max_seq and args.prompt_len[1] + args.output_len[1] + 4 > max_seq:
            raise SystemExit(f"--prompt-len + --output-len may reach {args.prompt_len[1] + args.output_len[1]} "
                             f"tokens (+ a few), over the artifact's max_seq_len {max_seq}")
        tok_dir = artifact / manifest.get("tokenizer_dir", "tokenizer")
        tok = PromptTokenizer(tok_dir)
        reqs = make_workload(args, tok)
        prompt_lens = [len(r.prompt_ids) for r in reqs]
        exact = sum(len(r.prompt_ids) == r.target_prompt_len for r in reqs)
        print(f"workload: {len(reqs)} requests, prompt tokens {min(prompt_lens)}..{max(prompt_lens)} "
              f"({exact} exactly at the drawn length), output tokens "
              f"{min(r.output_len for r in reqs)}..{max(r.output_len for r in reqs)}, rate {args.rate} req/s",
              file=sys.stderr)

        # moec ---------------------------------------------------------------------------------------
        other_cpu: dict[str, float | None] = {}
        watch = CpuWatch()
        server = Server(artifact, work / "server.log", args.server_arg, args.threads)
        server.start(args.startup_timeout)
        model = model_name(server.url, manifest.get("name", artifact.name))
        outcomes, _, makespan = asyncio.run(run_load(server.url, model, reqs, args))
        server_metrics = scrape_metrics(server.url)
        server_exit = server.stop()
        other_cpu["moec"] = watch.others()
        print(f"server stopped: {server_exit}", file=sys.stderr)

        moec_reqs = []
        mismatched_tokens = mismatched_prompts = 0
        for r, o in zip(reqs, outcomes):
            if o.ok and o.completion_tokens != r.output_len:
                mismatched_tokens += 1
            if o.ok and o.prompt_tokens is not None and o.prompt_tokens != len(r.prompt_ids):
                mismatched_prompts += 1
            moec_reqs.append({
                "index": r.index, "ok": o.ok, "error": o.error, "arrival_s": r.arrival_s, "send_s": o.send_s,
                "ttft_s": o.ttft_s, "e2e_s": o.e2e_s, "itl_s": o.itl_s, "completion_tokens": o.completion_tokens,
                "prompt_tokens": o.prompt_tokens, "chunks": o.chunks, "empty_chunks": o.empty_chunks,
                "finish_reason": o.finish_reason,
            })
        moec_m = summarize(moec_reqs, makespan)
        moec_m += [
            metric("completion_token_mismatches", mismatched_tokens, "requests", "lower",
                   "usage.completion_tokens != requested max_tokens (ignore_eos: must be 0)"),
            metric("prompt_token_mismatches", mismatched_prompts, "requests", "lower",
                   "usage.prompt_tokens != the benchmark's own encoding of the prompt"),
            metric("server_startup", server.startup_s, "s", "lower", "process start → /health 200"),
            metric("tokens_per_chunk",
                   sum(o.completion_tokens for o in outcomes if o.ok) / max(1, sum(o.chunks for o in outcomes if o.ok)),
                   "tokens", "lower", "completion tokens per SSE chunk with text; ITL is counted per chunk, so "
                   "above 1 the ITL percentiles hide merged tokens (TPOT does not)"),
        ]
        errors = [o.error for o in outcomes if not o.ok]
        if errors:
            print(f"{len(errors)} request(s) failed; first: {errors[0]}", file=sys.stderr)

        # baseline ------------------------------------------------------------------------------------
        base = base_m = None
        if not args.no_baseline and hf_dir is not None:
            watch = CpuWatch()
            base = run_baseline(hf_dir, manifest, reqs, args)
            other_cpu["baseline"] = watch.others()
            base_m = summarize(base["requests"], base["makespan_s"])
            slots = sum(b["size"] * b["max_new_tokens"] for b in base["batches"])
            useful = sum(b["useful_tokens"] for b in base["batches"])
            prefill = sum(b["size"] * b["padded_width"] for b in base["batches"])
            real_prompt = sum(b["prompt_tokens"] for b in base["batches"])
            base_m += [
                metric("batches", len(base["batches"]), "batches", "lower"),
                metric("decode_slots", slots, "tokens", "lower",
                       "batch size × the batch's longest output, summed: tokens actually generated"),
                metric("wasted_decode_fraction", (slots - useful) / slots, "fraction", "lower",
                       "generated tokens past a request's own output length (it waits for the batch's longest)"),
                metric("padded_prefill_fraction", (prefill - real_prompt) / prefill, "fraction", "lower",
                       "left-padding positions among all prefill positions"),
                metric("busy_throughput", useful / base["busy_s"], "tokens/s", "higher",
                       "useful tokens / time spent in generate (idle waits for arrivals left out)"),
                metric("slot_throughput", slots / base["busy_s"], "tokens/s", "higher",
                       "all generated tokens incl. wasted ones / time in generate"),
            ]
        elif not args.no_baseline:
            print("no HF weights found for the baseline (give --hf-dir); skipping it", file=sys.stderr)

        # results -------------------------------------------------------------------------------------
        import torch
        import transformers

        device, slug = device_info(manifest)
        today = dt.date.today().isoformat()
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"serve-{slug}-{today}"
        result = {
            "benchmark": "serve",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "device": device,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "httpx": __import__("httpx").__version__},
            "model": {"artifact": manifest.get("name"), "architecture": manifest.get("architecture"),
                      "dtype": manifest.get("dtype"), "recipe": (manifest.get("recipe") or {}).get("name"),
                      "max_batch": (manifest.get("step") or {}).get("max_batch"), "max_seq_len": max_seq,
                      "compile_time_s": compile_s},
            "config": {
                "quick": args.quick, "rate_req_per_s": "inf" if math.isinf(args.rate) else args.rate,
                "arrivals": "all at t=0" if math.isinf(args.rate) else "Poisson",
                "num_requests": args.num_requests, "seed": args.seed,
                "prompt_len": {"distribution": "uniform", "min": args.prompt_len[0], "max": args.prompt_len[1],
                               "actual_min": min(prompt_lens), "actual_max": max(prompt_lens),
                               "actual_mean": float(np.mean(prompt_lens)), "exact": exact},
                "output_len": {"distribution": "uniform", "min": args.output_len[0], "max": args.output_len[1],
                               "mean": float(np.mean([r.output_len for r in reqs]))},
                "sampling": "greedy (temperature 0), ignore_eos", "hf_batch": args.hf_batch,
                "threads": args.threads or "torch default",
                "server_cmd": shlex.join(server.cmd), "model_name": model,
            },
            "other_cpu_cores": {**other_cpu, "note": "CPU cores busy with processes other than this benchmark and "
                                "its server, averaged over each phase (/proc/stat minus own CPU time); other work "
                                "on the machine skews the numbers"},
            "moec": {
                "description": "moe-runtime serve, streaming /v1/completions over HTTP on 127.0.0.1",
                "metrics": moec_m, "server_exit": server_exit, "server_metrics": server_metrics,
                "requests": moec_reqs,
            },
            "baseline": None if base is None else {
                "description": ("transformers generate, static batches in arrival order, left padding, greedy, "
                                "min_new_tokens = max_new_tokens = the batch's longest output; arrivals replayed "
                                "on a virtual clock over measured batch times; per-step times from a streamer"),
                "attn_implementation": base["attn_implementation"], "metrics": base_m, "batches": base["batches"],
                "requests": base["requests"],
            },
        }
        if base_m is not None:
            mt, bt = value(moec_m, "output_throughput"), value(base_m, "output_throughput")
            result["comparison"] = {
                "output_throughput_ratio": mt / bt if mt and bt else None,
                "ttft_p50_ratio": ((value(base_m, "ttft_p50") or 0) / value(moec_m, "ttft_p50"))
                if value(moec_m, "ttft_p50") else None,
                "note": "ratios > 1 favour moec (baseline / moec for latencies, moec / baseline for throughput)",
            }
        json_path = stem.with_suffix(".json")
        json_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
        rate = "inf" if math.isinf(args.rate) else f"{args.rate:g}"
        title = (f"moec serve vs HF static batches — {manifest.get('name')} on {device.get('name', 'cpu')}, "
                 f"{args.num_requests} req @ {rate} req/s, prompt {args.prompt_len[0]}:{args.prompt_len[1]}, "
                 f"output {args.output_len[0]}:{args.output_len[1]}")
        png_path = stem.with_suffix(".png")
        plot(png_path, moec_reqs, base["requests"] if base else None, moec_m, base_m, title)

        print(f"\nwrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path} and .png "
              f"({time.perf_counter() - run_start:.0f}s in all)")
        print(f"server: startup {server.startup_s:.1f}s, SIGTERM → exit status {server_exit.get('returncode')}"
              f"{'' if server_exit.get('clean') else '  ← NOT a clean exit'}")
        if base_m is not None:
            print(f"baseline static batches: {value(base_m, 'batches')} batches, "
                  f"{value(base_m, 'wasted_decode_fraction') * 100:.0f}% of generated tokens wasted "
                  f"(past a request's own length), {value(base_m, 'padded_prefill_fraction') * 100:.0f}% of "
                  f"prefill positions padding")
        if mismatched_tokens or mismatched_prompts or errors:
            print(f"problems: {len(errors)} failed, {mismatched_tokens} completion-token mismatches, "
                  f"{mismatched_prompts} prompt-token mismatches")
        busy = {k: v for k, v in other_cpu.items() if v is not None and v > 0.2}
        if busy:
            print("warning: other processes kept " + ", ".join(f"{v:.2f} cores busy during the {k} phase"
                                                             for k, v in busy.items())
                  + f" (of {os.cpu_count()}); the numbers may be skewed (torch's OpenMP threads slow down many-fold "
                  "when another process takes one of their cores; see --threads)")
        print()
        print(table(moec_m, base_m, args.hf_batch))
        return 0 if not errors and server_exit.get("clean") else 1
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
