"""`moe-runtime bench`, the roofline it divides by, and GPU telemetry (faked: CI has no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from moec.runtime.gpu_telemetry import GpuTelemetry
from moec.runtime.roofline import (
    ModelShape,
    MoeLayerShape,
    bound_s,
    decode_step,
    expected_distinct_experts,
    prefill_step,
)

# recipes/tiny-mixtral.yaml: hidden 64, 2 layers, 4 heads (2 KV) of 16, vocab 512, 4 experts top-2 of 128, fp32
TINY = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
                  weight_itemsize=4, kv_itemsize=4, moe_layers=(MoeLayerShape(4, 2, 128),) * 2,
                  dense_intermediate_size=128)
# By hand, in parameters:
#   attention q,k,v,o per layer: 64*64 + 2*64*32 + 64*64 = 12288; norms 2*64 = 128; router 64*4 = 256
#   non-expert, read whole every step: 2*(12288 + 128 + 256) + final norm 64 + lm_head 512*64 = 58176
#   one expert: 3*64*128 = 24576; KV per token: 2 layers * 2 * 2 heads * 16 = 128 values = 512 bytes
#   matmul weights per token (lm_head aside): 2*(12288 + 256 + 2*24576) = 123392


def test_distinct_experts_formula():
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)  # one token: exactly its top_k
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))  # 3.5
    assert expected_distinct_experts(8, 2, 10_000) == pytest.approx(8)  # many tokens: every expert
    assert expected_distinct_experts(128, 8, 4096) == pytest.approx(128)
    assert expected_distinct_experts(8, 8, 1) == 8
    assert expected_distinct_experts(8, 2, 0) == 0
    hits = [expected_distinct_experts(64, 4, b) for b in (1, 2, 8, 32, 128)]
    assert hits == sorted(hits) and all(h <= 64 for h in hits)


def test_decode_roofline_by_hand():
    cost = decode_step(TINY, batch=1, context=32)
    assert cost.weight_bytes == (58176 + 64) * 4  # + the one embedding row gathered
    assert cost.experts_hit_per_layer == pytest.approx(2)
    assert cost.expert_bytes == pytest.approx(2 * 2 * 24576 * 4)  # 2 layers x top_k experts
    assert cost.kv_read_bytes == 32 * 512 and cost.kv_write_bytes == 512
    assert cost.bytes == pytest.approx(643072)
    assert cost.matmul_flops == 2 * (123392 + 512 * 64)
    assert cost.attention_flops == 4 * 32 * 4 * 16 * 2  # 4 C H D per layer
    assert cost.flops == 328704

    big = decode_step(TINY, batch=8, context=32)
    assert big.experts_hit_per_layer == pytest.approx(4 * (1 - 0.5**8))
    assert big.kv_read_bytes == 8 * 32 * 512
    assert big.matmul_flops == 2 * 8 * (123392 + 512 * 64)


def test_prefill_roofline_by_hand():
    cost = prefill_step(TINY, tokens=4)
    assert cost.weight_bytes == (58176 + 4 * 64) * 4
    assert cost.expert_bytes == pytest.approx(2 * 3.75 * 24576 * 4)  # 4 (1 - 0.5^4) = 3.75 experts per layer
    assert cost.kv_read_bytes == 4 * 512 and cost.kv_write_bytes == 4 * 512
    assert cost.bytes == pytest.approx(975104)
    assert cost.matmul_flops == 2 * (4 * 123392 + 512 * 64)  # lm_head only for the last token
    assert cost.attention_flops == 4 * 4 * 16 * 2 * (1 + 2 + 3 + 4)  # causal
    assert cost.flops == 1057792


def test_bound_is_the_slower_of_memory_and_compute():
    assert bound_s(1e9, 1e9, copy_bytes_per_s=1e12, matmul_flops_per_s=1e15) == pytest.approx(1e-3)
    assert bound_s(1e6, 1e15, copy_bytes_per_s=1e12, matmul_flops_per_s=1e15) == pytest.approx(1.0)
    cost = decode_step(TINY, 1, 32)
    assert cost.bound_s(1e9, 1e12) == pytest.approx(cost.bytes / 1e9)


def test_shape_from_manifest_matches_the_weights(tiny_artifact):
    from safetensors import safe_open

    from moec.artifact import read_manifest

    shape = ModelShape.from_manifest(read_manifest(tiny_artifact))
    assert shape == TINY
    with safe_open(str(tiny_artifact / "weights.safetensors"), "pt") as f:
        stored = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if "rotary_emb" not in k)
    assert stored == shape.total_params


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    proc = run_cli("moec.runtime", "bench", str(tiny_artifact), "--batch-sizes", "1,2,16", "--context", "32",
                   "--decode-tokens", "8", "--prefill-tokens", "64", "--repeats", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_bench_writes_sane_json(bench_run):
    proc, data = bench_run
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["date"] and data["load_s"] > 0 and data["units"]["decode_tokens_per_s"] == "tokens/s"
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["matmul_flops_per_s"] > 0
    prefill = data["prefill"]
    assert prefill["prompt_tokens"] == 64
    assert prefill["prompt_tokens_per_s"] > 0 and prefill["time_to_first_token_s"] > 0
    assert prefill["roofline"]["bytes"] > 0 and prefill["bound_tokens_per_s"] > 0
    assert [row["batch"] for row in data["decode"]] == [1, 2]
    for row in data["decode"]:
        assert row["context"] == 32 and row["decode_tokens"] == 8
        assert row["decode_tokens_per_s"] > 0 and row["step_ms"] > 0
        assert row["bound_s"] > 0 and row["bound_tokens_per_s"] > 0
        assert row["achieved_percent_of_bound"] > 0
        assert row["roofline"]["bytes"] > 0 and row["roofline"]["flops"] > 0
        assert row["energy_j_per_token"] is None and row["mean_power_w"] is None  # no GPU
    assert data["decode"][1]["roofline"]["flops"] > data["decode"][0]["roofline"]["flops"]
    assert data["peak_memory"]["bytes"] > 0
    assert data["gpu_telemetry"]["available"] is False
    assert "tokens/s" in proc.stdout and "decode" in proc.stdout


def test_bench_skips_batches_above_max_batch(bench_run):
    proc, data = bench_run
    assert data["skipped"] == [{"batch": 16, "reason": "batch size 16 skipped: above the compiled max_batch 8"}]
    assert "batch size 16 skipped" in proc.stdout


@pytest.mark.parametrize("flag, value, needle", [
    ("--batch-sizes", "1,x", "'x'"),
    ("--decode-tokens", "1", "--decode-tokens"),
    ("--context", "-3", "--context"),
])
def test_bench_bad_flag_is_one_line_error(tmp_path, capsys, flag, value, needle):
    """Flags are checked before anything loads (the artifact need not exist). In-process: a
    subprocess would spend seconds importing torch."""
    from moec.runtime.cli import main

    argv = ["bench", str(tmp_path / "no-such-artifact"), flag, value]
    code = main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(argv, code, out, err), flag, needle)


# --- GPU telemetry ----------------------------------------------------------------------------


def test_telemetry_without_pynvml_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    gpu = GpuTelemetry(0)
    assert not gpu.available and "nvidia-ml-py" in gpu.reason
    assert gpu.sample() is None and gpu.energy_j() is None
    with gpu.measure() as run:
        pass
    assert run.energy_j is None and run.mean_power_w is None and run.mean_utilization_percent is None
    gpu.close()


def test_telemetry_when_nvml_fails_is_unavailable(monkeypatch):
    class NVMLError(Exception):
        pass

    def fail():
        raise NVMLError("Driver Not Loaded")

    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace(nvmlInit=fail, NVMLError=NVMLError))
    gpu = GpuTelemetry(0)
    assert not gpu.available and "Driver Not Loaded" in gpu.reason
    assert gpu.sample() is None


def test_telemetry_of_a_cpu_device_is_unavailable():
    gpu = GpuTelemetry.for_device(torch.device("cpu"))
    assert not gpu.available and gpu.sample() is None


def fake_pynvml(power_mw=150_000, energy_step_mj=2_000):
    energy = {"mj": 10_000}

    def total_energy(handle):
        energy["mj"] += energy_step_mj
        return energy["mj"]

    def no_power(handle):
        raise RuntimeError("Not Supported")

    return SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}", nvmlDeviceGetName=lambda h: b"Fake H100",
        nvmlDeviceGetPowerUsage=(lambda h: power_mw) if power_mw is not None else no_power,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30),
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
    )


def test_telemetry_reads_nvml_units(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    gpu = GpuTelemetry(1)
    assert gpu.available and gpu.name == "Fake H100"
    s = gpu.sample()
    assert s.power_w == 150.0 and s.utilization_percent == 87.0
    assert s.memory_used_bytes == 3 << 30 and s.memory_total_bytes == 80 << 30
    with gpu.measure(interval_s=0.01) as run:
        time.sleep(0.05)
    # too short for the coarse energy counter: mean power x time
    assert run.energy_source == "mean power x time" and run.energy_j == pytest.approx(150.0 * run.duration_s)
    assert run.mean_power_w == 150.0 and run.mean_utilization_percent == 87.0
    assert len(run.samples) >= 2
    monkeypatch.setattr("moec.runtime.gpu_telemetry.COUNTER_MIN_S", 0.0)
    with gpu.measure(interval_s=0.01) as run:
        pass
    assert run.energy_j == pytest.approx(2.0) and run.energy_source == "counter"  # one 2000 mJ step


def test_telemetry_reading_that_fails_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power_mw=None))
    gpu = GpuTelemetry(0)
    assert gpu.available
    s = gpu.sample()
    assert s.power_w is None and s.utilization_percent == 87.0


def test_metrics_show_gpu_gauges_only_with_a_gpu(monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    from moec.runtime.server import _gpu_telemetry
    from moec.runtime.server_metrics import ServerMetrics

    text = ServerMetrics("m").render()[0].decode()
    assert "moec:gpu_" not in text
    assert _gpu_telemetry(SimpleNamespace(device=torch.device("cpu"))) is None
    assert _gpu_telemetry(SimpleNamespace()) is None  # an engine without a device (the unit tests' fake)

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    text = ServerMetrics("m", gpu=GpuTelemetry(0)).render()[0].decode()
    gauges = {s.name: (s.value, s.labels) for family in text_string_to_metric_families(text)
              for s in family.samples if s.name.startswith("moec:gpu_")}
    assert gauges == {
        "moec:gpu_power_watts": (150.0, {"model_name": "m", "gpu": "0"}),
        "moec:gpu_utilization_percent": (87.0, {"model_name": "m", "gpu": "0"}),
        "moec:gpu_memory_used_bytes": (3 << 30, {"model_name": "m", "gpu": "0"}),
        "moec:gpu_memory_total_bytes": (80 << 30, {"model_name": "m", "gpu": "0"}),
    }


def test_engine_counts_only_whole_batch_decode_steps(tiny_artifact):
    """The decode rate bench reports comes from steps where every sequence decodes: a prompt longer
    than one step's token budget must not count, nor the step that samples a first token."""
    from moec.runtime import Engine

    engine = Engine.load(tiny_artifact)
    engine.scheduler.max_tokens_per_step = 64  # as if compiled with a smaller step budget
    long_prompt = [5 + i % 400 for i in range(100)]  # two steps of prompt
    engine.generate([long_prompt, [7, 8, 9]], max_tokens=6, ignore_eos=True)
    s = engine.stats
    # step 1: 64 tokens of the long prompt fill the budget; step 2: its other 36 and the short
    # prompt, both sample a first token; steps 3..7 decode both (tokens 2..6): 5 steps, 10 tokens
    assert s.steps == 7
    assert (s.decode_steps, s.decode_tokens) == (5, 10)
    assert 0 < s.decode_s < s.elapsed_s


