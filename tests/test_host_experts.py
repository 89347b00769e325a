"""Compiling an offloaded model keeps its experts in host memory: the device holds the dense
weights and, while a block is checked or timed, that block's experts (`moec.compiler.host_experts`)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import tiny_recipe_dict
from moec.compiler.host_experts import HostExperts, is_stand_in, keep_on_host
from moec.compiler.load import check_fits_device, fits_device, load_model

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
OFFLOAD = {"gpu_memory": 8 << 20, "host_memory": "1GiB", "workload": {"prompt_len": 64, "gen_len": 32},
           "policy": {"resident_expert_layers": 0, "batch": 2}}  # a tiny model's plan: every expert layer streamed


def expert_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.{e}" for i in range(layers) for e in EXPERTS]


def test_stand_ins_hold_no_data_and_a_block_is_real_only_inside_on_device(hf_model_dir):
    model = load_model(hf_model_dir, torch.float32)
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in expert_names(2)}
    dense_before = model.lm_head.weight.detach().clone()

    host = keep_on_host(model, "cpu")
    params = dict(model.named_parameters())
    assert sorted(host.host) == sorted(before)
    for name, want in before.items():
        assert is_stand_in(params[name]) and params[name].shape == want.shape and params[name].dtype == want.dtype
        assert torch.equal(host.host[name], want)  # the real tensor, kept as loaded
    assert not any(is_stand_in(p) for n, p in params.items() if n not in before)

    model = host.move_rest(model)  # moves the dense weights, leaves the stand-ins
    assert torch.equal(model.lm_head.weight, dense_before)
    with host.on_device(["model.layers.1.mlp"]):
        params = dict(model.named_parameters())
        for name in expert_names(2):
            if name.startswith("model.layers.1."):
                assert not is_stand_in(params[name]) and torch.equal(params[name], before[name])
            else:
                assert is_stand_in(params[name])
        assert torch.equal(model.model.layers[1].mlp(torch.randn(1, 3, 64)).isfinite(), torch.ones(1, 3, 64, dtype=torch.bool))
    assert all(is_stand_in(p) for n, p in model.named_parameters() if n in before)


def test_an_offloaded_compile_needs_the_dense_weights_and_one_block_on_the_gpu(hf_model_dir):
    """The check before loading counts what the device will hold: the dense weights and the
    largest block's experts (given the free memory here; on a GPU it asks CUDA)."""
    from moec.errors import RecipeError

    model = load_model(hf_model_dir, torch.float32)
    total = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    # the whole model: whether it fits decides whether a GPU compile keeps the experts on the host
    assert fits_device(model, "cuda", free_bytes=total) and not fits_device(model, "cuda", free_bytes=total - 1)
    assert fits_device(model, "cpu", free_bytes=0)
    host = keep_on_host(model, "cpu")
    block = 4 * 3 * 64 * 128 * 4  # tiny Mixtral: 4 experts of 3 x 64 x 128, fp32
    assert host.largest_block_bytes == block
    need = total - 2 * block + block
    assert fits_device(model, "cuda", free_bytes=need - block) and not fits_device(model, "cuda", free_bytes=need - block - 1)
    check_fits_device(model, "cuda", free_bytes=need, host_experts=host)
    with pytest.raises(RecipeError) as info:
        check_fits_device(model, "cuda", free_bytes=need - 1, host_experts=host)
    assert "\n" not in str(info.value) and "dense weights and one MoE block's experts" in str(info.value)


def test_an_offloaded_compile_places_one_block_at_a_time_and_writes_the_real_experts(hf_model_dir, tmp_path,
                                                                                      monkeypatch):
    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe

    placed = []
    on_device = HostExperts.on_device

    def spy(self, paths):
        paths = list(paths)
        placed.append(paths)
        return on_device(self, paths)

    monkeypatch.setattr(HostExperts, "on_device", spy)
    out = compile_recipe(parse_recipe(tiny_recipe_dict(hf_model_dir, name="offloaded", offload=OFFLOAD)),
                         tmp_path / "artifact", console=Console(stderr=True, quiet=True))
    # each block's check, then the tuner's one block for the one MoE shape (on CPU it times nothing)
    assert placed == [["model.layers.0.mlp"], ["model.layers.1.mlp"], ["model.layers.0.mlp"]]

    written = load_file(str(out / "weights.safetensors"))
    want = load_model(hf_model_dir, torch.float32).state_dict()
    for name in expert_names(2):
        assert torch.equal(written[name], want[name])


def test_the_whole_model_path_writes_the_artifact_the_host_path_writes(hf_model_dir, tmp_path, monkeypatch):
    """On a GPU that holds the model the experts go to the device with the rest (`experts_on_host`
    False, the path of every GPU compile that fits): the same weights file and the same tokens
    as the host path, and no block placed on its own."""
    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe
    from moec.runtime import Engine

    quiet = Console(stderr=True, quiet=True)
    recipe = parse_recipe(tiny_recipe_dict(hf_model_dir, name="offloaded", offload=OFFLOAD))
    host = compile_recipe(recipe, tmp_path / "host", console=quiet)
    placed = []
    monkeypatch.setattr(HostExperts, "on_device", lambda self, paths: placed.append(paths))
    whole = compile_recipe(recipe, tmp_path / "whole", console=quiet, experts_on_host=False)
    assert placed == []
    a, b = (load_file(str(d / "weights.safetensors")) for d in (host, whole))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    want, got = (Engine.load(d).generate(["The mixture of experts"], max_tokens=8)[0].token_ids for d in (host, whole))
    assert want == got


def test_copy_off_files_lets_an_unlinked_checkpoint_free_its_disk(hf_model_dir, tmp_path):
    """`from_pretrained` leaves CPU tensors memory-mapped from the safetensors file, which keeps an
    unlinked file's disk blocks; the compiler unlinks its temporary synthetic checkpoint before it
    writes the artifact (the 16-layer Mixtral: 47 GB each on a 64 GB disk), so host experts and
    CPU weights are copied off the file first: no mapping of it is left, the values unchanged."""
    import shutil

    from moec.compiler.load import copy_off_files

    local = tmp_path / "model"
    shutil.copytree(hf_model_dir, local)
    weights = str(local / "model.safetensors")

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(weights in line for line in maps)

    reference = dict(load_model(hf_model_dir, torch.float32).named_parameters())
    model = load_model(local, torch.float32)
    host = keep_on_host(model, "cpu")
    assert mapped()  # what the copy is for: transformers maps the file
    copy_off_files(model, host.host)
    (local / "model.safetensors").unlink()
    assert not mapped()
    for name, t in [*host.host.items(), *((n, p) for n, p in model.named_parameters() if not is_stand_in(p))]:
        assert torch.equal(t, reference[name]), name
