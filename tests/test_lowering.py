"""The MoE pass: regions found by module scope, lowered to moec ops, checked before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from moec.compiler.export import export_step
from moec.compiler.load import load_model
from moec.compiler.passes import find_moe_regions, lower_moe
from moec.compiler.passes.moe_lowering import replacement_graph
from moec.compiler.pipeline import compile_recipe
from moec.compiler.recipe import parse_recipe
from moec.compiler.step import PagedStep
from moec.errors import LoweringError

from conftest import run_cli, tiny_recipe_dict


@pytest.fixture(scope="module")
def exported(hf_model_dir):
    model = load_model(hf_model_dir, torch.float32)
    step = PagedStep(model)
    ep = export_step(step, torch.float32, 16, 64, 4, 128)
    return ep, step, model.config


def _targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_regions_found_by_module_scope(exported):
    ep, _, config = exported
    regions = find_moe_regions(ep, config)
    assert [r.path for r in regions] == [f"model.layers.{i}.mlp" for i in range(config.num_hidden_layers)]
    r = regions[0]
    assert (r.num_experts, r.top_k, r.hidden_size, r.intermediate_size) == (4, 2, 64, 128)
    assert r.renormalize and r.activation == "silu"


def test_lowering_replaces_every_region(exported):
    ep, step, config = exported
    lowered, described = lower_moe(ep, step, config)
    targets = _targets(lowered)
    assert targets.count("moec.moe_router.default") == config.num_hidden_layers
    assert targets.count("moec.fused_moe.default") == config.num_hidden_layers
    assert not [t for t in targets if t.startswith("transformers.")]
    assert any(t.startswith("transformers.") for t in _targets(ep)), "the pass must not edit its input"
    assert [d["layer"] for d in described] == list(range(config.num_hidden_layers))


def _broken_build(region, out_shape):
    """A plausible bug: the renormalisation flag inverted."""
    g = replacement_graph(region, out_shape)
    for node in g.nodes:
        if node.target == torch.ops.moec.moe_router.default:
            node.args = (*node.args[:3], not node.args[3])
    return g


def _swapped_build(region, out_shape):
    """Another: the routing weights of the two chosen experts swapped."""
    g = replacement_graph(region, out_shape)
    for node in g.nodes:
        if node.target == torch.ops.moec.fused_moe.default:
            with g.inserting_before(node):
                flipped = g.call_function(torch.ops.aten.flip.default, (node.args[3], [1]))
            node.args = (*node.args[:3], flipped, *node.args[4:])
    return g


@pytest.mark.parametrize("build", [_broken_build, _swapped_build])
def test_check_catches_a_broken_lowering(exported, build):
    ep, step, config = exported
    with pytest.raises(LoweringError, match="differs from the block it replaces"):
        lower_moe(ep, step, config, build=build)


def test_broken_lowering_writes_no_artifact(hf_model_dir, tmp_path, monkeypatch):
    import moec.compiler.passes.moe_lowering as lm

    original = lm.lower_moe
    monkeypatch.setattr("moec.compiler.pipeline.lower_moe",
                        lambda ep, step, config, **kw: original(ep, step, config, build=_broken_build, **kw))
    out = tmp_path / "out" / "broken"
    with pytest.raises(LoweringError):
        compile_recipe(parse_recipe(tiny_recipe_dict(hf_model_dir)), out)
    assert not out.exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_explain_lists_regions(tmp_path, hf_model_dir):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(hf_model_dir, output_dir=str(tmp_path / "a"))))
    proc = run_cli("moec.compiler", str(path), "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "2 MoE regions" in proc.stderr
    assert "model.layers.1.mlp" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_qwen3_moe_lowers_and_matches(tmp_path):
    """A second architecture through the same pass: only a MoeBlockSpec row differs."""
    from transformers import AutoModelForCausalLM

    from moec.compiler.export import example_inputs
    from moec.compiler.synthetic import write_synthetic_model

    config = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 6,
              "num_experts_per_tok": 2, "norm_topk_prob": True, "vocab_size": 512,
              "max_position_embeddings": 256, "initializer_range": 0.1}
    model_dir = write_synthetic_model("Qwen3MoeForCausalLM", config, 1, tmp_path / "qwen3")
    model = load_model(model_dir, torch.float32)
    step = PagedStep(model)
    ep = export_step(step, torch.float32, 16, 64, 4, 128)
    lowered, described = lower_moe(ep, step, model.config)
    assert [(d["num_experts"], d["top_k"], d["intermediate_size"]) for d in described] == [(6, 2, 48)] * 2

    args = example_inputs(model.config, torch.float32, 16)
    ids, positions = args[0], args[1]
    # sequence 1 starts at position 4 in the example: give HF the same two sequences from scratch
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    kv = torch.zeros_like(args[4])
    table = torch.tensor([[1, 2, 0]])
    seq = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        got = lowered.module()(ids[:3], positions[:3], seq, table, kv, torch.arange(3))
        want = hf(ids[:3].unsqueeze(0)).logits[0]
    assert (got - want).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Compile-time tuning: the choice, the manifest table, the graph's plan constants
# ---------------------------------------------------------------------------------------------


def _region(path, experts=8, top_k=2, hidden=4096, inter=14336):
    return {"layer": int(path.split(".")[2]), "path": path, "num_experts": experts, "top_k": top_k,
            "hidden_size": hidden, "intermediate_size": inter, "renormalize": True, "activation": "silu"}


class FakeTimes:
    """An injected measure: times from a formula per (shape, candidate, tokens), every call counted."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, shape, tokens, candidate):
        from moec.compiler.passes.moe_tuning import Measurement

        self.calls.append((shape.num_experts, tokens, candidate.name))
        ms = self.times(shape, tokens, candidate.name)
        return Measurement(error="OutOfResources: shared memory") if ms is None else Measurement(ms=ms)


