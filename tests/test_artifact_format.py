"""The artifact format on a fake artifact (no compiling): round trip, atomic publishing, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moec.artifact import (
    FORMAT_VERSION,
    ArtifactWriter,
    Manifest,
    open_artifact,
    open_weights,
    read_manifest,
    render_summary,
    summary_dict,
)
from moec.artifact.manifest import environment_fields
from moec.errors import ArtifactError

WEIGHTS = {
    "embed.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4),
    "layers.0.experts.w1": torch.randn(2, 8, 4),
}


def manifest_fields(device: str = "cpu") -> dict:
    return {
        **environment_fields(device),
        "name": "fake-moe",
        "device": device,
        "dtype": "float32",
        "architecture": "MixtralForCausalLM",
        "hf_config": {"hidden_size": 4, "num_hidden_layers": 1, "num_local_experts": 2, "num_experts_per_tok": 1},
        "recipe": {"name": "fake-moe"},
        "step": {
            "graph": "model.pt2", "weights": "weights.safetensors", "max_batch": 2, "max_seq_len": 64,
            "max_tokens_per_step": 32, "kv_block_size": 16, "num_layers": 1, "num_kv_heads": 1, "head_dim": 4,
            "vocab_size": 6, "kv_dtype": "float32",
        },
        "moe_regions": [{
            "layer": 0, "path": "model.layers.0.block_sparse_moe", "num_experts": 2, "top_k": 1,
            "hidden_size": 4, "intermediate_size": 8, "renormalize": True, "activation": "silu",
        }],
    }


def write_fake(out: Path, graph: bytes = b"not really a pt2") -> Path:
    with ArtifactWriter(out) as w:
        save_file(WEIGHTS, str(w.tmp / "weights.safetensors"))
        (w.tmp / "model.pt2").write_bytes(graph)
        (w.tmp / "tokenizer").mkdir()
        (w.tmp / "tokenizer" / "tokenizer.json").write_text('{"model": {}}')
        return w.commit(manifest_fields())


@pytest.fixture
def fake(tmp_path) -> Path:
    return write_fake(tmp_path / "artifacts" / "fake")


def one_line_error(fn, *needles: str) -> str:
    with pytest.raises(ArtifactError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def edit_manifest(path: Path, **fields) -> None:
    mpath = path / "manifest.json"
    data = json.loads(mpath.read_text())
    data.update(fields)
    mpath.write_text(json.dumps(data))


def test_round_trip(fake):
    art = open_artifact(fake)
    m = art.manifest
    assert m.format_version == FORMAT_VERSION and m.device == "cpu" and m.compute_capability is None
    assert set(m.files) == {"model.pt2", "weights.safetensors", "tokenizer/tokenizer.json"}
    assert m.files["model.pt2"].size == len(b"not really a pt2")
    assert art.graph_path == fake / "model.pt2" and art.tokenizer_path == fake / "tokenizer"
    weights = open_weights(art)
    assert weights.keys() == WEIGHTS.keys()
    for k, v in WEIGHTS.items():
        assert torch.equal(weights[k], v)
    assert read_manifest(fake) == m
    assert json.loads((fake / "manifest.json").read_text())["contains_native_code"] is True


def test_summary(fake):
    m = read_manifest(fake)
    text = render_summary(open_artifact(fake))
    assert "MixtralForCausalLM" in text and "native code" in text and "layer   0" in text and "4×8" in text
    data = json.loads(json.dumps(summary_dict(m)))
    assert data["total_bytes"] == sum(f.size for f in m.files.values()) > 0
    assert Manifest.model_validate({k: v for k, v in data.items() if k != "total_bytes"}) == m


def test_failure_inside_with_leaves_nothing(tmp_path):
    parent = tmp_path / "artifacts"
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(parent / "fake") as w:
            (w.tmp / "model.pt2").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(parent.iterdir()) == []


def test_uncommitted_and_invalid_manifest_leave_nothing(tmp_path):
    parent = tmp_path / "artifacts"
    with ArtifactWriter(parent / "fake") as w:
        (w.tmp / "model.pt2").write_bytes(b"x")
    with pytest.raises(ValueError):  # no weights file: the manifest cannot validate, nothing is published
        with ArtifactWriter(parent / "fake") as w:
            (w.tmp / "model.pt2").write_bytes(b"x")
            w.commit(manifest_fields())
    assert list(parent.iterdir()) == []


def test_republish_replaces(fake):
    write_fake(fake, graph=b"a newer graph")
    art = open_artifact(fake)
    assert (fake / "model.pt2").read_bytes() == b"a newer graph"
    assert art.manifest.files["model.pt2"].size == len(b"a newer graph")
    assert sorted(p.name for p in fake.parent.iterdir()) == ["fake"]


def test_will_not_replace_a_non_artifact(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    one_line_error(lambda: write_fake(precious), "not a moec artifact", "choose another output directory")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_missing_dir(tmp_path):
    one_line_error(lambda: open_artifact(tmp_path / "nope"), "nope", "no such artifact directory")


def test_missing_manifest(fake):
    (fake / "manifest.json").unlink()
    one_line_error(lambda: open_artifact(fake), "manifest.json")


def test_bad_json(fake):
    (fake / "manifest.json").write_text("{ not json")
    one_line_error(lambda: open_artifact(fake), "manifest.json", "not valid JSON")


def test_bad_field_is_named(fake):
    data = json.loads((fake / "manifest.json").read_text())
    data["step"]["max_batch"] = "lots"
    (fake / "manifest.json").write_text(json.dumps(data))
    one_line_error(lambda: read_manifest(fake), "step.max_batch")


def test_missing_file(fake):
    (fake / "tokenizer" / "tokenizer.json").unlink()
    one_line_error(lambda: open_artifact(fake), "missing file tokenizer/tokenizer.json", "recompile")


def test_flipped_byte_in_weights(fake):
    weights = fake / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    one_line_error(lambda: open_artifact(fake), "weights.safetensors", "sha256 mismatch")


def test_a_verified_artifact_is_not_hashed_again_until_a_file_changes(fake, tmp_path, monkeypatch):
    from moec.artifact import reader

    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    hashed = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    open_artifact(fake)
    first = len(hashed)
    assert first >= 2  # every file, the first time
    open_artifact(fake)
    assert len(hashed) == first  # remembered: nothing hashed again
    weights = fake / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, new content: the record no longer matches
    one_line_error(lambda: open_artifact(fake), "weights.safetensors", "sha256 mismatch")
    assert len(hashed) > first


def test_a_freshly_written_artifact_opens_without_hashing(tmp_path, monkeypatch):
    """The writer hashed every file for the manifest: serving right after compiling on the same
    machine does not hash many GB a second time — until a file changes."""
    from moec.artifact import reader

    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    art = write_fake(tmp_path / "artifacts" / "fresh")
    hashed = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    open_artifact(art)
    assert hashed == []
    graph = art / "model.pt2"
    graph.write_bytes(graph.read_bytes()[::-1])  # same size, other bytes
    one_line_error(lambda: open_artifact(art), "model.pt2", "sha256 mismatch")
    assert "model.pt2" in hashed


def test_an_unwritable_cache_only_means_hashing_again(fake, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("MOEC_CACHE_DIR", str(blocker))
    open_artifact(fake)
    open_artifact(fake)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])


def test_truncated_weights(fake):
    truncate(fake / "weights.safetensors")
    one_line_error(lambda: open_artifact(fake), "weights.safetensors", "truncated")


def test_truncated_weights_without_verification(fake):
    truncate(fake / "weights.safetensors")
    art = open_artifact(fake, verify=False)
    one_line_error(lambda: open_weights(art), "weights.safetensors", "not a valid safetensors file")


def test_newer_format_version(fake):
    edit_manifest(fake, format_version=FORMAT_VERSION + 1, some_future_field=True)
    one_line_error(lambda: open_artifact(fake), f"format version {FORMAT_VERSION + 1}", "upgrade moec")


def test_built_by_another_torch(fake):
    edit_manifest(fake, torch_version="1.0.0")
    one_line_error(lambda: open_artifact(fake), "torch 1.0.0", torch.__version__, "recompile")


def test_local_build_tag_is_ignored(fake):
    edit_manifest(fake, torch_version=torch.__version__.split("+")[0] + "+cu999")
    open_artifact(fake)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_compiled_for_cuda_on_cpu_machine(fake):
    edit_manifest(fake, device="cuda", compute_capability="9.0")
    one_line_error(lambda: open_artifact(fake), "compiled for cuda", "no CUDA GPU")


def test_asked_for_another_device(fake):
    one_line_error(lambda: open_artifact(fake, device="cuda"), "compiled for cpu", "run on cuda")
