"""RoPE from a table: the same cos/sin as the model's own module, and no cos/sin left in the graph."""

from __future__ import annotations

import copy

import pytest
import torch

from moec.compiler.export import export_step
from moec.compiler.load import load_model
from moec.compiler.rotary_table import RotaryTable, static_rotary
from moec.compiler.step import PagedStep


@pytest.fixture(scope="module")
def model(hf_model_dir):
    return load_model(hf_model_dir, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_table_equals_the_models_rotary(model, dtype):
    rotary = model.model.rotary_emb
    table = RotaryTable(rotary, 1024)
    positions = torch.randint(0, 1024, (1, 37))
    positions[0, :3] = torch.tensor([0, 1023, 511])
    x = torch.randn(1, 37, 8, dtype=dtype)
    for got, want in zip(table(x, positions), rotary(x, positions)):
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want)


def test_attention_scaling_applied(model):
    rotary = copy.deepcopy(model.model.rotary_emb)
    rotary.attention_scaling = 0.75
    positions = torch.arange(64)[None]
    x = torch.randn(1, 64, 8)
    for got, want in zip(RotaryTable(rotary, 64)(x, positions), rotary(x, positions)):
        assert torch.equal(got, want)


def test_length_dependent_rope_left_alone(model):
    rotary = copy.deepcopy(model.model.rotary_emb)
    rotary.rope_type = "dynamic"
    holder = torch.nn.Module()
    holder.rotary_emb = rotary
    assert static_rotary(holder) is None
    assert static_rotary(model.model) is model.model.rotary_emb


def test_exported_step_computes_no_cos_or_sin(hf_model_dir):
    step = PagedStep(load_model(hf_model_dir, torch.float32), max_positions=128)
    assert isinstance(step.model.rotary_emb, RotaryTable)
    head_dim = step.config.hidden_size // step.config.num_attention_heads
    assert step.model.rotary_emb.cos_table.shape == (128, head_dim)
    ep = export_step(step, torch.float32, 16, 64, 4, 128)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if t.startswith(("aten.cos", "aten.sin"))}, targets
    assert "aten.index.Tensor" in targets