def test_tuner_keeps_the_fastest_and_records_the_table(tiny_artifact):
    from moec.artifact import Manifest
    from moec.artifact.summary import render_summary
    from moec.compiler.passes.moe_tuning import Candidate, token_buckets, tune_moe

    def cfg(bm):
        return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}

    candidates = [Candidate("triton small", "triton", cfg(16)), Candidate("triton big", "triton", cfg(128)),
                  Candidate("triton broken", "triton", cfg(32)), Candidate("grouped_mm", "grouped_mm")]

    def times(shape, tokens, name):
        if name == "triton broken":
            return None  # fails to compile: never chosen, never run again for this shape
        if name == "triton big" and shape.num_experts == 128 and tokens == 64:
            return None  # wrong at one token count: not trusted at any
        if shape.num_experts == 128:  # the Qwen3-like shape: grouped_mm wins everywhere
            return {"grouped_mm": 1.0}.get(name, 2.0)
        small, big = 1.0 + tokens / 8, 2.0 + tokens / 64  # equal at 9.14 tokens
        if tokens == 16:
            small = big * 1.02  # within RANGE_TOLERANCE of the best: the range holds on
        return {"triton small": small, "triton big": big, "grouped_mm": 3.0 + tokens / 8}[name]

    regions = [_region("model.layers.0.mlp"), _region("model.layers.1.mlp"),
               _region("model.layers.2.mlp", experts=128, top_k=8, hidden=2048, inter=768)]
    measure = FakeTimes(times)
    tuning = tune_moe(regions, None, torch.bfloat16, "cuda", 100, measure=measure, candidates=candidates)
    assert token_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100] and token_buckets(64)[-1] == 64

    mixtral, qwen = tuning.table["shapes"].values()
    assert list(tuning.table["shapes"]) == ["E8 top-2 H4096 I14336 silu bfloat16",
                                            "E128 top-8 H2048 I768 silu bfloat16"]
    assert mixtral["layers"] == ["model.layers.0.mlp", "model.layers.1.mlp"] and mixtral["path"] == "triton"
    assert mixtral["ranges"] == [{"max_tokens": 16, "config": "M16N64K64G1w4s3"},
                                 {"max_tokens": None, "config": "M128N64K64G1w4s3"}]
    rows = mixtral["buckets"]
    assert list(rows) == ["1", "2", "4", "8", "16", "32", "64", "100"]
    assert rows["1"]["runs"] == rows["1"]["fastest"] == "triton small" and rows["1"]["ms"] == round(1 + 1 / 8, 4)
    assert rows["16"]["runs"] == "triton small" and rows["16"]["fastest"] == "triton big"  # held: within 3%
    assert rows["32"]["runs"] == rows["32"]["fastest"] == "triton big"
    assert rows["8"]["candidates"]["triton broken"].startswith("error: failed at 1 tokens: OutOfResources")
    assert set(rows["8"]["candidates"]) == {c.name for c in candidates}
    assert qwen["path"] == "grouped_mm" and qwen["ranges"] == []
    assert all(row["runs"] == "grouped_mm" for row in qwen["buckets"].values())
    assert all(row["candidates"]["triton big"] == "error: failed at 64 tokens: OutOfResources: shared memory"
               for row in qwen["buckets"].values())
    assert isinstance(qwen["buckets"]["64"]["candidates"]["triton small"], float)
    assert sum(1 for e, _, name in measure.calls if name == "triton broken") == 2  # once per shape

    from moec.ops.triton.configs import parse_plan

    plans = {path: parse_plan(text) for path, text in tuning.plans.items()}
    assert plans["model.layers.0.mlp"] == plans["model.layers.1.mlp"] == {
        "path": "triton", "ranges": [(16, cfg(16)), (None, cfg(128))]}
    assert plans["model.layers.2.mlp"] == {"path": "grouped_mm"}

    # in the manifest, and in `moe-runtime inspect`
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    manifest["kernels"] = {"moe": tuning.table}
    text = render_summary(Manifest.model_validate(manifest))
    assert "MoE: tuned on cuda at compile time; injected" in text
    assert "E8 top-2 H4096 I14336 silu bfloat16  (model.layers.0.mlp, model.layers.1.mlp): " \
           "triton, T≤16 M16N64K64G1w4s3, T>16 M128N64K64G1w4s3" in text
    line_16 = next(line for line in text.splitlines() if line.strip().startswith("16  triton small"))
    assert "triton big" in line_16  # the faster one, shown where it is not what runs
    assert "E128 top-8 H2048 I768 silu bfloat16  (model.layers.2.mlp): grouped_mm" in text