def test_energy_is_measured_over_a_window_the_counter_resolves(monkeypatch):
    """A run much shorter than COUNTER_MIN_S (a 4k-token prefill: ~15 ms on an H200) is repeated,
    untimed, until the telemetry window reaches it; energy per run divides by every run in the window."""
    from contextlib import contextmanager

    from moec.runtime import bench

    monkeypatch.setattr(bench, "COUNTER_MIN_S", 0.2)
    calls = []

    class FakeEngine:
        device = torch.device("cpu")
        stats = SimpleNamespace(time_to_first_token_s=0.01, elapsed_s=0.01, decode_steps=0, decode_tokens=0,
                                decode_s=0.0)

        def generate(self, prompts, max_tokens, ignore_eos):
            calls.append(time.perf_counter())
            time.sleep(0.01)

    class FakeGpu:
        available = True

        @contextmanager
        def measure(self):
            window = SimpleNamespace(energy_j=None, mean_power_w=300.0, mean_utilization_percent=90.0,
                                     energy_source="counter")
            start = time.perf_counter()
            yield window
            window.energy_j = 100.0 * (time.perf_counter() - start)  # 100 W

    timing = bench._Runner(FakeEngine(), FakeGpu(), repeats=3).timed([[1, 2]], max_tokens=1)
    runs = len(calls) - 1  # the warm-up is outside the window
    assert runs > 3 and (calls[-1] - calls[1]) >= 0.2 - 0.011
    assert timing["energy_j"] == pytest.approx(100.0 * 0.01, rel=0.3)  # per run, not per timed run


