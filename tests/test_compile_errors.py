"""Bad recipes: one line naming the field or file and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, assert_one_line_error, run_cli, tiny_recipe_dict


def compile_cli(*args):
    return run_cli("moec.compiler", *args)


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(compile_cli(str(tmp_path / "nope.yaml")), "not found", "nope.yaml")


def test_yaml_syntax_error(tmp_path):
    path = write_recipe(tmp_path, "name: x\nmodel: [unclosed\n")
    assert_one_line_error(compile_cli(path), "YAML syntax error", "line")


def test_unknown_key(tmp_path, hf_model_dir):
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, max_batchh=4))
    assert_one_line_error(compile_cli(path), "unknown key", "max_batchh")


def test_wrong_type(tmp_path, hf_model_dir):
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, max_batch="eight"))
    assert_one_line_error(compile_cli(path), "max_batch")


def test_later_plans_only_accept_their_default(tmp_path, hf_model_dir):
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, quantization={"method": "int8"}))
    assert_one_line_error(compile_cli(path), "quantization.method")
    both = tiny_recipe_dict(hf_model_dir, parallel={"ep": 2}, offload={"gpu_memory": "1GiB"})
    assert_one_line_error(compile_cli(write_recipe(tmp_path, both)), "parallel.ep", "offload")


def test_an_offload_step_below_max_batch(tmp_path, hf_model_dir):
    offload = {"gpu_memory": "1GiB", "policy": {"prefill_step_tokens": 4}}
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, offload=offload))
    assert_one_line_error(compile_cli(path), "prefill_step_tokens 4", "max_batch 8")


def test_unknown_synthetic_architecture(tmp_path):
    data = {"name": "x", "device": "cpu", "model": {"synthetic": {"architecture": "GPT9ForMagic"}}}
    assert_one_line_error(compile_cli(write_recipe(tmp_path, data)), "GPT9ForMagic", "MixtralForCausalLM")


def test_unsupported_architecture_in_model_dir(tmp_path, hf_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(hf_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    path = write_recipe(tmp_path, tiny_recipe_dict(model_dir))
    assert_one_line_error(compile_cli(path), "LlamaForCausalLM", "not supported")


def test_model_dir_without_weights(tmp_path, hf_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(hf_model_dir, model_dir)
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    path = write_recipe(tmp_path, tiny_recipe_dict(model_dir))
    assert_one_line_error(compile_cli(path), "safetensors", str(model_dir))


def test_missing_model_dir(tmp_path):
    data = {"name": "x", "device": "cpu", "model": {"path": str(tmp_path / "absent")}}
    assert_one_line_error(compile_cli(write_recipe(tmp_path, data)), "not found", "model.path")


def test_cuda_target_without_gpu(tmp_path, hf_model_dir):
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, device="cuda"))
    assert_one_line_error(compile_cli(path), "cuda")


def test_debug_shows_traceback(tmp_path):
    proc = compile_cli(str(tmp_path / "nope.yaml"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ---------------------------------------------------------------------------------------------
# MoE blocks the kernels cannot run: rejected while compiling, naming the block
# ---------------------------------------------------------------------------------------------


def assert_compile_error(proc, *needles: str) -> str:
    """Like `assert_one_line_error`, for errors raised after a stage has started: the stage lines
    and the model loader's progress bar may come first; the error is one line, the last."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert errors == [lines[-1]], err
    for needle in needles:
        assert needle.lower() in lines[-1].lower(), (needle, lines[-1])
    return lines[-1]


def synthetic_recipe(tmp_path, **config) -> str:
    data = yaml.safe_load((ROOT / "recipes" / "tiny-mixtral.yaml").read_text())
    data["model"]["synthetic"]["config"].update(config)
    data["output_dir"] = str(tmp_path / "artifact")
    return write_recipe(tmp_path, data)


def test_unsupported_activation_names_the_block(tmp_path):
    path = synthetic_recipe(tmp_path, hidden_act="relu")
    line = assert_compile_error(compile_cli(path, "--explain"), "model.layers.0.mlp", "'relu'", "silu", "gelu_tanh")
    assert "not supported" in line


def test_hf_activation_alias_lowers_to_the_kernel_activation(tmp_path):
    """gelu_pytorch_tanh is the kernels' gelu_tanh under another name: lowered, and checked."""
    proc = compile_cli(synthetic_recipe(tmp_path, hidden_act="gelu_pytorch_tanh"), "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "gelu_tanh" in proc.stderr


def test_top_k_above_experts_names_the_block(tmp_path, hf_model_dir):
    """From a model directory (the synthetic source refuses this config itself): caught before
    export, which would otherwise fail inside torch.topk with a traceback."""
    model_dir = tmp_path / "model"
    shutil.copytree(hf_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_local_experts"] + 1
    (model_dir / "config.json").write_text(json.dumps(config))
    path = write_recipe(tmp_path, tiny_recipe_dict(model_dir, output_dir=str(tmp_path / "artifact")))
    assert_compile_error(compile_cli(path, "--explain"), "model.layers.0.mlp", "top_k 5 with 4 experts",
                         "between 1 and 4")
    assert not (tmp_path / "artifact").exists()


def test_unsupported_dtype_is_a_recipe_error(tmp_path, hf_model_dir):
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, dtype="float64"))
    assert_one_line_error(compile_cli(path), "dtype", "bfloat16", "float16", "float32")