class FakeDrift(FakeTimes):
    """Times in blocks drift: `times` is the first timing, `side_by_side` what the same candidates
    measure round by round (`retime`)."""

    def __init__(self, times, side_by_side):
        super().__init__(times)
        self.side_by_side, self.retimed = side_by_side, []

    def retime(self, shape, tokens, candidates):
        self.retimed.append((tokens, [c.name for c in candidates]))
        return {c.name: self.side_by_side(tokens, c.name) for c in candidates}


def test_tuner_retimes_the_finalists_side_by_side_and_keeps_that_choice(tiny_artifact):
    """Timed in blocks, 'triton a' looks 5% faster than grouped_mm at 4096 tokens; timed round by
    round, grouped_mm is 4% faster: the plan follows the round-by-round times, the table shows both,
    and a candidate 30% behind (or one that failed) is never re-timed."""
    from moec.artifact import Manifest
    from moec.artifact.summary import render_summary
    from moec.compiler.passes.moe_tuning import FINALISTS, Candidate, finalists, tune_moe
    from moec.ops.triton.configs import parse_plan

    def cfg(bm):
        return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}

    candidates = [Candidate("triton a", "triton", cfg(16)), Candidate("triton slow", "triton", cfg(64)),
                  Candidate("triton broken", "triton", cfg(32)), Candidate("grouped_mm", "grouped_mm")]

    def blocks(shape, tokens, name):
        return {"triton a": 1.0, "triton slow": 1.3, "triton broken": None, "grouped_mm": 1.05}[name]

    def side_by_side(tokens, name):
        return {"triton a": 1.0, "grouped_mm": 0.96 if tokens >= 2048 else 1.1}[name]

    measure = FakeDrift(blocks, side_by_side)
    tuning = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 4096, measure=measure,
                      candidates=candidates)
    assert {tuple(names) for _, names in measure.retimed} == {("triton a", "grouped_mm")}
    assert len(measure.retimed) == 13  # every bucket, 1 .. 4096
    (entry,) = tuning.table["shapes"].values()
    row = entry["buckets"]["4096"]
    assert row["runs"] == row["fastest"] == "grouped_mm" and row["ms"] == 0.96
    assert row["first_timing"] == {"triton a": 1.0, "grouped_mm": 1.05}
    assert row["candidates"]["triton slow"] == 1.3 and "first_timing" in entry["buckets"]["1"]
    assert tuning.switches == {"model.layers.0.mlp": 1024}  # grouped_mm above 1024: 2048 and 4096
    assert parse_plan(tuning.plans["model.layers.0.mlp"]) == {"path": "triton", "ranges": [(None, cfg(16))]}
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    manifest["kernels"] = {"moe": tuning.table}
    assert "T>1024 grouped_mm" in render_summary(Manifest.model_validate(manifest))

    # the fastest of each path first, then the rest by time; never more than FINALISTS
    paths = {f"t{i}": "triton" for i in range(6)} | {"grouped_mm": "grouped_mm"}
    times = {f"t{i}": 1.0 + i / 100 for i in range(6)} | {"grouped_mm": 1.1}
    assert finalists(times, paths) == ["t0", "grouped_mm", "t1", "t2"][:FINALISTS]
    assert finalists({"t0": 1.0, "grouped_mm": 1.2}, paths) == ["t0"]  # 20% behind: not a finalist
    assert finalists({}, paths) == []


