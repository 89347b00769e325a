"""Offloaded artifacts on CPU: experts paged from "host" tensors into a budgeted "device" double
buffer (the executor's CPU mode) give what the same model compiled without offload gives."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from conftest import run_cli, tiny_recipe_dict, tiny_synthetic
from moec.artifact import open_artifact
from moec.artifact.summary import offload_lines
from moec.errors import ArtifactError
from moec.runtime import Engine
from moec.runtime.expert_pager import DeviceBudget, ExpertPager

PROMPTS = ["The mixture of experts", "Once upon a time, in a kitchen far away, a baker", "Rain"]
LAYERS = 4  # one resident, three streamed through two slots: every step copies
LAYER_EXPERT_BYTES = 4 * 3 * 64 * 128 * 4  # tiny Mixtral: 4 experts of 3 x 64 x 128, fp32


@pytest.fixture(scope="module")
def four_layer_artifacts(tmp_path_factory):
    """(plain artifact, offloaded artifact, GPU budget) of a 4-layer tiny Mixtral."""
    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe
    from moec.compiler.synthetic import write_synthetic_model

    syn = tiny_synthetic()
    root = tmp_path_factory.mktemp("offload")
    model_dir = write_synthetic_model(syn["architecture"], {**syn["config"], "num_hidden_layers": LAYERS},
                                      syn["seed"], root / "hf")
    quiet = Console(stderr=True, quiet=True)
    plain = compile_recipe(parse_recipe(tiny_recipe_dict(model_dir, name="plain")), root / "plain", console=quiet)
    budget = 8 << 20
    offload = {"gpu_memory": budget, "host_memory": "1GiB", "workload": {"prompt_len": 64, "gen_len": 32},
               "policy": {"resident_expert_layers": 1, "batch": 4, "cache_experts": 6}}
    offloaded = compile_recipe(parse_recipe(tiny_recipe_dict(model_dir, name="offloaded", offload=offload)),
                               root / "offloaded", console=quiet)
    return plain, offloaded, budget


def test_offloaded_artifact_generates_what_the_plain_one_does(four_layer_artifacts):
    plain, offloaded, budget = four_layer_artifacts
    manifest = open_artifact(offloaded).manifest
    assert [e["layer"] for e in manifest.offload["experts"]] == list(range(LAYERS))
    assert manifest.offload["policy"]["resident_expert_layers"] == 1

    want = Engine.load(plain).generate(PROMPTS, max_tokens=12, record_logits=True)
    engine = Engine.load(offloaded)
    assert engine.decode_graphs is None and engine.expert_pager is not None
    expert_names = {e[k] for e in manifest.offload["experts"] for k in ("gate_up_proj", "down_proj")}
    assert not expert_names & set(engine.step_fn.weights)  # the compiled graph reads no expert weight
    got = engine.generate(PROMPTS, max_tokens=12, record_logits=True)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) <= 1e-4

    stats = engine.expert_pager.stats()
    assert stats["resident_layers"] == [0] and stats["streamed_layers"] == [1, 2, 3]
    steps = engine.stats.steps
    # three streamed layers through two slots: each step copies every streamed layer once (the
    # next step's first is prefetched during the last), and only the very first fetch waited
    assert stats["copies"] >= 3 * steps and stats["unprefetched_fetches"] == 1
    assert stats["bytes_copied"] == stats["copies"] * LAYER_EXPERT_BYTES
    # the device side never held more than the budget: weights, KV cache, 1 resident layer, 2 slots
    assert stats["device_bytes_peak"] <= budget
    assert engine.expert_pager.budget.used >= 3 * LAYER_EXPERT_BYTES


def test_batch_one_decodes_from_the_expert_cache(four_layer_artifacts):
    """One sequence decoding picks 2 of 4 experts per layer (T*K < E): the pager copies only those,
    into its 6-slot LRU cache over the 3 streamed layers, and the tokens do not change."""
    plain, offloaded, budget = four_layer_artifacts
    want = Engine.load(plain).generate(PROMPTS[1], max_tokens=16, record_logits=True)[0]
    engine = Engine.load(offloaded)
    got = engine.generate(PROMPTS[1], max_tokens=16, record_logits=True)[0]
    assert got.token_ids == want.token_ids
    assert max((x - y).abs().max().item() for x, y in zip(want.logits, got.logits)) <= 1e-4
    stats = engine.expert_pager.stats()
    assert stats["cache_experts"] == 6
    # 15 decode steps x 3 streamed layers x 2 (distinct) experts each: every choice a hit or a miss
    assert stats["cache_hits"] + stats["cache_misses"] == 15 * 3 * 2
    assert stats["cache_hits"] > 0 and stats["cache_misses"] >= 2
    # the prompt step (more tokens) streamed whole layers; decoding copied single experts only
    expert = LAYER_EXPERT_BYTES // 4
    assert stats["bytes_copied"] == stats["copies"] * LAYER_EXPERT_BYTES + stats["cache_misses"] * expert
    assert stats["device_bytes_peak"] <= budget


def test_batch_one_caches_in_the_double_buffer_when_the_plan_left_no_cache(four_layer_artifacts):
    """A plan whose batch took the whole GPU budget (cache_experts 0): batch-1 decoding still copies
    only the chosen experts, into the double buffer's 2E slots; a wider batch after it streams whole
    layers through the same memory again, then batch 1 caches again; every run gives the plain
    artifact's tokens and the device side holds no more than before."""
    plain, offloaded, budget = four_layer_artifacts
    reference = Engine.load(plain)
    first = Engine.load(offloaded)
    with_cache = first.expert_pager.budget.used  # the plan's own 6-expert cache
    artifact = open_artifact(offloaded)
    artifact.manifest.offload["policy"]["cache_experts"] = 0
    engine = Engine(artifact)
    stats = engine.expert_pager.stats()
    assert stats["cache_experts"] == 2 * 4 and stats["cache_in_double_buffer"]
    # weights, KV cache, one resident layer and the double buffer: the cache took no byte of its own
    assert engine.expert_pager.budget.used == with_cache - 6 * LAYER_EXPERT_BYTES // 4
    expert = LAYER_EXPERT_BYTES // 4
    for prompts, max_tokens in ((PROMPTS[1], 16), (PROMPTS, 12), (PROMPTS[2], 10)):
        before = engine.expert_pager.stats()
        want = reference.generate(prompts, max_tokens=max_tokens, record_logits=True)
        got = engine.generate(prompts, max_tokens=max_tokens, record_logits=True)
        for a, b in zip(want, got):
            assert a.token_ids == b.token_ids
            assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) <= 1e-4
        after = engine.expert_pager.stats()
        copies, misses, hits = (after[k] - before[k] for k in ("copies", "cache_misses", "cache_hits"))
        assert after["bytes_copied"] - before["bytes_copied"] == copies * LAYER_EXPERT_BYTES + misses * expert
        if isinstance(prompts, str):  # one sequence: its decode steps pick 2 of 4 experts per streamed layer
            assert hits + misses == (max_tokens - 1) * 3 * 2 and misses >= 2
        else:  # three sequences (T*K = 6 >= E): whole layers, never the cache
            assert hits + misses == 0 and copies >= 3 * (max_tokens - 1)
    assert engine.expert_pager.stats()["device_bytes_peak"] <= budget
    # two offloaded engines in one process, stepping in turn: each step runs its own engine's pager
    mine = engine.expert_pager.stats()["cache_misses"] + engine.expert_pager.stats()["copies"]
    assert first.generate(PROMPTS[2], max_tokens=6)[0].token_ids == reference.generate(PROMPTS[2], max_tokens=6)[0].token_ids
    assert first.expert_pager.stats()["copies"] + first.expert_pager.stats()["cache_misses"] > 0
    assert engine.expert_pager.stats()["cache_misses"] + engine.expert_pager.stats()["copies"] == mine