def test_hf_step_times_times_each_decode_step_of_one_generate_call(hf_model_dir):
    """The peers' clock for long prompts (benchmarks/e2e_decode.py, used by offload.py's accelerate
    baseline): one generate call, a reading at each token pick; N new tokens give N - 1 steps."""
    import statistics

    from conftest import ROOT
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from e2e_decode import hf_step_times

    model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).eval()
    seen = []  # the rows so far, one after each decode step: what a run killed by its clock keeps
    row = hf_step_times(model, 3, 12, 5, torch.Generator().manual_seed(0), on_step=seen.append)
    assert row["batch"] == 3 and row["context"] == 12 and len(row["step_times_ms"]) == 4
    assert [len(r["step_times_ms"]) for r in seen] == [1, 2, 3, 4]
    assert [r["partial"] for r in seen] == [True, True, True, False]
    assert seen[-1]["step_times_ms"] == row["step_times_ms"] and seen[1]["step_times_ms"] == row["step_times_ms"][:2]
    assert row["prefill_s"] > 0 and all(t > 0 for t in row["step_times_ms"])
    assert row["step_ms"] == pytest.approx(statistics.median(row["step_times_ms"]))
    assert row["decode_tokens_per_s"] == pytest.approx(3 / (row["step_ms"] / 1e3))
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        hf_step_times(model, 1, 4, 1, torch.Generator().manual_seed(0))