def test_tuner_switches_to_grouped_mm_where_it_wins_and_inspect_says_so(tiny_artifact):
    """Triton faster up to 64 tokens, grouped_mm 20% faster from 128 on (as the H200 measured on the
    Mixtral shape at 1024+): the plan runs Triton up to 64 and grouped_mm above, the table and
    `moe-runtime inspect` say where; a 1% edge at the top bucket alone does not earn a branch."""
    from moec.artifact import Manifest
    from moec.artifact.summary import render_summary
    from moec.compiler.passes.moe_tuning import Candidate, tune_moe
    from moec.ops.triton.configs import parse_plan

    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    candidates = [Candidate("triton", "triton", cfg), Candidate("grouped_mm", "grouped_mm")]

    def wins_from_128(shape, tokens, name):
        triton = 1.0 + tokens / 64
        return triton if name == "triton" else (triton * 1.3 if tokens <= 64 else triton * 0.8)

    tuning = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 1024,
                      measure=FakeTimes(wins_from_128), candidates=candidates)
    (entry,) = tuning.table["shapes"].values()
    assert tuning.switches == {"model.layers.0.mlp": 64} and entry["grouped_mm_above"] == 64
    assert parse_plan(tuning.plans["model.layers.0.mlp"]) == {"path": "triton", "ranges": [(None, cfg)]}
    assert [row["runs"] for row in entry["buckets"].values()] == ["triton"] * 7 + ["grouped_mm"] * 4
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    manifest["kernels"] = {"moe": tuning.table}
    assert "triton, T≤64 M16N64K64G1w4s3, T>64 grouped_mm (a branch in the graph)" in render_summary(
        Manifest.model_validate(manifest))

    no_branch = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 1024,
                         measure=FakeTimes(wins_from_128), candidates=candidates, allow_switch=False)
    assert no_branch.switches == {}  # offload and expert parallelism: one plan per call
    # the fallback where AOTInductor cannot lower the branch: that same one-path choice
    assert no_branch.one_path is None and tuning.one_path.switches == {} and tuning.one_path.one_path is None
    assert tuning.one_path.plans == no_branch.plans and tuning.one_path.table == no_branch.table
    # the Triton-only fallback is that same plan here, so it is not tried twice
    assert tuning.triton_only.plans == tuning.one_path.plans
    assert [key for key, _ in tuning.fallbacks()] == ["switch_failed"]

    def barely(shape, tokens, name):
        return 1.0 if name == "triton" or tokens < 1024 else 0.99  # 1% at one bucket: no branch for it
    tuning = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 1024,
                      measure=FakeTimes(barely), candidates=candidates)
    assert tuning.switches == {} and "grouped_mm_above" not in next(iter(tuning.table["shapes"].values()))

    def prefill_only(shape, tokens, name):  # the H200's Mixtral layer: 16% at the top bucket alone
        return 1.0 if name == "triton" else (0.84 if tokens == 1024 else 1.5)
    tuning = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 1024,
                      measure=FakeTimes(prefill_only), candidates=candidates)
    assert tuning.switches == {"model.layers.0.mlp": 512}  # not lost in the mean over 11 buckets


