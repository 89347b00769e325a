"""The performance gates can fail: each injected regression turns them red, naming the metric.

Injected into results (every gated kind of number, against the committed baselines and their
tolerances) and through the real measurements (a sleep in the engine step, an extra host sync,
an extra pass of the compiled step, an extra kernel in the compiled wrapper). The callgrind count
itself is not rerun here (~45 s under valgrind): `make gate` runs it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_gates  # noqa: E402
import gate  # noqa: E402
import report  # noqa: E402
import result_format  # noqa: E402

from moec.runtime.regression_gate import BASELINE_FORMAT, check_result, run_gate, updated_baseline  # noqa: E402

CPU_BASELINE = ROOT / "benchmarks" / "baselines" / "cpu.json"
H100_BASELINE = ROOT / "benchmarks" / "baselines" / "h100.json"
H100_MOE_LAYER = ROOT / "benchmarks" / "results" / "moe_layer-h100-2026-11-23.json"


def accepted_result(baseline_path: Path, benchmark: str) -> dict:
    """A result that measures exactly what the baseline accepted."""
    baseline = json.loads(baseline_path.read_text())
    section = baseline["benchmarks"][benchmark]
    return {"format": "moec-result/1", "benchmark": benchmark, "date": "2026-11-23T00:00:00+00:00",
            "git_commit": "test", "device": section["accepted"]["device"], "device_kind": baseline["device_kind"],
            "versions": {}, "metrics": [{"name": name, **{k: e[k] for k in ("value", "unit", "direction")}}
                                        for name, e in section["metrics"].items()]}


def with_value(result: dict, name: str, change) -> dict:
    out = copy.deepcopy(result)
    (m,) = [m for m in out["metrics"] if m["name"] == name]
    m["value"] = change(m["value"])
    return out


def gate_cli(capsys, tmp_path: Path, result: dict, baseline: Path, *flags: str) -> tuple[int, str]:
    """benchmarks/gate.py RESULT BASELINE, in process (a subprocess would spend seconds importing torch)."""
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    code = gate.main([str(path), str(baseline), *flags])
    out, err = capsys.readouterr()
    return code, out + err


# --- the comparison, on the committed CPU baseline ---------------------------------------------------


def test_the_accepted_values_pass(capsys, tmp_path):
    code, out = gate_cli(capsys, tmp_path, accepted_result(CPU_BASELINE, "cpu_gates"), CPU_BASELINE)
    assert code == 0, out
    assert "PASS" in out and "regression" not in out


@pytest.mark.parametrize("name, change, verdict", [
    ("aoti/generated_kernels_per_step", lambda v: v + 1, "REGRESSION"),  # one more kernel launched
    ("aoti/extern_kernels_per_step", lambda v: v + 1, "REGRESSION"),
    ("aoti/python_op_calls_per_step", lambda v: v + 1, "REGRESSION"),
    ("graph/call_nodes", lambda v: v + 1, "REGRESSION"),  # a fusion the passes no longer make
    ("graph/moec_op_nodes", lambda v: v - 2, "REGRESSION"),  # a MoE region left unlowered
    ("decode_step/host_syncs", lambda v: v + 1, "REGRESSION"),  # an extra .item()
    ("decode_step/aten_ops", lambda v: v + 1, "REGRESSION"),
    ("decode_step/weight_bytes", lambda v: v + 4096, "REGRESSION"),
    ("decode_step/instructions", lambda v: round(v * 1.05), "REGRESSION"),  # an extra pass over the data
    ("speed/tokens_per_s_over_hf_eager", lambda v: v / 2, "REGRESSION"),  # twice as slow
    ("speed/tokens_per_s_over_hf_eager", lambda v: v * 1.6, "UNEXPLAINED IMPROVEMENT"),
    ("aoti/generated_kernels_per_step", lambda v: v - 1, "UNEXPLAINED IMPROVEMENT"),
    ("decode_step/instructions", lambda v: round(v * 0.95), "UNEXPLAINED IMPROVEMENT"),
])
def test_an_injected_change_fails_naming_the_metric(capsys, tmp_path, name, change, verdict):
    result = with_value(accepted_result(CPU_BASELINE, "cpu_gates"), name, change)
    code, out = gate_cli(capsys, tmp_path, result, CPU_BASELINE)
    assert code == 1, out
    assert f"{verdict} {name}:" in out
    assert f"FAIL 1 of" in out and out.rstrip().endswith(name)
    if verdict.startswith("UNEXPLAINED"):
        assert "--update if intended" in out


@pytest.mark.parametrize("name, change", [
    ("speed/tokens_per_s_over_hf_eager", lambda v: v * 0.8),  # what a loaded 2-core machine does
    ("speed/tokens_per_s_over_hf_eager", lambda v: v * 1.2),
    ("decode_step/instructions", lambda v: round(v * 1.01)),
])
def test_noise_stays_green(capsys, tmp_path, name, change):
    code, out = gate_cli(capsys, tmp_path, with_value(accepted_result(CPU_BASELINE, "cpu_gates"), name, change),
                         CPU_BASELINE)
    assert code == 0, out


def test_a_metric_that_stopped_being_measured_fails(capsys, tmp_path):
    result = accepted_result(CPU_BASELINE, "cpu_gates")
    result["metrics"] = [m for m in result["metrics"] if m["name"] != "decode_step/instructions"]
    code, out = gate_cli(capsys, tmp_path, result, CPU_BASELINE)
    assert code == 1 and "MISSING decode_step/instructions" in out


def test_update_rewrites_the_baseline_on_purpose(capsys, tmp_path):
    baseline = tmp_path / "cpu.json"
    shutil.copy(CPU_BASELINE, baseline)
    moved = with_value(accepted_result(CPU_BASELINE, "cpu_gates"), "aoti/generated_kernels_per_step", lambda v: v - 1)
    moved["git_commit"] = "abc123"
    assert gate_cli(capsys, tmp_path, moved, baseline)[0] == 1
    code, out = gate_cli(capsys, tmp_path, moved, baseline, "--update")
    assert code == 0 and "updated" in out
    after = json.loads(baseline.read_text())["benchmarks"]["cpu_gates"]
    before = json.loads(CPU_BASELINE.read_text())["benchmarks"]["cpu_gates"]
    assert after["accepted"]["git_commit"] == "abc123"
    assert after["metrics"]["aoti/generated_kernels_per_step"]["value"] == \
        before["metrics"]["aoti/generated_kernels_per_step"]["value"] - 1
    assert {k: v["tolerance"] for k, v in after["metrics"].items()} == \
        {k: v["tolerance"] for k, v in before["metrics"].items()}  # tolerances are kept
    assert gate_cli(capsys, tmp_path, moved, baseline)[0] == 0


def test_a_result_from_another_device_is_a_one_line_error(capsys, tmp_path):
    code, out = gate_cli(capsys, tmp_path, result_format.load_result(H100_MOE_LAYER), CPU_BASELINE)
    assert code == 2
    assert out.strip().count("\n") == 0 and "h100" in out and "cpu" in out


def test_a_new_baseline_takes_the_producers_tolerances():
    result = accepted_result(CPU_BASELINE, "cpu_gates")
    result["metrics"].append({"name": "new/ungated", "value": 1, "unit": "x", "direction": "lower"})
    result["metrics"].append({"name": "new/gated", "value": 1, "unit": "x", "direction": "lower",
                              "tolerance": {"rel": 0.5}})
    baseline = updated_baseline(result, None)
    assert baseline["format"] == BASELINE_FORMAT and baseline["device_kind"] == "cpu"
    metrics = baseline["benchmarks"]["cpu_gates"]["metrics"]
    assert "new/ungated" not in metrics and metrics["new/gated"]["tolerance"] == {"rel": 0.5}


# --- through the real measurements, on the session's tiny artifact ------------------------------------


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def baseline_file(tmp_path: Path, metrics: list[dict]) -> Path:
    """A baseline that accepts `metrics` (measured just now, with their gate tolerances)."""
    result = {"format": "moec-result/1", "benchmark": "cpu_gates", "date": "now", "git_commit": None,
              "device": "this machine", "device_kind": "cpu", "versions": {}, "metrics": metrics}
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(updated_baseline(result, None)))
    return path


def gate_says(capsys, metrics: list[dict], baseline: Path) -> tuple[int, str]:
    result = {"format": "moec-result/1", "benchmark": "cpu_gates", "date": "now", "git_commit": None,
              "device": "this machine", "device_kind": "cpu", "versions": {}, "metrics": metrics}
    code = run_gate(result, baseline)
    return code, capsys.readouterr().out


def test_a_sleep_in_the_engine_step_fails_the_speed_gate(tiny_artifact, hf_model, one_thread, capsys, tmp_path,
                                                         monkeypatch):
    from moec.runtime import Engine

    engine = Engine.load(tiny_artifact)
    baseline = baseline_file(tmp_path, cpu_gates.speed_metrics(engine, hf_model, {}, pairs=5))
    real_step = Engine.step

    def slow_step(self):
        time.sleep(0.004)
        return real_step(self)

    monkeypatch.setattr(Engine, "step", slow_step)
    code, out = gate_says(capsys, cpu_gates.speed_metrics(engine, hf_model, {}, pairs=5), baseline)
    assert code == 1, out
    assert "REGRESSION speed/tokens_per_s_over_hf_eager" in out


def test_an_extra_sync_and_an_extra_pass_fail_the_step_gates(tiny_artifact, one_thread, capsys, tmp_path,
                                                              monkeypatch):
    from moec.runtime import Engine
    from moec.runtime.sampler import Sampler

    engine = Engine.load(tiny_artifact)
    baseline = baseline_file(tmp_path, cpu_gates.step_metrics(engine, {}))
    assert gate_says(capsys, cpu_gates.step_metrics(engine, {}), baseline)[0] == 0  # exact counts repeat

    real_sample = Sampler.sample

    def sample_with_sync(self, logits, *args):
        if logits.abs().max().item() < 0:  # a host read the step does not need
            raise AssertionError
        return real_sample(self, logits, *args)

    monkeypatch.setattr(Sampler, "sample", sample_with_sync)
    code, out = gate_says(capsys, cpu_gates.step_metrics(engine, {}), baseline)
    assert code == 1 and "REGRESSION decode_step/host_syncs" in out
    monkeypatch.setattr(Sampler, "sample", real_sample)

    real_step_fn = engine.step_fn

    def twice(*args):  # the whole compiled step run again: an extra pass over every weight
        real_step_fn(*args)
        return real_step_fn(*args)

    engine.step_fn = twice
    code, out = gate_says(capsys, cpu_gates.step_metrics(engine, {}), baseline)
    assert code == 1 and "REGRESSION decode_step/aten_ops" in out


def test_a_step_that_copies_the_kv_cache_fails_the_kv_gate(tiny_artifact, one_thread, capsys, tmp_path, monkeypatch):
    """The regression the GPU found: the cache write traced into a copy of the whole cache per step."""
    from moec.runtime import Engine

    baseline = baseline_file(tmp_path, cpu_gates.kv_cache_metrics(tiny_artifact, {}))
    real_step = Engine.step

    def step_copying_the_cache(self):
        self.kv_cache.copy_(self.kv_cache.clone())
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step_copying_the_cache)
    code, out = gate_says(capsys, cpu_gates.kv_cache_metrics(tiny_artifact, {}), baseline)
    assert code == 1 and "REGRESSION decode_step/time_large_kv_over_default" in out


def test_an_extra_kernel_in_the_compiled_wrapper_fails_the_structure_gate(tiny_artifact, capsys, tmp_path):
    graph = {"call_nodes": 1, "moec_op_nodes": 1}
    baseline = baseline_file(tmp_path, cpu_gates.structure_metrics(tiny_artifact, graph, {}))
    changed = tmp_path / "artifact"
    changed.mkdir()
    with zipfile.ZipFile(tiny_artifact / "model.pt2") as src, zipfile.ZipFile(changed / "model.pt2", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".wrapper.cpp"):
                text = data.decode()
                body = text.index("void AOTInductorModel::run_impl(")
                call = text.index("    cpp_fused_", body)
                line = text[call:text.index("\n", call) + 1]
                data = (text[:call] + line + text[call:]).encode()  # the first kernel launched twice
            dst.writestr(item, data)
    code, out = gate_says(capsys, cpu_gates.structure_metrics(changed, graph, {}), baseline)
    assert code == 1 and "REGRESSION aoti/generated_kernels_per_step" in out


# --- the GPU gate's comparison, on the committed H100 results -----------------------------------------


def gpu_gate_compare(results: Path, *benches: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_gate.sh"), "--compare", str(results), *benches],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})


def test_gpu_gate_passes_the_committed_h100_result_and_fails_a_slower_one(tmp_path):
    proc = gpu_gate_compare(ROOT / "benchmarks" / "results", "moe_layer")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    doc = json.loads(H100_MOE_LAYER.read_text())
    for m in doc["metrics"]:
        if m["name"] == "qwen3-30b-a3b/T=16/moec_graph_ms":
            m["value"] *= 1.3
    (tmp_path / "moe_layer-h100-2026-12-01.json").write_text(json.dumps(doc))
    shutil.copy(H100_MOE_LAYER, tmp_path)  # older: the newest result is the one compared
    proc = gpu_gate_compare(tmp_path, "moe_layer", "e2e_decode")
    assert proc.returncode == 1
    assert "REGRESSION qwen3-30b-a3b/T=16/moec_graph_ms" in proc.stdout
    assert "no e2e_decode result" in proc.stdout


def test_gpu_gate_passes_over_a_newer_run_of_some_shapes_only(tmp_path):
    """A full sweep runs one shape per device call (`moe_layer.py --shapes ...`), and a check of
    a change may run a few token counts (`--tokens`): neither result is a gate run, so
    `--compare` gates the newest run of every shape and token count and says what it passed
    over; that run regressed still fails."""
    # the gate run the H100 baseline was accepted from
    gate_run = json.loads((ROOT / "benchmarks" / "results" / "moe_layer-h100-2026-12-06T1309.json").read_text())
    assert not (gate_run.get("args") or {}).get("shapes")
    (tmp_path / "moe_layer-h100-2026-12-01.json").write_text(json.dumps(gate_run))
    partial = copy.deepcopy(gate_run)
    partial["args"] = {**(partial.get("args") or {}), "shapes": "mixtral-8x7b"}
    partial["metrics"] = [m for m in partial["metrics"] if not m["name"].startswith("qwen3")]
    (tmp_path / "moe_layer-h100-2026-12-02.json").write_text(json.dumps(partial))
    few_tokens = copy.deepcopy(gate_run)  # and a newer one of some token counts (--tokens)
    few_tokens["args"] = {**(few_tokens.get("args") or {}), "tokens": "1,4,16"}
    few_tokens["metrics"] = [m for m in few_tokens["metrics"] if "/T=1/" in m["name"] or "/T=4/" in m["name"]]
    (tmp_path / "moe_layer-h100-2026-12-03.json").write_text(json.dumps(few_tokens))
    proc = gpu_gate_compare(tmp_path, "moe_layer")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passing over moe_layer-h100-2026-12-02.json (--shapes mixtral-8x7b" in proc.stderr
    assert "passing over moe_layer-h100-2026-12-03.json (--tokens 1,4,16" in proc.stderr
    assert "moe_layer-h100-2026-12-01.json against" in proc.stdout
    for m in gate_run["metrics"]:
        if m["name"] == "qwen3-30b-a3b/T=16/moec_graph_ms":
            m["value"] *= 1.3
    (tmp_path / "moe_layer-h100-2026-12-01.json").write_text(json.dumps(gate_run))
    proc = gpu_gate_compare(tmp_path, "moe_layer")
    assert proc.returncode == 1 and "REGRESSION qwen3-30b-a3b/T=16/moec_graph_ms" in proc.stdout


def test_flicker_check_gates_every_run_and_names_the_one_that_failed(tmp_path):
    """`gpu_gate.sh --compare-each`: each of a flicker check's runs against the baseline; one run
    half as fast at batch 8 fails the check, naming the metric, while the other runs pass."""
    accepted = ROOT / "benchmarks" / "results" / "e2e_decode-h200-2026-12-02T0545.json"
    for k in (1, 2, 3):
        doc = json.loads(accepted.read_text())
        if k == 3:
            row = next(r for r in doc["moec"]["decode"] if r["batch"] == 8)
            row["decode_tokens_per_s"] /= 2
        (tmp_path / f"e2e_decode-h200-2026-12-02-r{k}.json").write_text(json.dumps(doc))
    env = {**os.environ, "PYTHON": sys.executable, "GPU_KIND": "h200"}
    run = lambda: subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_gate.sh"), "--compare-each", str(tmp_path)],  # noqa: E731
                                 capture_output=True, text=True, timeout=120, env=env)
    proc = run()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 of 3 runs pass" in proc.stdout
    assert "REGRESSION decode/B=8/speedup_vs_hf_eager" in proc.stdout
    (tmp_path / "e2e_decode-h200-2026-12-02-r3.json").unlink()
    proc = run()
    assert proc.returncode == 0 and "2 of 2 runs pass" in proc.stdout, proc.stdout + proc.stderr


# --- the result format --------------------------------------------------------------------------------


def test_every_committed_result_reads_in_the_common_format():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        result = result_format.load_result(path)
        assert result["metrics"], path
    layer = result_format.load_result(H100_MOE_LAYER)
    assert layer["device_kind"] == "h100" and layer["git_commit"].startswith("0eb3432")
    graph = {m["name"]: m for m in layer["metrics"]}["mixtral-8x7b/T=1/moec_graph_ms"]
    assert graph["roofline"] == pytest.approx(0.2345, rel=1e-3)  # the bound measured in the same run
    assert not any(m["name"].endswith("roofline_ms") for m in layer["metrics"])


def test_bench_json_carries_metrics_and_compare_gates_them(tiny_artifact, tmp_path, capsys):
    """`moe-runtime bench --compare B --update` records a baseline; the same result passes it, a
    slower one fails. Ceilings are given, so nothing but the engine is timed."""
    from moec.runtime.cli import main

    out, baseline = tmp_path / "bench.json", tmp_path / "baseline.json"
    code = main(["bench", str(tiny_artifact), "--batch-sizes", "1,2", "--context", "8", "--decode-tokens", "4",
                 "--prefill-tokens", "8", "--repeats", "1", "--copy-bandwidth", "10", "--matmul-tflops", "0.1",
                 "--json", str(out), "--compare", str(baseline), "--update"])
    assert code == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    check_result(result)
    assert result["device_kind"] == "cpu"
    names = {m["name"]: m for m in result["metrics"]}
    decode = names["decode/B=2/C=8/decode_tokens_per_s"]
    assert decode["roofline"] == result["decode"][1]["bound_tokens_per_s"]
    assert json.loads(baseline.read_text())["benchmarks"]["moe-runtime bench"]["metrics"]
    capsys.readouterr()
    assert run_gate(result, baseline) == 0
    assert run_gate(with_value(result, "decode/B=2/C=8/decode_tokens_per_s", lambda v: v / 2), baseline) == 1
    assert "REGRESSION decode/B=2/C=8/decode_tokens_per_s" in capsys.readouterr().out

    # e2e_decode.py's output is its bench plus the checks and peers: converted to the same metrics
    e2e = {"benchmark": "e2e_decode", "model": "tiny", "device": "cpu", "versions": {"torch": torch.__version__},
           "date": result["date"], "compile_s": 30.0, "commit": "abc", "moec": result,
           "check": {"load_to_first_token_s": 1.5, "prompts": [
               {"logits_rel_error": 0.001, "greedy_identical_16": True},
               {"logits_rel_error": 0.003, "greedy_identical_16": False}]},
           "hf_eager": {"decode": [{"batch": 2, "decode_tokens_per_s": decode["value"] / 4}], "prefill": None}}
    converted = {m["name"]: m for m in result_format.to_result(e2e)["metrics"]}
    assert converted["decode/B=2/speedup_vs_hf_eager"]["value"] == pytest.approx(4)
    assert converted["moec/decode/B=2/C=8/decode_tokens_per_s"]["value"] == decode["value"]
    assert converted["greedy_16_identical_prompts"]["value"] == 1
    assert converted["logits_rel_error_max"]["value"] == 0.003


def test_update_needs_compare(tmp_path, capsys):
    from moec.runtime.cli import main

    assert main(["bench", str(tmp_path / "none"), "--update"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_report_renders_history(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(H100_MOE_LAYER, results)
    later = json.loads(H100_MOE_LAYER.read_text())
    later.update(date="2026-12-01T00:00:00+00:00", commit="fedcba9876")
    (results / "moe_layer-h100-2026-12-01.json").write_text(json.dumps(later))
    (results / "unknown.json").write_text(json.dumps({"benchmark": "mystery"}))
    out = tmp_path / "REPORT.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## moe_layer · h100" in text and "2026-11-23 0eb3432" in text and "2026-12-01 fedcba9" in text
    assert "![moe_layer on h100, every run](report/moe-layer-h100.png)" in text
    assert (tmp_path / "report" / "moe-layer-h100.png").stat().st_size > 10_000
    assert "unknown.json" in text  # named under "Not shown", never silently dropped


def test_report_keeps_models_apart(tmp_path):
    """A 2-layer and an 8-layer e2e run on one device are two histories, not a fall in throughput."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("e2e_decode-h200-2026-12-01.json", "e2e_decode-h200-2026-12-02.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, results)
    out = tmp_path / "REPORT.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## e2e_decode · h200 · mixtral-8x7b-shape, 8 layers" in text
    assert "## e2e_decode · h200 · mixtral-8x7b-shape, 2 layers" in text