def test_offloaded_engines_stepping_at_once_in_two_threads_each_run_their_own(four_layer_artifacts):
    """Two offloaded engines in one process, generating at the same time in two threads (one of
    them in two micro-batches, whose worker threads must reach their engine's executors too):
    each gets the plain artifact's tokens, and each pager counts exactly its own engine's work,
    as when it runs alone (a process-wide executor handed the steps to whichever engine set it last)."""
    import threading

    plain, offloaded, _ = four_layer_artifacts
    want = {p: r.token_ids for p, r in zip(PROMPTS, Engine.load(plain).generate(PROMPTS, max_tokens=10))}
    solo = Engine.load(offloaded)
    for _ in range(3):
        solo.generate(PROMPTS[1], max_tokens=10)
    alone = solo.expert_pager.stats()
    artifact = open_artifact(offloaded)
    artifact.manifest.offload["policy"]["micro_batches"] = 2
    engines = [Engine.load(offloaded), Engine(artifact)]
    assert engines[1].micro_batches is not None
    prompts = [[PROMPTS[1]], [PROMPTS[0], PROMPTS[2]]]
    got, errors, start = [None, None], [], threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[i] = [r.token_ids for r in engines[i].generate(prompts[i], max_tokens=10)]
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == [[want[p] for p in group] for group in prompts]
    mine = engines[0].expert_pager.stats()
    for key in ("cache_hits", "cache_misses", "copies", "bytes_copied"):
        assert mine[key] == alone[key], key  # what the same three runs alone count, nothing of the other's
    assert engines[1].expert_pager.stats()["cache_hits"] + engines[1].expert_pager.stats()["cache_misses"] == 0
    assert engines[1].micro_batches.steps > 0