TMA_CHECK = """
import sys
import torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from tma_grouped_gemm import assignment_rows, gather_routed_rows, route, tma_down, tma_gate_up, tma_moe_experts
from tma_grouped_gemm import TmaExperts
g = torch.Generator().manual_seed(0)
T, H, I, E, K, BM, BN = 7, 32, 48, 3, 2, 16, 16
x, w13, w2 = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
ids[:, 0] = 0  # expert 0 gets 7 rows (a block and padding), another gets few
weights = torch.rand(T, K, generator=g)
routing = route(ids, E, BM)
a = gather_routed_rows(x, routing, K, BM)
where = assignment_rows(routing, T * K)
live = int(routing[2])
padding = torch.ones(live, dtype=torch.bool)
padding[where] = False
flat, flat_w = ids.flatten(), weights.flatten()
want = torch.stack([F.silu(x[i // K] @ w13[flat[i], :I].T) * (x[i // K] @ w13[flat[i], I:].T) for i in range(T * K)])
want_down = torch.stack([flat_w[i] * (want[i] @ w2[flat[i]].T) for i in range(T * K)])
print("gather", (a[where] - x[torch.arange(T * K) // K]).abs().max().item(), a[:live][padding].abs().max().item())
for persistent in (False, True):
    for ws in (False, True):
        cfg = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, PERSISTENT=persistent, WS=ws)
        h = tma_gate_up(a, w13, routing, T * K, cfg, num_programs=3)
        out = tma_down(h, w2, routing, weights, cfg, num_programs=3)
        rows = tma_down(h, w2, routing, weights, {**cfg, "ROW_STORE": True}, num_programs=3)[where]
        print(persistent, ws, (h[where] - want).abs().max().item(), h[:live][padding].abs().max().item(),
              ((out - want_down).abs().max() / want_down.abs().max()).item(),
              ((rows * flat_w[:, None] - want_down).abs().max() / want_down.abs().max()).item())
cfg = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
layer = tma_moe_experts(x, w13, w2, weights, ids, cfg, {**cfg, "PERSISTENT": True})
want_layer = want_down.view(T, K, H).sum(1)
print("layer", ((layer - want_layer).abs().max() / want_layer.abs().max()).item())
position = torch.full((T * K,), -1, dtype=torch.int32)
gather_routed_rows(x, routing, K, BM, position)
print("position", (position.long() - where).abs().max().item())
combined = tma_moe_experts(x, w13, w2, weights, ids, cfg, {**cfg, "ROW_STORE": True})
print("combined", ((combined - want_layer).abs().max() / want_layer.abs().max()).item())
op = TmaExperts(w13, w2, cfg, {**cfg, "PERSISTENT": True})(x, weights, ids)  # the op tma_aoti compiles
print("op", (op - layer).abs().max().item())
"""


