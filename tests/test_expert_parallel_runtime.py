"""An artifact compiled with `parallel: {ep: 2}` run as 2 gloo ranks: the same logits and greedy
tokens as the ep: 1 artifact, chunked or not; a wrong number of ranks is a one-line error."""

from __future__ import annotations

import asyncio

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

from conftest import assert_one_line_error, run_cli, tiny_recipe_dict
from test_server import free_port, greedy_texts

PROMPTS = ["The mixture of experts", "Once upon a time, in a kitchen far away, a baker", "Rain",
           "Printing presses changed how people shared ideas", "Seven"]


@pytest.fixture(scope="module")
def ep2_artifact(hf_model_dir, tmp_path_factory):
    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe

    out = tmp_path_factory.mktemp("ep") / "tiny-ep2"
    recipe = parse_recipe(tiny_recipe_dict(hf_model_dir, name="tiny-ep2", parallel={"ep": 2}))
    return compile_recipe(recipe, out, console=Console(stderr=True, quiet=True))


def _rank(rank: int, world: int, port: int, artifact: str, out_dir: str) -> None:
    from moec.runtime import Engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {}
    for chunks in (1, 3):
        engine = Engine.load(artifact, ep_chunks=chunks)
        done = engine.generate(PROMPTS, max_tokens=10, record_logits=True)
        results[chunks] = [(c.token_ids, torch.stack(c.logits)) for c in done]
        # one prompt: rank 1 has no sequence and steps idle through every MoE layer's exchange
        one = engine.generate(PROMPTS[:1], max_tokens=6, record_logits=True)[0]
        results[f"{chunks}-single"] = (one.token_ids, torch.stack(one.logits))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_give_the_single_device_answer(ep2_artifact, tiny_artifact, tmp_path):
    from moec.runtime import Engine

    single = Engine.load(tiny_artifact)
    want = [(c.token_ids, torch.stack(c.logits)) for c in single.generate(PROMPTS, max_tokens=10, record_logits=True)]
    one = single.generate(PROMPTS[:1], max_tokens=6, record_logits=True)[0]
    want_one = (one.token_ids, torch.stack(one.logits))

    mp.spawn(_rank, args=(2, free_port(), str(ep2_artifact), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for chunks in (1, 3):
            for (tokens, logits), (want_tokens, want_logits) in zip(got[chunks], want):
                assert tokens == want_tokens, (rank, chunks)
                assert (logits - want_logits).abs().max().item() <= 1e-4, (rank, chunks)
            tokens, logits = got[f"{chunks}-single"]
            assert tokens == want_one[0] and (logits - want_one[1]).abs().max().item() <= 1e-4


def test_manifest_records_the_placement(ep2_artifact):
    from moec.artifact import open_artifact

    par = open_artifact(ep2_artifact).manifest.parallel
    assert par["ep"] == 2 and par["placement"] == [[0, 1], [2, 3]]
    assert [e["layer"] for e in par["experts"]] == [0, 1]


def test_wrong_number_of_ranks_is_one_line(ep2_artifact):
    proc = run_cli("moec.runtime", "generate", str(ep2_artifact), "--prompt", "Rain", "--max-tokens", "4")
    assert_one_line_error(proc, "2 ranks", "torchrun --nproc-per-node 2")


def test_uneven_split_is_refused_at_compile(hf_model_dir, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(hf_model_dir, name="tiny-ep3", parallel={"ep": 3})))
    proc = run_cli("moec.compiler", str(path), "--explain")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "choose a divisor of the expert count" in proc.stderr.strip().splitlines()[-1]


def _rank_that_dies(rank: int, world: int, port: int, artifact: str, out_dir: str) -> None:
    import time

    from moec.errors import MoecError
    from moec.runtime import Engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    engine = Engine.load(artifact)
    if rank == 1:
        os._exit(3)  # a rank lost mid-service
    start = time.perf_counter()
    try:
        engine.generate(PROMPTS, max_tokens=8)
        outcome = "no error"
    except MoecError as e:
        outcome = str(e)
    torch.save((outcome, time.perf_counter() - start), os.path.join(out_dir, "rank0.pt"))


def test_a_dead_rank_stops_the_others_with_a_clear_error(ep2_artifact, tmp_path):
    ctx = mp.spawn(_rank_that_dies, args=(2, free_port(), str(ep2_artifact), str(tmp_path)), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(timeout=120)
    assert all(p.exitcode is not None for p in ctx.processes), "a rank hung"
    outcome, seconds = torch.load(tmp_path / "rank0.pt")
    assert "expert-parallel group failed" in outcome and "restart all 2 ranks" in outcome and "\n" not in outcome
    assert seconds < 60


def test_nproc_runs_the_ranks_and_prints_once(ep2_artifact, tiny_artifact):
    want = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--prompt", "Seven",
                   "--max-tokens", "6")
    got = run_cli("moec.runtime", "generate", str(ep2_artifact), "--nproc", "2", "--prompt", "Rain", "--prompt",
                  "Seven", "--max-tokens", "6")
    assert want.returncode == 0 and got.returncode == 0, got.stderr[-2000:]
    assert got.stdout == want.stdout


def _start_group(artifact, port: int, timeout_s: int = 30):
    """Two `moe-runtime serve` ranks, as torchrun would start them; returns (rank 0, rank 1)."""
    import subprocess
    import sys
    import time

    import httpx

    master = free_port()
    procs = []
    for rank in (1, 0):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MOEC_COLLECTIVE_TIMEOUT_S": str(timeout_s)}
        procs.append(subprocess.Popen([sys.executable, "-m", "moec.runtime", "serve", str(artifact), "--port",
                                       str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    follower, leader = procs
    deadline = time.time() + 120
    while time.time() < deadline:
        assert leader.poll() is None and follower.poll() is None, (leader.poll(), follower.poll())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return leader, follower
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the rank-0 server did not become healthy")


def test_serve_across_two_ranks_then_stop_cleanly(ep2_artifact, tiny_artifact):
    import signal

    import httpx

    from moec.runtime import Engine

    port = free_port()
    leader, follower = _start_group(ep2_artifact, port)
    try:
        texts = greedy_texts(f"http://127.0.0.1:{port}", "tiny-ep2", PROMPTS, max_tokens=10)
        logprobs = asyncio.run(_token_logprobs(f"http://127.0.0.1:{port}", PROMPTS[:2]))  # one on each rank
        import time

        time.sleep(2.5)  # the group sums its expert load every 2 s for /metrics
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
        tokens = [float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("moec:expert_tokens{")]
        ranks = [float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("moec:expert_rank_tokens{")]
        assert len(tokens) == 2 * 4 and sum(tokens) > 0 and sum(ranks) == sum(tokens)
        assert any(x.startswith("moec:expert_rank_imbalance{") for x in lines)
        leader.send_signal(signal.SIGTERM)
        codes = (leader.wait(timeout=60), follower.wait(timeout=60))
        assert codes == (0, 0), (f"exit codes {codes}; rank 0 printed:\n{leader.stdout.read()[-3000:]}\n"
                                 f"rank 1 printed:\n{follower.stdout.read()[-3000:]}")
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
    engine = Engine.load(tiny_artifact)
    want = engine.generate(PROMPTS, max_tokens=10)
    assert texts == [c.text for c in want]
    want = engine.generate(PROMPTS[:2], max_tokens=6, logprobs=1)
    assert logprobs == [pytest.approx([t.logprob for t in c.logprobs], abs=1e-4) for c in want]


async def _token_logprobs(base: str, prompts: list[str]) -> list[list[float]]:
    """Each prompt's greedy tokens' log-probabilities, the requests sent at once."""
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:
        replies = await asyncio.gather(*(client.post(f"{base}/v1/completions", json={
            "model": "tiny-ep2", "prompt": p, "max_tokens": 6, "temperature": 0, "logprobs": 1}) for p in prompts))
    return [r.raise_for_status().json()["choices"][0]["logprobs"]["token_logprobs"] for r in replies]


def test_exit_rank_flushes_then_ends_with_the_code():
    """A rank's process ends through `launch.exit_rank` (os._exit, no interpreter teardown to abort
    in): what it printed to piped (block-buffered) stdout and stderr still arrives, and the exit
    code is the one given."""
    import subprocess
    import sys

    code = (
        "import os, torch.distributed as dist\n"
        "from moec.runtime import launch\n"
        f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{free_port()}')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "assert launch.in_group()\n"
        "print('served', end='')\n"
        "import sys; sys.stderr.write('bye')\n"
        "launch.exit_rank(3)\n"
        "print('unreachable')\n"
    )
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=buffered)
    assert (proc.returncode, proc.stdout) == (3, "served"), proc.stderr[-2000:]
    assert proc.stderr.endswith("bye")


def test_serve_exits_nonzero_when_a_rank_dies(ep2_artifact):
    """Rank 1 killed while idle: rank 0's next heartbeat fails, it stops serving and exits non-zero."""
    import time

    port = free_port()
    leader, follower = _start_group(ep2_artifact, port, timeout_s=15)
    try:
        follower.kill()
        start = time.perf_counter()
        code = leader.wait(timeout=90)
        assert code not in (0, None) and time.perf_counter() - start < 60
        assert "expert-parallel group failed" in leader.stdout.read()
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()


def test_bench_across_two_ranks_reports_expert_load(ep2_artifact, tmp_path):
    import json

    out = tmp_path / "bench.json"
    proc = run_cli("moec.runtime", "bench", str(ep2_artifact), "--nproc", "2", "--batch-sizes", "1,4", "--context",
                   "16", "--decode-tokens", "8", "--prefill-tokens", "16", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports
    data = json.loads(out.read_text())
    load = data["expert_parallel"]["expert_load"]
    assert data["expert_parallel"]["ranks"] == 2 and len(load["layers"]) == 2
    for layer in load["layers"]:
        assert sum(layer["tokens_per_rank"]) == sum(layer["tokens_per_expert"]) > 0
        assert layer["tokens_per_rank"] == [sum(layer["tokens_per_expert"][:2]), sum(layer["tokens_per_expert"][2:])]
        assert layer["rank_imbalance"] >= 1.0 and layer["expert_imbalance"] >= 1.0
    # the group's decode rate counts both ranks' sequences
    assert all(row["decode_tokens_per_s"] > 0 for row in data["decode"])