def test_budget_is_enforced_at_load(four_layer_artifacts):
    _, offloaded, _ = four_layer_artifacts
    with pytest.raises(ArtifactError, match="offload.gpu_memory"):
        ExpertPager(open_artifact(offloaded), torch.device("cpu"), DeviceBudget(LAYER_EXPERT_BYTES))
    budget = DeviceBudget(100)
    budget.take(60, "a")
    with pytest.raises(ArtifactError, match="would pass the GPU budget"):
        budget.take(41, "b")
    assert budget.used == 60 and budget.peak == 60


def test_generate_cli_runs_an_offloaded_artifact(four_layer_artifacts):
    _, offloaded, _ = four_layer_artifacts
    proc = run_cli("moec.runtime", "generate", str(offloaded), "--prompt", "Rain", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_bench_reports_the_link_and_the_prediction(four_layer_artifacts, tmp_path):
    import json

    _, offloaded, _ = four_layer_artifacts
    out = tmp_path / "bench.json"
    proc = run_cli("moec.runtime", "bench", str(offloaded), "--batch-sizes", "1,4", "--context", "16",
                   "--decode-tokens", "8", "--prefill-tokens", "16", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    summary = data["offload"]
    assert summary["policy"]["batch"] == 4 and summary["h2d_bytes_per_s_measured"] > 0
    assert summary["predicted_tokens_per_s"] > 0 and summary["achieved_decode_step_s"] > 0
    # profiled at the plan's batch: the share of the step spent computing (operators on a CPU; no copy stream here)
    assert 0 < summary["gpu_busy_fraction"] <= 1 and summary["copy_busy_fraction"] is None
    one, four = data["decode"]
    # batch 1 decodes from the expert cache (single experts), batch 4 streams whole layers
    assert one["offload"]["cache_hit_rate"] is not None and four["offload"]["cache_hit_rate"] is None
    assert four["offload"]["expert_bytes_per_step"] >= 3 * LAYER_EXPERT_BYTES * 0.9
    assert 0 < four["offload"]["link_busy_fraction"] and four["offload"]["achieved_h2d_bytes_per_s"] > 0
    assert four["offload"]["cpu_attention_s_per_step"] is None  # attention on the "GPU" here
    assert set(summary["predicted_busy_s_per_step"]) == {"h2d", "d2h", "gpu", "cpu"}


def test_bench_reports_the_cpu_attention_time(cgopipe_artifact):
    """Placement cpu: each decode row adds the CPU's attention seconds per step (both micro-batches)."""
    from moec.runtime.bench import BenchSettings, run_bench

    settings = BenchSettings(batch_sizes=(4,), context=16, decode_tokens=8, prefill_tokens=16, repeats=1)
    seen = []  # what a caller stopped by a clock would have kept: the rows so far, after each
    result = run_bench(cgopipe_artifact, settings, console=Console(stderr=True, quiet=True),
                       progress=lambda partial: seen.append(json.loads(json.dumps(partial))))
    (row,) = result["decode"]
    assert row["offload"]["cpu_attention_s_per_step"] > 0
    assert result["offload"]["predicted_busy_s_per_step"]["cpu"] > 0
    assert [len(p["decode"]) for p in seen] == [0, 1] and seen[-1]["decode"][0]["batch"] == 4
    assert seen[0]["prefill"]["prompt_tokens"] == 16 and seen[-1]["h2d_bytes_per_s_measured"] > 0


def test_offload_benchmark_keeps_the_rows_of_a_stopped_moec_role():
    """offload.py: a moec role killed by its clock after batch 1 left `partial`; the result keeps
    that row with the link's measured rate (the bound needs it) and says what did not finish."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from offload import moec_rows

    row = {"batch": 1, "decode_tokens_per_s": 5.0, "offload": {"expert_bytes_per_step": 1e9}}
    got, skipped = moec_rows({"partial": {"load_s": 3.0, "prefill": {}, "decode": [row], "h2d_bytes_per_s_measured": 5e10}})
    assert got["decode"] == [row] and got["offload"]["h2d_bytes_per_s_measured"] == 5e10 and got["load_s"] == 3.0
    assert skipped == ["moec: decode rows finished only for batch [1]"]
    whole = {"bench": {"decode": [row], "offload": {"h2d_bytes_per_s_measured": 1.0}, "load_s": 1.0, "notes": []}}
    assert moec_rows(whole) == ({"decode": [row], "offload": {"h2d_bytes_per_s_measured": 1.0}, "load_s": 1.0,
                                 "notes": []}, [])
    assert moec_rows({}) == ({"decode": None, "offload": None, "load_s": None, "notes": None}, [])


@pytest.mark.parametrize("variant", ["streamed", "cpu attention in micro-batches"])
def test_serve_runs_an_offloaded_artifact_unchanged(four_layer_artifacts, request, variant):
    """The OpenAI server on an offloaded artifact: concurrent greedy completions equal `generate`."""
    from test_server import Server, greedy_texts

    plain, offloaded, _ = four_layer_artifacts
    name = "offloaded"
    if variant != "streamed":
        offloaded, name = request.getfixturevalue("cgopipe_artifact"), "cgopipe"
    srv = Server(offloaded)
    try:
        texts = greedy_texts(srv.base, name, PROMPTS, max_tokens=10)
    finally:
        assert srv.stop() == 0
    want = Engine.load(plain).generate(PROMPTS, max_tokens=10)
    assert texts == [c.text for c in want]


# --------------------------------------------------------------- CGOPipe: CPU attention, micro-batches
@pytest.fixture(scope="module")
def cgopipe_artifact(four_layer_artifacts):
    """The same model offloaded with attention and its KV cache on the CPU, batch 4 in 2 micro-batches;
    the recipe's steps of 16 tokens, which the plan may raise."""
    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe

    plain, _, budget = four_layer_artifacts
    offload = {"gpu_memory": budget, "host_memory": "1GiB", "workload": {"prompt_len": 64, "gen_len": 32},
               "policy": {"resident_expert_layers": 1, "batch": 4, "micro_batches": 2, "placement": "cpu"}}
    recipe = parse_recipe(tiny_recipe_dict(plain.parent / "hf", name="cgopipe", offload=offload, max_tokens_per_step=16))
    return compile_recipe(recipe, plain.parent / "cgopipe", console=Console(stderr=True, quiet=True))


def test_cpu_attention_in_micro_batches_generates_what_the_plain_artifact_does(four_layer_artifacts, cgopipe_artifact):
    """Four prompts of different lengths as two micro-batches in flight at once, attention on the
    CPU beside its cache: the same tokens and logits as the plain artifact; each streamed layer
    still crosses the link once per step (shared by both micro-batches), and the device holds no
    KV cache (a one-block placeholder). The plan raised the recipe's 16-token steps (each prefill
    step streams the experts again; its budget holds the larger step's activations), so the four
    prompts' 86 tokens prefill in one step, where steps of 16 would take 6."""
    plain, _, budget = four_layer_artifacts
    manifest = open_artifact(cgopipe_artifact).manifest
    assert manifest.offload["policy"]["prefill_step_tokens"] == manifest.step.max_tokens_per_step >= 128
    assert manifest.offload["workload"]["prefill_step_tokens"] == 16
    step = manifest.step.max_tokens_per_step
    assert f"prefill steps of up to {step} tokens" in offload_lines(manifest.offload)[0]  # what inspect shows
    prompts = [*PROMPTS, "a b c d e f g h i j k l m n o p q r s t u v w x y z, and then some more letters"]
    want = Engine.load(plain).generate(prompts, max_tokens=12, record_logits=True)
    engine = Engine.load(cgopipe_artifact)
    assert engine.micro_batches is not None and engine.host_attention is not None
    assert engine.kv_cache.shape[2] == 1 and engine.host_attention.cache.shape[2] == engine.num_blocks + 1
    got = engine.generate(prompts, max_tokens=12, record_logits=True)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) <= 1e-4
    assert sum(r.prompt_tokens for r in got) == 86

    steps = engine.stats.steps
    assert steps == 12  # one prefill step (its first token), 11 decode steps
    assert engine.micro_batches.steps == steps  # every step had 4 sequences: two micro-batches each
    assert engine.host_attention.calls == 2 * steps * LAYERS  # every layer of every micro-batch, on the CPU
    stats = engine.expert_pager.stats()
    assert stats["copies"] == 3 * steps + 1  # once per step for both micro-batches, plus the next step's first
    assert stats["device_bytes_peak"] <= budget
    plain_kv = Engine.load(plain).kv_cache
    assert engine.expert_pager.budget.used < plain_kv.numel() * plain_kv.element_size()


def test_micro_batches_balance_work_longest_first():
    """MoE-Lightning's Algorithm 2: longest first, each to the lightest group."""
    from moec.runtime.micro_batches import balanced_micro_batches

    assert balanced_micro_batches([7, 5, 4, 3, 3, 2], 2) == [[0, 3, 5], [1, 2, 4]]  # 12 and 12
    assert balanced_micro_batches([1, 100, 1, 1], 2) == [[1], [0, 2, 3]]
    assert balanced_micro_batches([5], 4) == [[0]]  # never an empty micro-batch
    with pytest.raises(ValueError, match=">= 1"):
        balanced_micro_batches([1], 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_cpu_attention_matches_the_reference(window, dtype):
    """Decode rows and prompt chunks (with cached context before them) in one step, GQA, a window;
    bf16 against the reference in fp32 on the same bf16 values (the CPU attention computes in fp32)."""
    from moec.ops.paged_attention import paged_attention_ref, write_kv
    from moec.runtime.host_attention import cpu_attention
    from moec.runtime.kv_cache import build_step_inputs

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 8, 2, 16, 4
    cache = torch.randn(2, 2, 24, block, kv_heads, dim, generator=gen)
    chunks = [([3, 7, 1], list(range(1)), 9, True),  # decode at position 9
              ([2, 5], list(range(6)), 1, True),  # a prompt chunk after one cached token
              ([4], list(range(1)), 0, True),  # the first token of a sequence
              ([8, 9, 10, 11], list(range(3)), 12, False)]  # a chunk deep in its sequence
    inputs = build_step_inputs(chunks, block_size=block)
    tokens = inputs["positions"].shape[0]
    query = torch.randn(tokens, heads, dim, generator=gen)
    slots = inputs["block_tables"][inputs["seq_ids"], inputs["positions"] // block] * block + inputs["positions"] % block
    write_kv(cache, 1, torch.randn(tokens, kv_heads, dim, generator=gen), torch.randn(tokens, kv_heads, dim, generator=gen),
             slots)
    args = (inputs["block_tables"], inputs["seq_ids"], inputs["positions"], 0.25, window)
    got = cpu_attention(query.to(dtype), cache.to(dtype), 1, *args)
    want = paged_attention_ref(query.to(dtype).float(), cache.to(dtype).float(), 1, *args)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the output's bf16 rounding
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_offload_benchmark_runs_in_phases_that_resume(tmp_path):
    """benchmarks/offload.py on CPU with the tiny model: compile in one call, the rest in another
    (as two device calls would), the plan and both batches' rows in the result, the artifact gone
    before the HF copy is written (one copy of the model on disk), and bad phases a usage error."""
    import subprocess
    import sys

    from conftest import ROOT

    script = str(ROOT / "benchmarks" / "offload.py")
    common = ["--recipe", str(ROOT / "recipes" / "tiny-mixtral.yaml"), "--layers", "4", "--gpu-memory", "8MiB",
              "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget-s", "300",
              "--context", "64", "--gen", "16"]  # the logic, not the GPU run's 512 + 128

    def run(*extra):
        return subprocess.run([sys.executable, script, *common, *extra], capture_output=True, text=True, timeout=600)

    proc = run("--phases", "moec")
    assert proc.returncode == 2 and "start with compile" in proc.stderr
    # every layer's experts resident: micro-batches with nothing to stream (the pager then never prefetches)
    policy = '{"placement": "cpu", "micro_batches": 2, "batch": 4, "resident_expert_layers": 4}'
    proc = run("--phases", "compile", "--policy", policy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "work" / "artifact" / "manifest.json").is_file()
    assert not list((tmp_path / "work").glob("**/model.safetensors"))  # the compiler kept no copy of the source
    proc = run("--phases", "moec,accelerate,report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "offload.json").read_text())
    assert result["phases_done"] == ["compile", "moec", "accelerate", "report"]
    assert [p for p, _ in result["phase_s"]] == result["phases_done"] and result["hf_write_s"] > 0
    assert result["compile_peak_gpu_gib"] == 0  # the compiler ran in the capped role (no GPU here)
    assert result["plan"]["policy"]["placement"] == "cpu" and result["plan"]["policy"]["micro_batches"] == 2
    assert [r["batch"] for r in result["rows"]] == [1, 4] and all(r["moec"] > 0 for r in result["rows"]), proc.stderr[-4000:]
    assert result["moec"]["offload"]["policy"]["resident_expert_layers"] == 4
    assert not [s for s in result["skipped"] if s.startswith("moec")]  # the moec role ran to the end
    assert not (tmp_path / "work" / "artifact").exists() and (tmp_path / "work" / "hf" / "config.json").is_file()
    assert (tmp_path / "out" / "offload.png").is_file()
    assert run("--phases", "compile,warp").returncode == 2
    # a committed GPU result resumed into a fresh work dir: its rows reported again (no compile)
    h200 = ROOT / "benchmarks" / "results" / "offload-h200-2026-12-03.json"
    common[common.index("--work") + 1] = str(tmp_path / "fresh")
    common[common.index("--out") + 1] = str(tmp_path / "again")
    proc = run("--phases", "report", "--resume-from", str(h200))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "offload.json").read_text())
    assert [r["batch"] for r in again["rows"]] == [1, 128] and again["rows"][1]["moec"] == pytest.approx(163.2, abs=0.1)