def test_a_switched_block_branches_on_tokens_through_aotinductor(exported, tmp_path):
    """apply_moe_plans with a switch: each block's call becomes a cond on T between its plan and
    grouped_mm; the program computes what it did below and above the switch (the CPU reference
    runs both branches), and AOTInductor keeps the branch as an `if` on T in its wrapper."""
    import zipfile

    from moec.compiler.export import example_inputs
    from moec.compiler.passes.moe_tuning import apply_moe_plans
    from moec.runtime.kv_cache import build_step_inputs

    ep, step, config = exported
    lowered, _ = lower_moe(ep, step, config)
    paths = ["model.layers.0.mlp", "model.layers.1.mlp"]
    switched = apply_moe_plans(lowered, step, dict.fromkeys(paths, ""), dict.fromkeys(paths, 5))
    targets = _targets(switched)
    assert targets.count("cond") == 2 and "moec.fused_moe.default" not in targets
    package = torch._inductor.aoti_compile_and_package(switched, package_path=str(tmp_path / "switched.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    kv = torch.zeros_like(example_inputs(config, torch.float32, 16)[4])
    for tokens in (3, 12):  # below and above the switch
        ids = torch.randint(0, config.vocab_size, (tokens,)).tolist()
        step_inputs = build_step_inputs([([1], ids, 0, True)], block_size=16)
        args = [step_inputs[k] for k in ("input_ids", "positions", "seq_ids", "block_tables")]
        with torch.no_grad():
            want = lowered.module()(*args, kv.clone(), step_inputs["logits_indices"])
            got = compiled(*args, kv.clone(), step_inputs["logits_indices"])
        torch.testing.assert_close(got, want)
    with zipfile.ZipFile(package) as archive:
        wrapper = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp"))
    assert wrapper.count("> 5L)") >= 2


def test_tuner_refines_the_down_gemm_of_each_buckets_fastest_config():
    """After a bucket's candidates, its fastest Triton config is timed again with each refined down
    setting; one that wins runs there (and its range holds on while within tolerance), the table
    lists it beside the candidates, and a refined config that fails is not timed again."""
    from moec.compiler.passes.moe_tuning import Candidate, tune_moe
    from moec.ops.triton.configs import config_name, down_variants, parse_plan

    small = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    candidates = [Candidate("triton small", "triton", small), Candidate("triton big", "triton", big),
                  Candidate("grouped_mm", "grouped_mm")]
    k256 = next(c for c in down_variants(small) if c["down"]["BLOCK_K"] == 256 and c["down"]["BLOCK_N"] == 64)
    k256_name = f"triton {config_name(k256)}"
    assert k256_name == "triton M16N64K128G1w4s4|dK256"

    def times(shape, tokens, name):
        base = {"triton small": 1.0 + tokens / 8, "triton big": 2.0 + tokens / 64, "grouped_mm": 9.0}
        if name in base:
            return base[name]
        if name.startswith("triton M128"):
            return None  # every refinement of the big tile fails: not timed again
        return 1.0 + tokens / 8 - (0.1 if name == k256_name else -0.1)

    measure = FakeTimes(times)
    tuning = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 64, measure=measure,
                      candidates=candidates, refine=down_variants)
    (entry,) = tuning.table["shapes"].values()
    rows = entry["buckets"]
    assert [rows[b]["runs"] for b in ("1", "2", "4", "8")] == [k256_name] * 4
    assert rows["16"]["runs"] == rows["32"]["runs"] == "triton big"
    assert k256_name in rows["1"]["candidates"] and len(rows["1"]["candidates"]) == 3 + len(down_variants(small))
    assert parse_plan(tuning.plans["model.layers.0.mlp"]) == {"path": "triton", "ranges": [(8, k256), (None, big)]}
    big_refined = [n for n in {n for _, _, n in measure.calls} if n.startswith("triton M128N128K64G8w8s4|")]
    assert big_refined and all(sum(1 for _, _, n in measure.calls if n == name) == 1 for name in big_refined)
    assert all(sum(1 for _, t, n in measure.calls if n == k256_name and t == b) == 1 for b in (1, 2, 4, 8))


def test_tuner_refuses_a_shape_nothing_runs():
    from moec.compiler.passes.moe_tuning import Candidate, tune_moe

    candidates = [Candidate("grouped_mm", "grouped_mm")]
    with pytest.raises(LoweringError,
                       match=r"MoE block model\.layers\.0\.mlp .*no MoE kernel ran correctly at 1 tokens"):
        tune_moe([_region("model.layers.0.mlp")], None, torch.float32, "cuda", 4,
                 measure=FakeTimes(lambda *a: None), candidates=candidates)


def test_plans_reach_the_fused_moe_calls(exported):
    """apply_moe_plans puts each block's plan on its fused_moe call; the CPU reference ignores
    it, so the program computes what it did."""
    from moec.compiler.passes.moe_tuning import apply_moe_plans
    from moec.compiler.export import example_inputs
    from moec.ops.triton.configs import DYNAMIC_CONFIG, encode_plan

    ep, step, config = exported
    lowered, _ = lower_moe(ep, step, config)
    plans = {"model.layers.0.mlp": encode_plan({"path": "grouped_mm"}),
             "model.layers.1.mlp": encode_plan({"path": "triton", "ranges": [(None, DYNAMIC_CONFIG)]})}
    planned = apply_moe_plans(lowered, step, plans)
    calls = [n for n in planned.graph.nodes if n.target == torch.ops.moec.fused_moe.default]
    assert [n.args[6:] for n in calls] == [(plans["model.layers.0.mlp"],), (plans["model.layers.1.mlp"],)]
    assert all(len(n.args) == 6 for n in lowered.graph.nodes if n.target == torch.ops.moec.fused_moe.default)
    args = example_inputs(config, torch.float32, 16)
    kv = torch.zeros_like(args[4])
    with torch.no_grad():
        want = lowered.module()(*args[:4], kv.clone(), *args[5:])
        got = planned.module()(*args[:4], kv.clone(), *args[5:])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert apply_moe_plans(lowered, step, dict.fromkeys(plans, "")) is lowered
    with pytest.raises(LoweringError, match=r"model\.layers\.5\.mlp, which is not an MoE block"):
        apply_moe_plans(lowered, step, {"model.layers.0.mlp": plans["model.layers.0.mlp"],
                                        "model.layers.5.mlp": plans["model.layers.0.mlp"]})
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj found no fused_moe"):
        apply_moe_plans(ep, step, {"model.layers.0.mlp": plans["model.layers.0.mlp"]})  # not lowered


def test_cpu_artifact_records_the_reference_path(tiny_artifact):
    """Nothing is timed on CPU, and the manifest and `moe-runtime inspect` say so."""
    moe = json.loads((tiny_artifact / "manifest.json").read_text())["kernels"]["moe"]
    assert moe["device"] == "cpu" and moe["path"] == "reference" and "nothing was timed" in moe["note"]
    assert moe["shapes"] == {"E4 top-2 H64 I128 silu float32": {
        "layers": ["model.layers.0.mlp", "model.layers.1.mlp"], "path": "reference"}}
    assert "ms" not in json.dumps(moe) and "timer" not in moe
    proc = run_cli("moec.runtime", "inspect", str(tiny_artifact))
    assert proc.returncode == 0, proc.stderr
    assert "MoE: PyTorch reference on cpu (nothing to tune, nothing timed)" in proc.stdout
    assert "E4 top-2 H64 I128 silu float32: reference  (model.layers.0.mlp, model.layers.1.mlp)" in proc.stdout


def test_aoti_wrapper_declares_each_int_array_where_it_is_used():
    """The workaround for AOTInductor's int-array name cache (moec.compiler.lower): the cache is
    keyed by the id of the writeline callable, so one callable writing into another buffer (or a
    recycled id) gets back a name declared elsewhere. With the workaround on, every request writes
    its own declaration where it was asked to."""
    from itertools import count

    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch.utils._ordered_set import OrderedSet

    from moec.compiler.lower import int_arrays_declared_at_each_use

    wrapper = CppWrapperCpu.__new__(CppWrapperCpu)
    wrapper.int_array_id, wrapper.declared_int_array_vars, wrapper.codegen_int_array_var_cache = count(), OrderedSet(), {}
    buffers: list[list[str]] = []

    def writeline(line: str) -> None:  # one callable, the buffer behind it changes
        buffers[-1].append(line)

    def request() -> str:
        buffers.append([])
        return wrapper.codegen_int_array_var("{4L, 1L}", writeline, known_statically=True)

    with int_arrays_declared_at_each_use():
        first, second = request(), request()
    assert first != second
    assert buffers == [[f"static constexpr int64_t {first}[] = {{4L, 1L}};"],
                       [f"static constexpr int64_t {second}[] = {{4L, 1L}};"]]
    assert CppWrapperCpu.codegen_int_array_var.__name__ == "codegen_int_array_var"  # restored
    if request() == first:  # torch's own cache, where it still has the bug: no declaration written
        assert buffers[-1] == []


def test_grouped_mm_compiles_through_the_dispatcher_where_the_c_shim_lacks_it(tmp_path, monkeypatch):
    """torch 2.11's CUDA C shim has no `_grouped_mm`, yet its AOTInductor calls one; the workaround
    (moec.compiler.lower) lowers the op to a proxy-executor call instead. Forced on here, where the
    shim has it: the wrapper calls the dispatcher, not the shim, the package gives eager's numbers,
    and Inductor's own lowering is back afterwards."""
    import zipfile

    from torch._inductor.lowering import lowerings

    from moec.compiler import lower
    from moec.runtime.compiled_step import load_package

    op = torch.ops.aten._grouped_mm.default
    own_lowering = lowerings[op]
    monkeypatch.setattr(lower, "c_shim_declares", lambda function, device="cuda": False)

    class Experts(torch.nn.Module):
        def forward(self, x, offs, w):
            return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 48, 32, generator=g).bfloat16()
    x = torch.randn(21, 32, generator=g).bfloat16()
    offs = torch.tensor([5, 9, 9, 21], dtype=torch.int32)  # expert 2 gets no row
    ep = torch.export.export(Experts(), (x, offs, w), strict=False,
                             dynamic_shapes=({0: torch.export.Dim("rows", min=2, max=4096)}, None, None))
    with lower.aoti_workarounds():
        package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "gmm.pt2"))
    assert lowerings[op] is own_lowering
    with zipfile.ZipFile(package) as z:
        wrapper = next(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert "proxy_executor_call_function" in wrapper and "__grouped_mm(" not in wrapper
    x2 = torch.randn(37, 32, generator=g).bfloat16()
    offs2 = torch.tensor([0, 30, 31, 37], dtype=torch.int32)
    model = load_package(str(package))  # the runtime's loader
    assert torch.equal(model(x2, offs2, w), Experts()(x2, offs2, w))


def test_a_branch_with_grouped_mm_compiles_with_buffer_reuse(tmp_path):
    """The tuner's kind of switch: a torch.cond on the token count whose high branch runs the
    grouped_mm path (sort, two `_grouped_mm`, gather back), lowered by AOTInductor with buffer reuse
    inside the branches, under `aoti_workarounds` as the compiler lowers. torch 2.11 failed both
    ways here (the outer graph's peak estimate asked about branch lines; the CUDA shim without
    `_grouped_mm`); 2.13, which CI runs, checks that the workarounds keep the numbers right."""
    from moec.compiler.lower import aoti_workarounds
    from moec.ops.fused_moe import fused_moe_grouped_mm
    from moec.ops.moe_combine import moe_combine_ref
    from moec.ops.moe_experts import moe_experts_ref
    from moec.runtime.compiled_step import load_package

    def reference(hidden, w13, w2, weights, ids):
        return moe_combine_ref(moe_experts_ref(hidden, w13, w2, ids, "silu"), weights)

    def grouped(hidden, w13, w2, weights, ids):
        return fused_moe_grouped_mm(hidden, w13, w2, weights, ids, "silu")

    def op(hidden, w13, w2, weights, ids):  # on CPU, the reference
        return torch.ops.moec.fused_moe(hidden, w13, w2, weights, ids, "silu", "")

    class Block(torch.nn.Module):
        def forward(self, hidden, w13, w2, weights, ids):
            return hidden + torch.cond(hidden.shape[0] > 16, grouped, op, (hidden, w13, w2, weights, ids))

    g = torch.Generator().manual_seed(0)
    E, H, I, K = 8, 64, 96, 2
    # bf16: `_grouped_mm` takes nothing else
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.1).bfloat16()

    def routed(T):
        weights, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, -1)
        return torch.randn(T, H, generator=g).bfloat16(), w13, w2, weights / weights.sum(-1, keepdim=True), ids

    tokens = torch.export.Dim("tokens", min=1, max=4096)
    ep = torch.export.export(Block(), routed(20), strict=False,
                             dynamic_shapes=({0: tokens}, None, None, {0: tokens}, {0: tokens}))
    with aoti_workarounds():
        package = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(tmp_path / "switch.pt2"), inductor_configs={"allow_buffer_reuse": True})
    model = load_package(str(package))
    for T in (1, 16, 17, 300):  # both sides of the switch
        args = routed(T)
        exact = [a.float() if a.is_floating_point() else a for a in args]
        torch.testing.assert_close(model(*args).float(), exact[0] + reference(*exact), rtol=2e-2, atol=3e-2)