def test_tma_grouped_gemm_prototypes_under_interpreter(tmp_path):
    """benchmarks/tma_grouped_gemm.py (the TMA MoE `step_kernels.py --parts tma` times on the
    GPU) against the per-assignment reference under TRITON_INTERPRET, on moec's align: the gather
    into blocks (padding rows zero); the GEMMs one tile a program and persistent (3 programs over
    the live tiles), with and without warp specialisation: the gate/up's rows, then the down's
    weighted rows from them in assignment order, or unweighted in the gate/up's rows (ROW_STORE); the
    gather's positions; and the whole layer, each token's rows summed or combined by moec's
    combine_rows."""
    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", TMA_CHECK], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert lines[0][0] == "gather" and float(lines[0][1]) == 0.0 and float(lines[0][2]) == 0.0
    assert [(p, w) for p, w, *_ in lines[1:5]] == [("False", "False"), ("False", "True"), ("True", "False"),
                                                   ("True", "True")]
    for *_, err, pad, down_err, row_store_err in lines[1:5]:
        assert float(err) < 1e-4 and float(pad) == 0.0 and float(down_err) < 1e-5 and float(row_store_err) < 1e-5
    assert lines[5][0] == "layer" and float(lines[5][1]) < 1e-5
    assert lines[6][0] == "position" and float(lines[6][1]) == 0.0
    assert lines[7][0] == "combined" and float(lines[7][1]) < 1e-5
    assert lines[8][0] == "op" and float(lines[8][1]) == 0.0


def test_tma_prototypes_warp_specialise_for_h100_with_tma_stores(monkeypatch):
    """Each warp-specialised prototype that writes rows in block order (every gate/up, the
    ROW_STORE downs) compiles for sm_90 with the installed Triton into a producer and two 64-row
    consumer warpgroups (12 warps), within the H100's shared memory, and each consumer stores its
    half of the tile through TMA, the second at the tile's row + 64: with pointer stores, Triton
    3.6 (the GPU machine's) offsets the second consumer's rows by 64 twice (base + 64, plus a
    range from 64), the wrong rows and the illegal addresses of the 2026-12-07 H100 run."""
    import re

    from conftest import ROOT
    from test_triton_kernels import H100_SMEM, compile_for_sm90

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import step_kernels as sk
    import tma_grouped_gemm

    checked = 0
    for index in range(len(sk.TMA_CONFIGS) + len(sk.TMA_DOWN_CONFIGS)):
        op, cfg = sk.tma_prototype(index)
        if not cfg.get("WS") or (op == "down" and not cfg.get("ROW_STORE")):
            continue
        gated = op == "gate_up"
        consts = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        consts |= {"GATED": gated, "ROW_STORE": bool(cfg.get("ROW_STORE")), "PERSISTENT": bool(cfg.get("PERSISTENT")),
                   "WS": True}
        ptrs = {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "expert_ids_ptr": "*i32", "sorted_ptr": "*i32",
                "num_post_ptr": "*i32", "weights_ptr": "*i32" if gated else "*fp32"}
        compiled = compile_for_sm90(tma_grouped_gemm._tma_grouped_kernel, ptrs, consts, cfg["num_warps"],
                                    cfg["num_stages"])
        ir = compiled.asm["ttgir"]
        assert "ttg.warp_specialize" in ir and compiled.metadata.num_warps == 12, (index, compiled.metadata.num_warps)
        assert compiled.metadata.shared <= H100_SMEM, (index, compiled.metadata.shared)
        consumers = re.split(r"\n\s*partition\d\(", ir)[1:]
        assert len(consumers) == 2, index
        for half, body in enumerate(consumers):
            body = body.split("ttg.warp_return")[0]
            assert "tt.store " not in body, (index, half)
            (coords,) = re.findall(r"async_tma_copy_local_to_global %\w+\[(%\w+), %\w+\]", body)
            if half == 1:  # row + 64, once: the value is an add of 64 to the tile's first row
                (addend,) = re.findall(rf"{re.escape(coords)} = arith.addi %\w+, (%c64_i32\w*)", body)
                assert re.search(rf"{re.escape(addend)} = arith.constant .*\b64 : i32", body), (index, addend)
        checked += 1
    assert checked == 9


