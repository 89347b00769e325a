"""The projection-fusion pass: Q, K and V of each layer as one matmul on a concatenated weight."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from moec.compiler.export import example_inputs, export_step
from moec.compiler.load import load_model
from moec.compiler.passes import lower_moe
from moec.compiler.passes.fused_projections import _check, fuse_projections
from moec.compiler.step import PagedStep
from moec.errors import LoweringError

LINEAR = torch.ops.aten.linear.default


@pytest.fixture(scope="module")
def lowered(hf_model_dir):
    model = load_model(hf_model_dir, torch.float32)
    step = PagedStep(model)
    ep, _ = lower_moe(export_step(step, torch.float32, 16, 64, 4, 128), step, model.config)
    return ep, model.config


def _linears(ep) -> int:
    return sum(n.target is LINEAR for n in ep.graph.nodes)


def test_qkv_of_every_layer_fused_and_outputs_unchanged(lowered):
    ep, config = lowered
    before = _linears(ep)
    fused_ep, fused = fuse_projections(ep)
    layers = config.num_hidden_layers
    assert [f["fused"] for f in fused] == [f"model.layers.{i}.self_attn.q_proj__k_proj__v_proj.weight"
                                           for i in range(layers)]
    assert _linears(fused_ep) == before - 2 * layers and _linears(ep) == before  # the input is not edited
    head_dim = config.hidden_size // config.num_attention_heads
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    weights = fused_ep.state_dict
    assert weights[fused[0]["fused"]].shape == (rows, config.hidden_size)
    assert not [n for n in weights if n.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight"))]
    targets = [s.target for s in fused_ep.graph_signature.input_specs]
    assert fused[0]["fused"] in targets and "model.layers.0.self_attn.q_proj.weight" not in targets
    args = example_inputs(config, torch.float32, 16)
    with torch.no_grad():
        want = ep.module()(*(a.clone() for a in args))
        got = fused_ep.module()(*(a.clone() for a in args))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _Shared(nn.Module):
    """Three linears on one input: one with a bias, one whose weight is also read elsewhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4, bias=False)
        self.b = nn.Linear(8, 6, bias=False)
        self.biased = nn.Linear(8, 2)
        self.tied = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.biased(x), self.tied(x)], -1), self.tied.weight.sum()


def test_only_bias_free_untied_linears_fuse():
    module = _Shared()
    x = torch.randn(5, 8)
    ep = torch.export.export(module, (x,))
    fused_ep, fused = fuse_projections(ep)
    assert fused == [{"fused": "a__b.weight", "parts": ["a.weight", "b.weight"]}]
    assert sorted(fused_ep.state_dict) == sorted(["a__b.weight", "biased.weight", "biased.bias", "tied.weight"])
    for got, want in zip(fused_ep.module()(x), module(x)):
        torch.testing.assert_close(got, want)


def test_check_refuses_a_wrong_concatenation():
    parts = [torch.randn(4, 8), torch.randn(6, 8)]
    _check(parts, torch.cat(parts), "ok")
    with pytest.raises(LoweringError, match="differs from its parts"):
        _check(parts, torch.cat(parts[::-1]), "swapped")


def test_artifact_holds_the_fused_weights(tiny_artifact):
    with safe_open(str(tiny_artifact / "weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj__k_proj__v_proj.weight" in names
    assert not [n for n in names if n.endswith(".q_proj.weight")]