def test_grouped_mm_everywhere_keeps_a_triton_only_fallback():
    """Where grouped_mm wins at every token count the plan is grouped_mm alone, with no branch to
    give up; the tuner still keeps the Triton kernels' own best plan from the same measurements,
    for a compile whose AOTInductor cannot lower the grouped_mm path."""
    from moec.compiler.passes.moe_tuning import Candidate, tune_moe
    from moec.ops.triton.configs import parse_plan

    small = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    big = dict(small, BLOCK_M=64)
    candidates = [Candidate("triton small", "triton", small), Candidate("triton big", "triton", big),
                  Candidate("grouped_mm", "grouped_mm")]

    def grouped_mm_wins(shape, tokens, name):
        triton = {"triton small": 1.0 + tokens / 16, "triton big": 2.0 + tokens / 64}[name] if name != "grouped_mm" else 0
        return triton or 0.5 + tokens / 128

    tuning = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 1024,
                      measure=FakeTimes(grouped_mm_wins), candidates=candidates)
    assert parse_plan(tuning.plans["model.layers.0.mlp"]) == {"path": "grouped_mm"}
    assert tuning.one_path is None and [key for key, _ in tuning.fallbacks()] == ["grouped_mm_failed"]
    plan = parse_plan(tuning.triton_only.plans["model.layers.0.mlp"])
    assert plan["path"] == "triton" and [cfg["BLOCK_M"] for _, cfg in plan["ranges"]] == [16, 64]
    (entry,) = tuning.triton_only.table["shapes"].values()
    assert entry["path"] == "triton" and all(row["runs"] != "grouped_mm" for row in entry["buckets"].values())

    def triton_only_works(shape, tokens, name):
        return 1.0 if name == "triton small" else 2.0
    plain = tune_moe([_region("model.layers.0.mlp")], None, torch.bfloat16, "cuda", 1024,
                     measure=FakeTimes(triton_only_works), candidates=candidates)
    assert plain.triton_only is None and plain.fallbacks() == []  # nothing of grouped_mm to give up