def test_calibration_from_repeated_runs_widens_noise_and_ungates_what_cannot_be_gated(tmp_path, capsys):
    """`gate.py --calibrate`: three runs of one commit. A metric steady across them keeps its
    tolerance; one that moved 20% gets 1.5x that (30%); one that moved 2.5x leaves the gates (its
    noise would hide a 2x regression) and a later --update does not bring it back. Every run then
    passes against the calibrated baseline, and a 2x regression of the widened metric still fails."""
    def run(k: int, steady: float, moving: float, wild: float) -> dict:
        return {"format": "moec-result/1", "benchmark": "e2e_decode", "date": f"2026-12-02T0{k}:00:00Z",
                "git_commit": "abc", "device": "NVIDIA H200", "device_kind": "h200", "versions": {},
                "metrics": [{"name": "steady", "value": steady, "unit": "tok/s", "direction": "higher",
                             "tolerance": {"rel": 0.15}},
                            {"name": "moving", "value": moving, "unit": "ms", "direction": "lower",
                             "tolerance": {"rel": 0.15}},
                            {"name": "wild", "value": wild, "unit": "x", "direction": "higher",
                             "tolerance": {"rel": 0.5}}]}

    runs = [run(1, 100.0, 1.0, 4.0), run(2, 101.0, 1.1, 10.0), run(3, 99.0, 1.2, 7.0)]
    paths = []
    for k, r in enumerate(runs):
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps(r))
    baseline = tmp_path / "h200.json"
    assert gate.main(["--calibrate", str(baseline), *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "moving: tolerance ±30%" in out and "wild: ungated" in out
    metrics = json.loads(baseline.read_text())["benchmarks"]["e2e_decode"]
    assert metrics["metrics"]["steady"]["value"] == 99.0 and metrics["metrics"]["moving"]["value"] == 1.2  # run 3: nearest
    assert metrics["metrics"]["steady"]["tolerance"] == {"rel": 0.15}
    assert metrics["metrics"]["moving"]["tolerance"] == {"rel": 0.3} and "wild" in metrics["ungated"]
    for r in runs:
        assert run_gate(r, baseline) == 0
    assert run_gate(with_value(runs[1], "moving", lambda v: 2 * v), baseline) == 1
    assert run_gate(runs[0], baseline, update=True) == 0
    again = json.loads(baseline.read_text())["benchmarks"]["e2e_decode"]
    assert "wild" not in again["metrics"] and "wild" in again["ungated"]
    with pytest.raises(SystemExit):  # fewer than 3 runs: a usage error
        gate.main(["--calibrate", str(baseline), str(paths[0])])
    assert "at least 3 runs" in capsys.readouterr().err


def test_moe_layer_repeats_are_results_the_calibration_accepts(tmp_path, capsys):
    """`moe_layer.py --repeat 3` (what `gpu_gate.sh --flicker 3 moe_layer` runs; here the tiny shapes on
    CPU): three results of the same cases, each in the common format with its own ceilings, which
    `gate.py --calibrate` turns into a baseline that every one of them passes."""
    out = tmp_path / "ml"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--device", "cpu", "--quick",
                           "--no-sweep", "--no-compile", "--repeat", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [out / "moe_layer.json", out / "moe_layer-r2.json", out / "moe_layer-r3.json"]
    docs = [result_format.load_result(p) for p in runs]
    names = [{m["name"] for m in d["metrics"]} for d in docs]
    assert names[0] == names[1] == names[2] and "copy_bandwidth" in names[0]
    assert all(d["benchmark"] == "moe_layer" for d in docs)
    baseline = tmp_path / "cpu.json"
    assert gate.main(["--calibrate", str(baseline), *map(str, runs)]) == 0
    capsys.readouterr()
    assert all(run_gate(d, baseline) == 0 for d in docs)


def test_gpu_gate_flicker_refuses_an_unknown_benchmark():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_gate.sh"), "--flicker", "3", "serve"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "e2e_decode or moe_layer" in proc.stdout


def test_interleaved_timing_rotates_the_order_and_times_each_fn_every_round():
    import time

    import measure

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    def fast():
        calls.append("fast")

    timed = measure.time_interleaved({"slow": slow, "fast": fast}, torch.device("cpu"), rounds=6)
    assert timed["slow"]["n"] == timed["fast"]["n"] == 6
    assert timed["slow"]["median_ms"] >= 4.0 > timed["fast"]["median_ms"]
    rounds = [calls[i:i + 2] for i in range(2, len(calls), 2)]  # after the warm-up pair
    assert rounds[0] == ["slow", "fast"] and rounds[1] == ["fast", "slow"]


def test_moe_layer_dense_bmm_ceiling_does_the_routed_gemm_work():
    """The cuBLAS bmm ceiling in `moe_layer.py` does the experts' GEMMs of the case (the
    roofline's FLOPs less the router's, up to rounding rows up per expert) and nothing more: its
    outputs have the shapes of the two GEMMs over the experts hit."""
    import moe_layer

    layer = moe_layer.Layer("qwen3-tiny", moe_layer.TINY_SHAPES["qwen3-tiny"], "cpu", torch.float32, None, 0, 0)
    for tokens, hit in ((1, 4), (16, 8), (33, 8)):
        down = layer.dense_bmm(tokens, hit)()
        rows = -(-tokens * layer.K // hit)
        assert down.shape == (hit, rows, layer.H)
        roof = moe_layer.roofline(layer, tokens, hit, 1000.0, 100.0)
        gemm_flops = roof["flops"] - 2.0 * tokens * layer.H * layer.E
        bmm_flops = 2.0 * hit * rows * (layer.H * 2 * layer.I + layer.I * layer.H)
        assert gemm_flops <= bmm_flops < gemm_flops * (1 + hit / (tokens * layer.K))


def test_gemm_profile_reads_ncu_csv_in_base_units_and_converts():
    """ncu's raw CSV (its own unit per column, thousands separators, its log lines between) →
    per-kernel metrics in ns and bytes → the common format."""
    import gemm_profile

    text = ('==PROF== Connected to process 1\n'
            '"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum","lts__t_sector_hit_rate.pct",'
            '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"\n'
            '"","","usecond","Gbyte","%","ratio"\n'
            '"0","mixtral/T=4096/down sorted","1,944.50","1.25","81.2","0.4"\n'
            '"1","mixtral/T=4096/down CUTLASS","1,483","0.9","90","0.1"\n==PROF== Disconnected\n')
    recs = gemm_profile.parse_raw_csv(text)
    assert [r["Kernel Name"] for r in recs] == ["mixtral/T=4096/down sorted", "mixtral/T=4096/down CUTLASS"]
    assert recs[0]["gpu__time_duration.sum"] == {"value": pytest.approx(1944500.0), "unit": "ns"}
    assert recs[1]["dram__bytes_read.sum"] == {"value": pytest.approx(9e8), "unit": "byte"}
    env = {"date": "2026-12-06T10:00:00+00:00", "commit": "abc", "device": {"kind": "cuda", "name": "NVIDIA H100"}}
    kernels = [{"label": r["Kernel Name"], "metrics": {k: v["value"] for k, v in r.items() if isinstance(v, dict)}}
               for r in recs]
    doc = result_format.to_result({"benchmark": "gemm_profile", "env": env, "kernels": kernels})
    got = {m["name"]: m["value"] for m in doc["metrics"]}
    assert got["mixtral/T=4096/down_sorted/us"] == pytest.approx(1944.5)
    assert got["mixtral/T=4096/down_CUTLASS/dram_read_bytes"] == pytest.approx(9e8)
    assert doc["device_kind"] == "h100"


def test_moe_layer_tuned_pick_retimes_the_finalists_round_by_round():
    """The sweep's pick is decided on the compiler tuner's finalists (within 15% of the fastest
    block median, the grouped_mm path among them) timed round by round, not on block medians
    taken seconds apart: a config whose block median looked best but runs slower now is not
    picked, and one far behind is not run again."""
    import types

    import moe_layer

    ran = []

    def moec(hidden, cfg):
        ran.append(cfg["name"])
        time.sleep(cfg["sleep"])

    layer = types.SimpleNamespace(moec=moec, grouped_mm=lambda hidden: time.sleep(0.004))
    good = [{"name": n, "config": {"name": n, "sleep": s}, "tuner": True}
            for n, s in (("a", 0.02), ("b", 0.0), ("c", 0.01), ("d", 0.0))]
    timed = {"a": 1.0, "b": 1.05, "c": 1.1, "d": 1.5, "grouped_mm": 1.12}  # block medians: "a" looked fastest
    case = {"errors": {}}
    ctx = {"device": torch.device("cpu"), "flush": None}
    final = moe_layer.attempt_final(layer, None, case, good, timed, ctx)
    assert final["config"] == "b" and set(final["finalists_ms"]) == {"a", "b", "c", "grouped_mm"}
    assert final["finalists_ms"]["a"] > final["finalists_ms"]["grouped_mm"] > final["median_ms"]
    assert "d" not in ran and final["timer"].endswith("interleaved")


def test_l2_flusher_names_its_flush_and_refuses_an_unknown_one():
    """The timed-call flush is a read unless asked to write (see measure.L2Flusher: a written
    flush leaves dirty lines that the timed call writes back); on CPU it holds nothing."""
    import measure

    cpu = torch.device("cpu")
    assert measure.L2Flusher(cpu).how == "read" and measure.L2Flusher(cpu, how="write").how == "write"
    flush = measure.L2Flusher(cpu)
    flush()  # a no-op without a GPU
    assert flush.buf is None
    timed = measure.time_fn(lambda: None, cpu, flush=flush, warmup=1, min_iters=2, max_iters=2, target_s=0)
    assert timed["flushed_l2"] is False and "l2_flush" not in timed
    with pytest.raises(ValueError, match="how='zeros'; choose one of read, write"):
        measure.L2Flusher(cpu, how="zeros")


def test_l2_flush_result_loads_and_its_table_names_every_flush(capsys):
    """`benchmarks/l2_flush.py` (GPU only: it refuses a machine without one in one line) writes the
    common result format: its metrics from rows as the GPU run makes them load and gate."""
    import l2_flush
    from result_format import new_result, to_result

    if not torch.cuda.is_available():
        assert l2_flush.main(["--out", "/nonexistent"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    reads = [{"mb": 16, "write": 17.3, "read": 15.0, "none": 12.1}]
    layer = {"shape": "qwen3-30b-a3b", "tokens": 1, "layers": 8, "roofline_us": [25.0] * 8,
             **{f"{kind}_{n}_us": v for kind in ("one", "per_layer") for n, v in (("write", 53.8), ("read", 45.5),
                                                                                  ("none", 44.6))}}
    layer["one_over_roofline"] = {n: layer[f"one_{n}_us"] / 25.0 for n in ("write", "read", "none")}
    layer["per_layer_over_roofline"] = {n: layer[f"per_layer_{n}_us"] / 25.0 for n in ("write", "read", "none")}
    doc = new_result("l2_flush", "cuda", "NVIDIA H100 80GB HBM3", l2_flush.metrics(reads, [layer], 3000.0), {})
    loaded = to_result(doc)
    names = {m["name"] for m in loaded["metrics"]}
    assert {"read_16MB/write_flush_us", "qwen3-30b-a3b/T=1/one_replay_read_flush_us",
            "qwen3-30b-a3b/T=1/per_layer_of_8_none_flush_us"} <= names and loaded["device_kind"] == "h100"
    table = l2_flush.table(reads, [layer])
    assert "sum of  16 MB" in table and "1.82x (read)" in table


def test_gpu_op_check_child_crash_becomes_an_error_row(tmp_path, monkeypatch):
    """gpu_op_check runs each AOTInductor case in a child process (a segmentation fault in
    AOTInductor under torch 2.11 took every later row and the JSON with it, H100, 2026-12-07): a
    child killed by a signal leaves the rows it printed and an error row naming the signal and the
    stage it died in; one that exits non-zero the same with its status, one that hangs the same
    once it is stopped."""
    import gpu_op_check

    child = tmp_path / "child.py"
    child.write_text(
        "import json, os, signal, sys\n"
        "print('STAGE load the package', flush=True)\n"
        "print('ROW ' + json.dumps({'op': 'fused_moe E=128', 'case': 'T=1 default (aoti)', 'compiled': True,"
        " 'rel_error': 0.004}), flush=True)\n"
        "print('STAGE T=5', flush=True)\n"
        "print('DEBUG noise', file=sys.stderr); print('the last words', file=sys.stderr, flush=True)\n"
        "import time; time.sleep(60) if sys.argv[2] == 'many:hang' else None\n"
        "os.kill(os.getpid(), signal.SIGSEGV) if sys.argv[2] == 'many:default' else sys.exit(3)\n")
    monkeypatch.setattr(gpu_op_check, "__file__", str(child))
    rows = gpu_op_check.in_child("many:default")
    assert rows[0] == {"op": "fused_moe E=128", "case": "T=1 default (aoti)", "compiled": True, "rel_error": 0.004}
    assert len(rows) == 2 and rows[1]["case"] == "aoti, default"
    assert rows[1]["error"].startswith("the child process was killed by SIGSEGV during: T=5; stderr: the last words")
    died = gpu_op_check.in_child("switch:reuse")[-1]
    assert died["op"] == "switch (aoti child)" and "exit status 3 during: T=5" in died["error"]
    assert gpu_op_check.child_rows("many:x", 0, "ROW {\"rel_error\": 0.1}\nnoise\n", "") == [{"rel_error": 0.1}]
    monkeypatch.setattr(gpu_op_check, "CHILD_TIMEOUT_S", 3)  # a hung child is stopped, its rows kept
    hung = gpu_op_check.in_child("many:hang")
    assert hung[0]["rel_error"] == 0.004 and hung[-1]["case"] == "aoti, hang"
    assert hung[-1]["error"].startswith("the child process was stopped after 3 s during: T=5")


def test_gpu_op_check_compiles_and_loads_as_moec_does(tmp_path, monkeypatch):
    """gpu_op_check's AOTInductor cases build their package with moec's Inductor configs (the
    weights outside the library: AOTInductor's default packages segfaulted while loading on an
    H100 under torch 2.11) and a case's own on top, and load it with the runtime's loader; here a
    CPU program through it."""
    import gpu_op_check

    from moec.compiler.lower import INDUCTOR_CONFIGS

    class Block(torch.nn.Module):
        def forward(self, x, w):
            return (x @ w).relu()

    seen, compile_package = [], torch._inductor.aoti_compile_and_package

    def spy(ep, **kwargs):
        seen.append(dict(kwargs["inductor_configs"]))  # torch adds its own keys to the dict it is given
        return compile_package(ep, **kwargs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", spy)
    x, w = torch.randn(6, 16), torch.randn(16, 8)
    ep = torch.export.export(Block(), (x, w), dynamic_shapes=({0: torch.export.Dim("t", min=1, max=64)}, None))
    run = gpu_op_check.aoti_load(ep, str(tmp_path), "block", {"allow_buffer_reuse": False})
    assert seen == [{**INDUCTOR_CONFIGS, "allow_buffer_reuse": False}]
    x = torch.randn(11, 16)
    torch.testing.assert_close(run(x, w), (x @ w).relu())