def test_cuda_limits():
    """The limits of the CUDA kernels, by the function the pass calls for every block. (Through
    moe-compile they need a GPU: without one, `device: cuda` is refused before loading.)"""
    import torch

    from moec.compiler.passes.moe_lowering import check_supported, unsupported
    from moec.errors import LoweringError

    def why(device, experts=8, top_k=2, hidden=4096, inter=14336, act="silu", dtype=torch.bfloat16, tokens=4096):
        return unsupported(experts, top_k, hidden, inter, act, dtype, device, tokens)

    for device in ("cpu", "cuda"):
        assert why(device) is None
        assert why(device, hidden=72, inter=100) is None  # any size: the kernels mask their tails
        assert why(device, experts=128, top_k=8, hidden=2048, inter=768, tokens=32768) is None
        assert "top_k must be between 1 and 8" in why(device, top_k=9)
        assert "'quick_gelu' is not supported by the MoE kernels; supported: gelu, gelu_tanh, silu" in why(
            device, act="quick_gelu")
    assert "CUDA MoE kernels take bfloat16, float16, float32" in why("cuda", dtype=torch.float64)
    assert why("cpu", dtype=torch.float64) is None  # the reference computes in any float type
    assert "floating-point" in why("cpu", dtype=torch.int8)
    assert why("cpu", experts=2048) is None  # the reference has no limit
    assert "at most 1024 experts" in why("cuda", experts=2048)
    assert "2 x intermediate x hidden" in why("cuda", hidden=32768, inter=32768)
    assert why("cpu", hidden=32768, inter=32768) is None
    assert "set max_tokens_per_step to at most" in why("cuda", top_k=8, tokens=2**28)
    desc = {"num_experts": 2048, "top_k": 2, "hidden_size": 64, "intermediate_size": 128, "activation": "silu"}
    with pytest.raises(LoweringError, match=r"^MoE block model\.layers\.3\.mlp: 2048 experts"):
        check_supported("model.layers.3.mlp", desc, torch.bfloat16, "cuda")


def test_lowering_checks_regions_for_the_target_device(hf_model_dir):
    """The pass checks each region against the target's kernels, not the device it traced on."""
    import torch

    from moec.compiler.export import export_step
    from moec.compiler.load import load_model
    from moec.compiler.passes import lower_moe
    from moec.compiler.step import PagedStep
    from moec.errors import LoweringError

    model = load_model(hf_model_dir, torch.float32)
    step = PagedStep(model)
    ep = export_step(step, torch.float32, 16, 64, 4, 128)
    with pytest.raises(LoweringError, match=r"^MoE block model\.layers\.0\.mlp: .*max_tokens_per_step"):
        lower_moe(ep, step, model.config, device="cuda", max_tokens=2**30)


def test_a_model_larger_than_the_gpu_is_a_one_line_error():
    """The compiler holds the whole model on the target device: too large is said up front, with
    offload as the way out (the GPU's free memory is given here; the check asks CUDA for it on a
    GPU)."""
    from moec.compiler.load import check_fits_device
    from moec.errors import RecipeError

    model = torch.nn.Linear(1024, 1024)  # 4 MiB of fp32 weights
    check_fits_device(model, "cuda", free_bytes=8 << 20)
    check_fits_device(model, "cpu", free_bytes=0)  # CPU compiles are not checked
    with pytest.raises(RecipeError) as info:
        check_fits_device(model, "cuda", free_bytes=2 << 20)
    msg = str(info.value)
    assert "\n" not in msg and "take 4 MiB and the GPU has 2 MiB free" in msg
    assert "free" in msg and "add an offload block" in msg


def test_too_little_disk_for_the_artifact_is_a_one_line_error_before_tuning(tmp_path, hf_model_dir, monkeypatch):
    """The artifact's weights (an offloaded model's host experts included) must fit the disk the
    artifact is built on: checked before the tuner, named with both sizes; nothing is written."""
    from rich.console import Console

    from moec.compiler import pipeline
    from moec.compiler.load import load_model
    from moec.compiler.recipe import parse_recipe
    from moec.errors import RecipeError

    weights = sum(t.nbytes for t in load_model(hf_model_dir, torch.float32).state_dict().values())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage._replace(free=weights - 1))
    tuned = []
    monkeypatch.setattr(pipeline, "tune_moe", lambda *a, **k: tuned.append(1))
    offload = {"gpu_memory": 8 << 20, "host_memory": "1GiB", "workload": {"prompt_len": 64, "gen_len": 32},
               "policy": {"resident_expert_layers": 0, "batch": 2}}
    out = tmp_path / "new" / "artifact"
    for recipe in (tiny_recipe_dict(hf_model_dir), tiny_recipe_dict(hf_model_dir, offload=offload)):
        with pytest.raises(RecipeError) as e:
            pipeline.compile_recipe(parse_recipe(recipe), out, console=Console(stderr=True, quiet=True))
        message = str(e.value)
        assert "\n" not in message and str(out) in message and "GB free" in message and "--output" in message
    assert not tuned and not out.exists() and not list(tmp_path.glob("new/.artifact*"))
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage._replace(free=weights * 2))
    pipeline.check_free_disk(out, weights, "the artifact's weights", "choose another --output")  # enough: no error