def compile_with_failing_lowering(hf_model_dir, tmp_path, monkeypatch, tuning, fails, name: str, **recipe):
    """Compile the tiny recipe (with `recipe`'s fields) with `tuning` in place of the tuner's,
    AOTInductor failing on every program for which `fails(program)` holds (its message:
    `fails.message`). Returns (for each lowering attempt whether it failed, what the compile
    printed, the artifact)."""
    import io

    from rich.console import Console

    from moec.artifact import open_artifact
    from moec.compiler import pipeline

    real_compile, attempts = pipeline.compile_graph, []

    def compile_graph(ep, package_path):
        attempts.append(fails(ep))
        if attempts[-1]:
            raise RuntimeError(fails.message + "\nmore lines")
        return real_compile(ep, package_path)

    monkeypatch.setattr(pipeline, "tune_moe", lambda *args, **kwargs: tuning)
    monkeypatch.setattr(pipeline, "compile_graph", compile_graph)
    out = io.StringIO()
    pipeline.compile_recipe(parse_recipe(tiny_recipe_dict(hf_model_dir, name=name, **recipe)), tmp_path / name,
                            console=Console(file=out, width=200))
    return attempts, out.getvalue(), open_artifact(tmp_path / name)


MOE_PATHS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def moe_table(path: str, switch: int | None = None) -> dict:
    """A tuner table with the tiny model's one MoE shape running `path` (grouped_mm above `switch`)."""
    entry = {"layers": MOE_PATHS, "path": path, "ranges": [] if path != "triton" else
             [{"max_tokens": None, "config": "M16N64K64G1w4s3"}], **({"grouped_mm_above": switch} if switch else {}),
             "buckets": {}}
    return {"device": "cuda", "timer": "injected", "shapes": {"E4 top-2 H64 I128 silu float32": entry}}


