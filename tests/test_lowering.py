"""The MoE pass: regions found by module scope, lowered to moec ops, checked before anything is written."""

from __future__ import annotations


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
                        lambda ep, step, config: original(ep, step, config, build=_broken_build))
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
