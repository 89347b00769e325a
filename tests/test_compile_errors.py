"""Bad recipes: one line naming the field or file and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import yaml

from conftest import assert_one_line_error, run_cli, tiny_recipe_dict


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
    path = write_recipe(tmp_path, tiny_recipe_dict(hf_model_dir, parallel={"ep": 2}))
    assert_one_line_error(compile_cli(path), "parallel.ep")


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
