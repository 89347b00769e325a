"""The offload policy search (HRM): predictions checked by hand, optima on hand-made cases, memory
limits, and the recipe/CLI around it (the executor: test_offload_runtime.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, tiny_recipe_dict
from moec.compiler.hardware_profile import (
    NAMED_PROFILES,
    HardwareProfile,
    load_profile,
    measure_host_attention,
    measure_profile,
)
from moec.compiler.offload_policy import (
    GPU_RESERVE_FRACTION,
    RUNTIME_PLACEMENTS,
    STEP_TOKENS_MAX,
    OffloadPolicy,
    Workload,
    batch1_cache_experts,
    lru_hit_rate,
    memory_use,
    predict,
    search,
    step_options,
)
from moec.errors import RecipeError
from moec.runtime.roofline import ModelShape, MoeLayerShape
from test_bench import TINY

# the tiny Mixtral of recipes/tiny-mixtral.yaml (test_bench.TINY): one expert is 3*64*128 fp32 =
# 98,304 bytes, a layer's four experts 393,216 bytes
LAYER_EXPERTS = 4 * 3 * 64 * 128 * 4
# a host link that moves one layer's experts in exactly 1 ms; everything else ~free
LINK_BOUND = HardwareProfile(name="test", h2d_bytes_per_s=LAYER_EXPERTS * 1e3, d2h_bytes_per_s=LAYER_EXPERTS * 1e3,
                             duplex_bytes_per_s=2 * LAYER_EXPERTS * 1e3, gpu_bytes_per_s=1e18, gpu_flops_per_s=1e21,
                             cpu_bytes_per_s=1e18, cpu_flops_per_s=1e21, host_attention_kv_bytes_per_s=1e18,
                             host_attention_flops_per_s=1e21, source="hand-made")
MIXTRAL_8X7B = ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                          vocab_size=32000, weight_itemsize=2, kv_itemsize=2,
                          moe_layers=(MoeLayerShape(8, 2, 14336),) * 32)


def test_prediction_by_hand_when_the_link_bounds():
    """Both layers streamed, batch 1, 32 tokens after 32: each layer of each step waits 1 ms for its
    experts (prefill too, once), so 32 tokens take 2 ms + 32 x 2 ms: 32 / 0.066 = 484.8 tokens/s."""
    wl = Workload(prompt_len=32, gen_len=32)
    pred = predict(TINY, LINK_BOUND, wl, OffloadPolicy(batch=1, micro_batches=1, placement="gpu",
                                                       resident_expert_layers=0))
    assert pred.decode_step_s == pytest.approx(2e-3, rel=1e-6)
    assert pred.prefill_s == pytest.approx(2e-3, rel=1e-6)
    assert pred.tokens_per_s == pytest.approx(32 / 0.066, rel=1e-6)
    assert pred.bottleneck == "host link"
    # one layer resident: half the streaming; batch 4: the same step carries 4 tokens
    half = predict(TINY, LINK_BOUND, wl, OffloadPolicy(1, 1, "gpu", 1))
    assert half.decode_step_s == pytest.approx(1e-3, rel=1e-6)
    # prompts prefilled in steps of 8 tokens: 4 steps, each streaming both layers again
    chunked = predict(TINY, LINK_BOUND, Workload(32, 32, prefill_step_tokens=8), OffloadPolicy(1, 1, "gpu", 0))
    assert chunked.prefill_s == pytest.approx(8e-3, rel=1e-6)
    assert chunked.decode_step_s == pred.decode_step_s
    four = predict(TINY, LINK_BOUND, wl, OffloadPolicy(4, 1, "gpu", 0))
    assert four.tokens_per_s == pytest.approx(4 * pred.tokens_per_s, rel=1e-6)


def test_cpu_attention_overlaps_only_across_micro_batches():
    """With the CPU as slow as the link, one micro-batch pays GPU + CPU, two pay their max."""
    slow_cpu = replace(LINK_BOUND, host_attention_kv_bytes_per_s=1e3, gpu_flops_per_s=1e6)
    wl = Workload(32, 32)
    one = predict(TINY, slow_cpu, wl, OffloadPolicy(2, 1, "cpu", 2))
    two = predict(TINY, slow_cpu, wl, OffloadPolicy(2, 2, "cpu", 2))
    assert one.busy["cpu"] > 0 and one.busy["gpu"] > 0
    assert one.decode_step_s > two.decode_step_s


def test_cpu_attention_is_priced_at_the_measured_host_attention_rate():
    """Decode: the cache bytes attended over the profile's measured rate for moec's host attention
    (not the host's copy rate: the gathers and small matmuls reach a few percent of it). Batch 2 at
    an average context of 32 + 16 = 48 tokens reads 2 * 48 * 256 bytes of K and V per layer; over 2
    layers at 1e3 B/s. The host's raw ceilings do not enter."""
    slow_cpu = replace(LINK_BOUND, host_attention_kv_bytes_per_s=1e3, cpu_bytes_per_s=1.0, cpu_flops_per_s=1.0)
    kv_read = 2 * 48 * 2 * 2 * 16 * 4  # batch x context x (K, V) x kv heads x head dim x fp32
    fp32 = predict(TINY, slow_cpu, Workload(32, 32), OffloadPolicy(2, 2, "cpu", 2))
    assert fp32.busy["cpu"] == pytest.approx(2 * kv_read / 1e3, rel=1e-9)
    bf16 = predict(replace(TINY, kv_itemsize=2), slow_cpu, Workload(32, 32), OffloadPolicy(2, 2, "cpu", 2))
    assert bf16.busy["cpu"] == pytest.approx(2 * (kv_read / 2) / 1e3, rel=1e-9)


def test_host_attention_is_measured_by_running_it():
    """The profile's host-attention rates come from timing `cpu_attention` itself (small shapes here)."""
    kv_bytes_per_s, flops_per_s = measure_host_attention(torch.float32, context=64, sequences=4, kv_heads=2,
                                                         group=2, head_dim=16)
    assert 0 < kv_bytes_per_s < float("inf") and 0 < flops_per_s < float("inf")


def test_memory_use_by_hand():
    """Streamed layers need a double buffer of two layers' experts on the GPU, and their experts on the host."""
    wl = Workload(32, 32)
    all_in, _ = memory_use(TINY, wl, OffloadPolicy(1, 1, "gpu", 2))
    streamed_gpu, streamed_host = memory_use(TINY, wl, OffloadPolicy(1, 1, "gpu", 0))
    assert all_in == streamed_gpu  # two layers: keeping both costs what their double buffer costs
    assert streamed_host == 2 * LAYER_EXPERTS
    kv_gpu, _ = memory_use(TINY, wl, OffloadPolicy(1, 1, "gpu", 0))
    kv_host_gpu, kv_host = memory_use(TINY, wl, OffloadPolicy(1, 1, "cpu", 0))
    kv = 64 * 2 * 2 * 2 * 16 * 4  # 64 tokens x 2 layers x (K, V) x 2 heads x 16 x fp32
    assert kv_gpu - kv_host_gpu == kv and kv_host - streamed_host == kv


def test_activations_are_a_prefill_steps_tokens_however_many_micro_batches_split_it():
    """A step's micro-batches run at once, so the GPU holds the activations of the whole step's
    tokens: the batch's prompts, at most max_tokens_per_step. 8 prompts in 8 micro-batches hold
    what they hold in 1 (the model counted one micro-batch's prompts before: 1/8 of it)."""
    per_token = (2 * 64 + 2 * 3 * 128) * 4  # hidden in and out, gate/up/act rows of 2 experts, fp32
    wl = Workload(64, 32, prefill_step_tokens=4096)
    one, _ = memory_use(TINY, wl, OffloadPolicy(8, 1, "gpu", 0))
    eight, _ = memory_use(TINY, wl, OffloadPolicy(8, 8, "gpu", 0))
    single, _ = memory_use(TINY, wl, OffloadPolicy(1, 1, "gpu", 0))
    capped, _ = memory_use(TINY, Workload(64, 32, prefill_step_tokens=128), OffloadPolicy(8, 8, "gpu", 0))
    assert one == eight
    assert eight - capped == (8 * 64 - 128) * per_token
    kv_token = 2 * 2 * 2 * 16 * 4  # both layers' K and V, fp32
    assert one - single == 7 * 64 * per_token + 7 * 96 * kv_token + 7 * 512 * 4  # + their caches and logits


def test_prefill_steps_grow_while_the_link_pays_for_each_and_the_gpu_holds_them():
    """Documented optimum: every prefill step streams the experts again, so where the link bounds,
    the plan doubles the recipe's 64-token step up to the batch's 8 x 64 prompt tokens (one stream)
    when the GPU holds that step's activations, and stops at the largest step it holds. A pinned
    step is kept (one below max_batch: test_compile_errors)."""
    wl = Workload(64, 32, prefill_step_tokens=64)
    four = replace(TINY, num_layers=4, moe_layers=TINY.moe_layers * 2)
    pinned = {"batch": 8, "micro_batches": 1, "placement": "gpu", "resident_expert_layers": 0, "cache_experts": 0}
    roomy, pred = search(four, LINK_BOUND, wl, 1 << 30, 1 << 30, 8, fixed=pinned)
    assert roomy.prefill_step_tokens == 512
    assert pred.prefill_s < predict(four, LINK_BOUND, wl, replace(roomy, prefill_step_tokens=64)).prefill_s / 4
    holds_128, _ = memory_use(four, wl, replace(roomy, prefill_step_tokens=128))
    tight, _ = search(four, LINK_BOUND, wl, int(holds_128 / (1 - GPU_RESERVE_FRACTION)) + 1, 1 << 30, 8, fixed=pinned)
    assert tight.prefill_step_tokens == 128
    kept, _ = search(four, LINK_BOUND, wl, 1 << 30, 1 << 30, 8, fixed={**pinned, "prefill_step_tokens": 64})
    assert kept.prefill_step_tokens == 64
    assert step_options(Workload(64, 32, prefill_step_tokens=64), 1) == [64]  # one prompt fits one step
    assert step_options(Workload(4096, 32, prefill_step_tokens=4096), 256)[-1] == STEP_TOKENS_MAX


def test_roomy_gpu_keeps_everything_and_takes_the_largest_batch():
    """Documented optimum: when every weight and the whole batch's cache fit, nothing streams, the
    batch is max_batch (weights read once per step for more tokens) in one micro-batch (more would
    only re-read the weights)."""
    hw = replace(NAMED_PROFILES["h100-sxm"], name="roomy")
    policy, pred = search(TINY, hw, Workload(64, 32), gpu_memory=1 << 30, host_memory=1 << 30, max_batch=8)
    assert (policy.batch, policy.micro_batches, policy.placement, policy.resident_expert_layers) == (8, 1, "gpu", 2)
    assert pred.busy["h2d"] == 0 and pred.bottleneck == "GPU"


def test_tight_gpu_streams_and_respects_both_budgets():
    """Four MoE layers; GPU room for the resident weights, the double buffer (two layers' experts)
    and half a layer more: experts stream, the link bounds, and the plan fits both budgets. Steps of
    at most 64 tokens (the artifact's max_tokens_per_step): batch 8 prefills in 8 of them."""
    wl = Workload(64, 32, prefill_step_tokens=64)
    four = replace(TINY, num_layers=4, moe_layers=TINY.moe_layers * 2)
    floor, _ = memory_use(four, wl, OffloadPolicy(1, 1, "cpu", 0))
    gpu_memory = int((floor + LAYER_EXPERTS // 2) / (1 - GPU_RESERVE_FRACTION))
    policy, pred = search(four, LINK_BOUND, wl, gpu_memory=gpu_memory, host_memory=1 << 30, max_batch=8)
    assert policy.resident_expert_layers == 0
    assert pred.bottleneck == "host link"
    assert pred.gpu_bytes <= gpu_memory * (1 - GPU_RESERVE_FRACTION) and pred.host_bytes <= (1 << 30)
    assert policy.batch == 8  # streaming costs the same for any batch: the largest amortises it best


def test_a_gpu_without_room_for_the_cache_puts_attention_on_the_cpu():
    """Documented optimum: link-bound streaming (every layer, one micro-batch) costs the same for any
    batch, so the largest batch wins; a GPU budget that holds batch 8's activations but not its KV
    cache leaves placement gpu at batch 4, while placement cpu (cache on the host) runs batch 8 at
    twice the tokens/s. Among what the runtime runs, the search takes cpu."""
    wl = Workload(512, 512)
    four = replace(TINY, num_layers=4, moe_layers=TINY.moe_layers * 2)
    pinned = {"resident_expert_layers": 0, "micro_batches": 1}
    cpu_floor, _ = memory_use(four, wl, OffloadPolicy(8, 1, "cpu", 0))
    gpu_memory = int(cpu_floor / (1 - GPU_RESERVE_FRACTION)) + 1
    on_gpu, gpu_pred = search(four, LINK_BOUND, wl, gpu_memory, 1 << 30, 8, fixed=pinned, placements=("gpu",))
    chosen, pred = search(four, LINK_BOUND, wl, gpu_memory, 1 << 30, 8, fixed=pinned, placements=RUNTIME_PLACEMENTS)
    assert (on_gpu.placement, on_gpu.batch) == ("gpu", 4)
    assert (chosen.placement, chosen.batch) == ("cpu", 8)
    assert pred.tokens_per_s == pytest.approx(2 * gpu_pred.tokens_per_s, rel=0.02)
    assert pred.host_bytes > gpu_pred.host_bytes  # the cache moved to the host


def test_pinned_fields_are_kept():
    policy, _ = search(TINY, LINK_BOUND, Workload(64, 32), 1 << 30, 1 << 30, 8,
                       fixed={"batch": 4, "micro_batches": 2, "placement": "gpu-kv-host"})
    assert (policy.batch, policy.micro_batches, policy.placement) == (4, 2, "gpu-kv-host")


def test_batch_one_prediction_caches_in_the_double_buffer_without_a_cache_of_its_own():
    """What the pager does: a plan whose batch left no room for a cache (cache_experts < top-k)
    still decodes batch 1 by copying only the experts it misses, cached in the double buffer's 2E
    slots. By hand, 4 layers, 1 resident: 12 streamed experts, 8 cached. A token's 3 streamed
    layers use 6 distinct experts in expectation (each layer 4 * (1 - 1/2)), which fit in 8, two
    tokens' 9 do not: only experts used by the previous token are still there, so half the picks
    hit (lru_hit_rate) and each streamed layer misses 2 * 1/2 experts of 0.25 ms: 0.75 ms a step
    over the 3, which a 12-expert cache (all of them) saves."""
    four = replace(TINY, num_layers=4, moe_layers=(MoeLayerShape(4, 2, 128),) * 4)
    plan = OffloadPolicy(batch=8, micro_batches=1, placement="gpu", resident_expert_layers=1)
    step = {cache: 1 / predict(four, LINK_BOUND, Workload(64, 32), replace(plan, cache_experts=cache)).batch1_tokens_per_s
            for cache in (0, 1, 8, 12)}
    assert batch1_cache_experts(four, plan) == 8 == batch1_cache_experts(four, replace(plan, cache_experts=1))
    assert batch1_cache_experts(four, replace(plan, resident_expert_layers=4)) == 0  # nothing streams
    assert step[0] == step[1] == step[8]
    assert step[0] - step[12] == pytest.approx(0.75e-3, rel=1e-6)


def test_lru_hit_rate_by_hand():
    """Layers visited in a cycle: an LRU smaller than one token's streamed picks never hits."""
    assert lru_hit_rate(16, 13, 8, 2) == 0.0  # the H200 run: 26 picks a token through 16 slots
    assert lru_hit_rate(8, 3, 4, 2) == 0.5
    assert lru_hit_rate(40, 13, 8, 2) == 0.25  # one token's 26 fit, two tokens' 45.5 do not
    assert lru_hit_rate(104, 13, 8, 2) == 1.0 and lru_hit_rate(5, 0, 8, 2) == 1.0
    rates = [lru_hit_rate(c, 13, 8, 2) for c in range(0, 105, 8)]
    assert rates == sorted(rates)  # more cache never hits less


@pytest.mark.parametrize("result", ["offload-h200-2026-12-03.json", "offload-h100-2026-12-07T1041.json"])
def test_prediction_against_the_gpu_runs(result):
    """The HRM on the hardware profile and plan of a complete GPU run in benchmarks/results/
    (16-layer Mixtral shape, 24 GiB): its decode step, batch-1 rate and whole-workload rate within
    20% of what that run achieved (on the H200 run, before prefill steps and the cyclic LRU were
    modelled, the workload rate was 21% and batch 1 23% over)."""
    run = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results" / result).read_text())
    shape = replace(MIXTRAL_8X7B, num_layers=16, moe_layers=MIXTRAL_8X7B.moe_layers[:16])
    step = run["plan"]["policy"].get("prefill_step_tokens", 4096)  # the H200 run's plan predates the field
    workload = Workload(run["workload"]["prompt_len"], run["workload"]["gen_len"], prefill_step_tokens=step)
    pred = predict(shape, HardwareProfile(**run["hardware"]), workload, OffloadPolicy(**run["plan"]["policy"]))
    b1, b128 = run["moec"]["decode"]
    gen = run["workload"]["gen_len"]
    achieved = b128["batch"] * gen / (b128["time_to_first_token_s"] + (gen - 1) * b128["step_ms"] / 1e3)
    for predicted, measured in ((pred.decode_step_s, b128["step_ms"] / 1e3),
                                (pred.batch1_tokens_per_s, b1["decode_tokens_per_s"]),
                                (pred.tokens_per_s, achieved)):
        assert abs(predicted / measured - 1) <= 0.20, (predicted, measured)


def test_impossible_budget_is_one_line_naming_both_memories():
    with pytest.raises(RecipeError, match="nothing fits") as info:
        search(TINY, LINK_BOUND, Workload(64, 32), gpu_memory=1 << 16, host_memory=1 << 30, max_batch=8)
    message = str(info.value)
    assert "\n" not in message and "offload.gpu_memory" in message and "offload.host_memory" in message
    with pytest.raises(RecipeError, match="nothing fits"):  # the host cannot hold the streamed experts
        search(TINY, LINK_BOUND, Workload(64, 32), gpu_memory=1 << 20, host_memory=1 << 10, max_batch=8)


def test_mixtral_on_a_24gib_h100_streams_most_experts():
    """Mixtral-8x7B (94 GB of bf16) with 24 GiB of GPU: a few layers' experts resident at most,
    the host link the bottleneck, a large batch; batch 1 bounded by copying the experts it misses."""
    policy, pred = search(MIXTRAL_8X7B, NAMED_PROFILES["h100-sxm"], Workload(512, 128, 4096), 24 << 30, 200 << 30,
                          256)
    assert policy.resident_expert_layers < 8 and pred.bottleneck == "host link"
    assert policy.batch == 256 and pred.gpu_bytes <= (24 << 30) * (1 - GPU_RESERVE_FRACTION)
    # streaming the other layers' experts once per step over 55 GB/s bounds a step from below
    streamed = (32 - policy.resident_expert_layers) * 8 * 3 * 4096 * 14336 * 2
    assert pred.decode_step_s >= streamed / 55e9
    assert pred.batch1_tokens_per_s < pred.tokens_per_s / policy.batch * 50


def test_hardware_profiles_named_measured_and_bad(tmp_path):
    assert load_profile("h100-sxm").h2d_bytes_per_s == 55e9
    measured = measure_profile()
    assert measured.h2d_bytes_per_s > 0 and measured.cpu_flops_per_s > 0
    assert measured.host_attention_kv_bytes_per_s > 0 and measured.host_attention_flops_per_s > 0
    path = tmp_path / "p.json"
    path.write_text(json.dumps(measured.as_dict()))
    assert load_profile(str(path)) == measured
    older = {k: v for k, v in measured.as_dict().items() if not k.startswith("host_attention")}
    path.write_text(json.dumps(older))  # a profile measured before host attention was timed
    with pytest.raises(RecipeError, match="host_attention_kv_bytes_per_s.*profile-hardware"):
        load_profile(str(path))
    path.write_text(json.dumps({**measured.as_dict(), "gpu_flops_per_s": -1}))
    with pytest.raises(RecipeError, match="gpu_flops_per_s must be positive"):
        load_profile(str(path))
    with pytest.raises(RecipeError, match="profile-hardware"):
        load_profile("a100-nonexistent")


def test_explain_prints_the_plan_and_impossible_budgets_stop(hf_model_dir, tmp_path):
    recipe = tiny_recipe_dict(hf_model_dir, name="tiny-offload")
    recipe["offload"] = {"gpu_memory": "2MiB", "host_memory": "1GiB", "workload": {"prompt_len": 64, "gen_len": 32}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("moec.compiler", str(path), "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "offload" in proc.stderr and "predicted" in proc.stderr and "bound by" in proc.stderr
    recipe["offload"]["gpu_memory"] = "64KiB"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("moec.compiler", str(path), "--explain")  # after the stages it ran: the error, last
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: offload: nothing fits") and "offload.gpu_memory" in last


def test_profile_hardware_cli_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "prof.json"
    proc = run_cli("moec.compiler", "--profile-hardware", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert load_profile(str(out)).gpu_bytes_per_s > 0