def test_step_kernels_tma_aoti_child_failure_is_its_entry(tmp_path):
    """`--parts tma_aoti` compiles each pair in a child process: a child that fails (here: no
    CUDA on this machine) is that pair's entry, its error named, and the part goes on."""
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_kernels as sk

    rows = sk.run_tma_aoti(None, {}, None, workdir=tmp_path)
    assert [r["pair"] for r in rows] == [list(p) for p in sk.TMA_AOTI_PAIRS]
    assert all(r["error"].startswith("child exit 1:") and "Error" in r["error"] for r in rows)


TMA_PART_DRY_RUN = """
import json, sys, types
sys.path.insert(0, "benchmarks")
import torch
import step_kernels as sk
sk.DTYPE = torch.float32
sk.capture_graph = lambda fn, dev, warmup=3: (types.SimpleNamespace(replay=fn), fn())
sk.time_interleaved = lambda calls, dev, flush=None, rounds=30: {
    k: {"median_ms": (f(), 0.1 + 0.01 * i)[1]} for i, (k, f) in enumerate(calls.items())}
sk.probe_tma = lambda shapes, counts, only=None: {3: "child exit -4 on its own: an illegal instruction"}
sk.GEMM_CONFIGS = [dict(c, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) for c in sk.GEMM_CONFIGS[:2]]
small = {**sk._TMA, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
sk._TMA.update(BLOCK_M=16)
sk.TMA_CONFIGS = [{**small, "num_warps": 4, "num_stages": 2},
                  {**small, "num_warps": 4, "num_stages": 2, "PERSISTENT": True, "WS": True}]
sk.TMA_DOWN_CONFIGS = [{**small, "num_warps": 4, "num_stages": 2, "WS": True},
                       {**small, "num_warps": 4, "num_stages": 2, "PERSISTENT": True},
                       {**small, "num_warps": 4, "num_stages": 2, "ROW_STORE": True}]
rows = sk.run_tma(torch.device("cpu"), {"matmul_tflop_s": 1.0, "copy_gb_s": 1.0}, None,
                  shapes={"tiny": (32, 48, 4, 2)}, token_counts={"tiny": (9,)}, rounds=1)
print(json.dumps(rows))
"""


def test_step_kernels_tma_part_on_cpu():
    """`step_kernels.py --parts tma` end to end under the interpreter, CUDA graphs and timing
    stood in for: every GEMM entry checked right, a config whose probe died recorded as its
    error and left out, and the layer on the fastest correct pair (timed faster here: the
    prototypes' first of each) right on all three paths against fp32."""
    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", TMA_PART_DRY_RUN], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout.splitlines()[-1])
    kernels = row["kernels"]
    assert "illegal instruction" in kernels["down TMA persistent M16N16K16 w4s2"]["error"]
    timed = {k: e for k, e in kernels.items() if "error" not in e and "gb_s" not in e}
    assert sum("TMA" in k for k in timed) == 4 and sum("moec" in k for k in timed) >= 2
    assert kernels["down TMA a tile a program M16N16K16 w4s2 rows"]["ok"]  # checked unweighted, by row
    assert sum("grouped_mm" in k or "bmm" in k for k in timed) == 4
    assert all(e["ok"] for k, e in timed.items() if "rel_error" in e)
    layer = row["layer"]
    assert layer["gate_up"]["BLOCK_M"] == 16 and not layer["gate_up"].get("PERSISTENT")
    assert layer["down"]["WS"] and len(layer["paths"]) == 3
    assert all(p["ok"] and p["over_roofline"] > 0 for p in layer["paths"].values())


@pytest.mark.parametrize("only", ["1,x", "17"])
def test_step_kernels_rejects_tma_only_it_cannot_run(only):
    """`--tma-only` names prototypes by index: anything else is a one-line usage error (exit 2),
    on any machine, before anything runs."""
    from conftest import ROOT

    proc = subprocess.run([sys.executable, "benchmarks/step_kernels.py", "--parts", "tma", "--tma-only", only],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"step_kernels.py: error: --tma-only {only}: want comma-separated indexes from 0 to 16 "
        "(TMA_CONFIGS, then TMA_DOWN_CONFIGS)")