def test_a_grouped_mm_path_aotinductor_cannot_lower_falls_back_to_triton_only(hf_model_dir, tmp_path, monkeypatch):
    """Where AOTInductor fails on a program whose MoE blocks run the grouped_mm path, the compile
    lowers the tuner's Triton-only plan instead, says so, and records why in the manifest and
    `moe-runtime inspect`."""
    from moec.artifact.summary import render_summary
    from moec.compiler.passes.moe_tuning import MoeTuning
    from moec.ops.triton.configs import encode_plan, parse_plan

    tuning = MoeTuning(moe_table("grouped_mm"), dict.fromkeys(MOE_PATHS, encode_plan({"path": "grouped_mm"})), {},
                       None, MoeTuning(moe_table("triton"), dict.fromkeys(MOE_PATHS, "")))

    def runs_grouped_mm(ep):
        plans = [n.args[6] if len(n.args) > 6 else n.kwargs.get("plan", "")
                 for n in ep.graph.nodes if n.target is torch.ops.moec.fused_moe.default]
        assert plans, "no fused_moe call in the program"
        return any((parse_plan(p) or {}).get("path") == "grouped_mm" for p in plans)

    runs_grouped_mm.message = "CppCompileError: aoti_torch_cuda__grouped_mm was not declared"
    attempts, printed, artifact = compile_with_failing_lowering(hf_model_dir, tmp_path, monkeypatch, tuning,
                                                                runs_grouped_mm, "no-gmm")
    assert attempts == [True, False]
    assert ("AOTInductor failed on the program with the grouped_mm path (RuntimeError: CppCompileError: "
            "aoti_torch_cuda__grouped_mm was not declared); lowering again with the Triton kernels only") in printed
    moe = artifact.manifest.kernels["moe"]
    assert moe["grouped_mm_failed"].startswith("RuntimeError: CppCompileError")
    assert all(entry["path"] == "triton" for entry in moe["shapes"].values())
    assert "Triton kernels only: AOTInductor failed on the grouped_mm path" in render_summary(artifact)


def test_a_branch_aotinductor_cannot_lower_falls_back_to_one_path_per_block(hf_model_dir, tmp_path, monkeypatch):
    """Where AOTInductor fails on the program with Triton/grouped_mm branches, the compile lowers
    the tuner's one-path choice instead (from the same measurements), says so, and records why in
    the manifest and `moe-runtime inspect`: a slower prefill, never a failed compile for it."""
    from moec.artifact.summary import render_summary
    from moec.compiler.passes.moe_tuning import MoeTuning
    from moec.runtime import Engine

    tuning = MoeTuning(moe_table("triton", 5), dict.fromkeys(MOE_PATHS, ""), dict.fromkeys(MOE_PATHS, 5),
                       MoeTuning(moe_table("triton"), dict.fromkeys(MOE_PATHS, "")))

    def branched(ep):
        return any(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes)

    branched.message = "InductorError: ValueError: Start index 4 out of bounds [0, 3]"
    attempts, printed, artifact = compile_with_failing_lowering(hf_model_dir, tmp_path, monkeypatch, tuning,
                                                                branched, "fallback")
    assert attempts == [True, False]
    assert "AOTInductor failed on the program with Triton/grouped_mm branches (RuntimeError: InductorError: " \
           "ValueError: Start index 4 out of bounds [0, 3]); lowering again with one path per MoE block" in printed
    moe = artifact.manifest.kernels["moe"]
    assert moe["switch_failed"].startswith("RuntimeError: InductorError: ValueError: Start index 4")
    assert all("grouped_mm_above" not in entry for entry in moe["shapes"].values())
    assert "one path per block: AOTInductor failed on the Triton/grouped_mm branches" in render_summary(artifact)
    assert len(Engine.load(tmp_path / "fallback").generate("The mixture", max_tokens=4)[0].token_ids) == 4


def test_the_fallback_of_an_offloaded_compile_keeps_its_experts_external(hf_model_dir, tmp_path, monkeypatch):
    """Every program an offloaded compile lowers, a fallback's too, reads no expert weight: its MoE
    blocks call `external_moe` (a fallback once lowered the tuned plans on the program from before
    the experts were taken out, which would have written an artifact that is not offloaded)."""
    from moec.compiler.passes.moe_tuning import MoeTuning
    from moec.ops.triton.configs import encode_plan
    from moec.runtime import Engine

    tuning = MoeTuning(moe_table("grouped_mm"), dict.fromkeys(MOE_PATHS, encode_plan({"path": "grouped_mm"})), {},
                       None, MoeTuning(moe_table("triton"), dict.fromkeys(MOE_PATHS, "")))
    programs = []

    def first_fails(ep):
        programs.append({str(n.target) for n in ep.graph.nodes if str(n.target).startswith("moec.")})
        return len(programs) == 1

    first_fails.message = "CppCompileError: aoti_torch_cuda__grouped_mm was not declared"
    offload = {"gpu_memory": 8 << 20, "host_memory": "1GiB", "workload": {"prompt_len": 64, "gen_len": 32},
               "policy": {"resident_expert_layers": 0, "batch": 2}}
    attempts, printed, artifact = compile_with_failing_lowering(hf_model_dir, tmp_path, monkeypatch, tuning,
                                                                first_fails, "offloaded-fallback", offload=offload)
    assert attempts == [True, False] and "lowering again with the Triton kernels only" in printed
    assert all("moec.external_moe.default" in p and "moec.fused_moe.default" not in p for p in programs), programs
    engine = Engine.load(tmp_path / "offloaded-fallback")
    assert engine.expert_pager is not None
    assert len(engine.generate("The mixture", max_tokens=4)[0].token_ids) == 4
