"""Damaged or foreign artifacts and impossible requests: one clear line, exit code 2."""

from __future__ import annotations

import json

import pytest

from moec.errors import RequestError
from moec.runtime import Engine

from conftest import assert_one_line_error, run_cli


def generate(artifact, *extra):
    return run_cli("moec.runtime", "generate", str(artifact), "--prompt", "Hello", "--max-tokens", "4", *extra)


def edit_manifest(artifact, **fields):
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


def test_missing_directory(tmp_path):
    assert_one_line_error(generate(tmp_path / "absent"), "absent")


def test_missing_file(artifact_copy):
    (artifact_copy / "model.pt2").unlink()
    assert_one_line_error(generate(artifact_copy), "model.pt2")


def test_flipped_byte_in_weights(artifact_copy):
    weights = artifact_copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_one_line_error(generate(artifact_copy), "weights.safetensors", "sha256")


def test_truncated_weights(artifact_copy):
    weights = artifact_copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_one_line_error(generate(artifact_copy), "weights.safetensors", "truncated")


def test_truncated_weights_without_verification(artifact_copy):
    weights = artifact_copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_one_line_error(generate(artifact_copy, "--no-verify"), "weights.safetensors")


def test_newer_format_version(artifact_copy):
    edit_manifest(artifact_copy, format_version=99)
    assert_one_line_error(generate(artifact_copy), "format version", "upgrade")


def test_built_by_another_torch(artifact_copy):
    edit_manifest(artifact_copy, torch_version="2.9.0")
    assert_one_line_error(generate(artifact_copy), "torch", "2.9.0")


def test_built_for_another_device(artifact_copy):
    edit_manifest(artifact_copy, device="cuda", compute_capability="9.0")
    assert_one_line_error(generate(artifact_copy), "cuda")


def test_inspect_reports_damage_too(artifact_copy):
    (artifact_copy / "tokenizer" / "tokenizer.json").write_text("{}")
    assert_one_line_error(run_cli("moec.runtime", "inspect", str(artifact_copy)), "tokenizer.json")


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine.load(tiny_artifact)


def test_prompt_longer_than_max_seq_len(engine, tiny_artifact):
    long_prompt = "word " * (engine.spec.max_seq_len + 10)
    with pytest.raises(RequestError, match="max_seq_len"):
        engine.generate(long_prompt, max_tokens=4)
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", long_prompt, "--max-tokens", "4")
    assert_one_line_error(proc, "max_seq_len")
    assert engine.allocator.num_used == 0
    assert engine.generate("still fine", max_tokens=2)[0].token_ids


def test_batch_above_max_batch(engine):
    with pytest.raises(RequestError, match="max_batch"):
        engine.generate(["hi"] * (engine.spec.max_batch + 1), max_tokens=2)
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("kwargs,needle", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_sampling_parameters(engine, kwargs, needle):
    with pytest.raises(RequestError, match=needle):
        engine.generate("hi", **{"max_tokens": 2, **kwargs})
