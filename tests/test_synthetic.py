"""Synthetic models are real Hugging Face directories: same tokenizer, same bytes, loadable offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moec.compiler.synthetic import ARCHITECTURES, synthetic_dir_name, write_synthetic_model
from moec.compiler.tokenizer_build import build_tokenizer, write_tokenizer_files
from moec.errors import RecipeError

TINY_MIXTRAL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 512,
    "max_position_embeddings": 512,
}
TEXTS = [
    "Hello, world!",
    "The router sends each token to 2 of 8 experts; 3.14159 and 2,048.",
    "  leading spaces,\ttabs\nand newlines  ",
    "naïve café — Ελληνικά, 東京, العربية, ∑x² ≤ ∞",
    "emoji 🚀👩‍👩‍👧🏳️‍🌈 and a lone combining mark e\u0301",
    "",
]


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 0, tmp_path_factory.mktemp("syn") / "mixtral")


# --- tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [259, 512, 1024, 4096, 32000])
def test_tokenizer_has_exact_vocab_size_and_special_ids(size):
    tok = build_tokenizer(size)
    assert tok.get_vocab_size(with_added_tokens=True) == size
    assert tok.get_vocab_size(with_added_tokens=False) == size
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sorted(tok.get_vocab().values()) == list(range(size))


def test_tokenizer_is_deterministic_within_and_across_processes():
    a, b = build_tokenizer(1024).to_str(), build_tokenizer(1024).to_str()
    assert a == b
    code = "from moec.compiler.tokenizer_build import build_tokenizer; print(build_tokenizer(1024).to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.rstrip("\n") == a
    assert build_tokenizer(512).to_str() != a


def test_tokenizer_size_limits_are_clear_errors():
    with pytest.raises(ValueError, match="at most 262144"):
        build_tokenizer(300_000)
    with pytest.raises(ValueError, match="at least 259"):
        build_tokenizer(100)


def test_vocab_past_the_corpus_is_reserved_tokens_text_never_reaches():
    big, base = build_tokenizer(32000), build_tokenizer(4096)
    trained = max(i for tok, i in big.get_vocab().items() if not tok.startswith("<reserved_"))
    assert 3000 < trained < 32000 - 1
    for text in TEXTS + ["<reserved_5> and <reserved_31000>"]:
        ids = big.encode(text).ids
        assert max(ids, default=0) <= trained
        assert big.decode(ids) == text
    assert big.decode([31999]) == f"<reserved_{31999 - trained - 1}>"
    assert base.encode(TEXTS[1]).ids != [] and big.get_vocab_size() == 32000


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_and_adds_no_special_tokens(text):
    tok = build_tokenizer(512)
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert all(i > 2 for i in ids)  # no BOS/EOS/UNK: byte-level never needs <unk>
    assert ids == tok.encode(text, add_special_tokens=False).ids


def test_tokenizer_merges_common_words():
    tok = build_tokenizer(1024)
    assert len(tok.encode("the expert").ids) < len("the expert")


def test_hf_tokenizer_matches_raw_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(512)
    write_tokenizer_files(tok, tmp_path, model_max_length=256)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, len(hf)) == (1, 2, 0, 512)
    assert hf.model_max_length == 256
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text
        assert hf.decode([1, *ids, 2], skip_special_tokens=True) == text
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_chat_template_renders_and_generation_prompt_is_a_token_prefix(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer_files(build_tokenizer(512), tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"}]
    assert hf.apply_chat_template(chat, tokenize=False) == "<s>[user]\nHi there</s><s>[assistant]\nHello! How are you?</s>"
    prompt = hf.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>[user]\nHi there</s><s>[assistant]\n"
    full_ids = hf.encode(hf.apply_chat_template(chat, tokenize=False))
    prompt_ids = hf.encode(prompt)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert prompt_ids.count(1) == 2 and full_ids[-1] == 2


# --- synthetic model directories -------------------------------------------------------------------


def test_synthetic_dir_is_a_complete_hf_directory(mixtral_dir):
    assert set(files(mixtral_dir)) == {
        "config.json", "model.safetensors", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    }
    config = json.loads((mixtral_dir / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (512, 1, 2)
    assert config["dtype"] == "float32"
    generation = json.loads((mixtral_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_synthetic_mixtral_loads_offline_with_the_generated_weights(mixtral_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(mixtral_dir, local_files_only=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert len(tokenizer) == model.config.vocab_size == 512

    # The oracle: the same seed through transformers' own init, without the save/load round trip.
    torch.manual_seed(0)
    reference = MixtralForCausalLM(AutoConfig.from_pretrained(mixtral_dir, local_files_only=True))
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name
    experts = got["model.layers.0.mlp.experts.gate_up_proj"]
    assert 0.015 < experts.std().item() < 0.025  # initializer_range 0.02, transformers' default

    ids = torch.tensor([[1, *tokenizer.encode("The weather is")]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()


def test_same_seed_is_byte_identical_other_seed_differs(mixtral_dir, tmp_path):
    again = write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 0, tmp_path / "again")
    assert files(again) == files(mixtral_dir)
    # rewriting in place gives the same bytes too
    assert files(write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 0, again)) == files(mixtral_dir)

    other = files(write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 1, tmp_path / "seed1"))
    same = files(mixtral_dir)
    assert other["model.safetensors"] != same["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in same.items() if k != "model.safetensors"
    }


def test_writing_leaves_the_callers_rng_and_config_alone(tmp_path):
    config = {**TINY_MIXTRAL, "initializer_range": 0.1, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    before = json.dumps(config, sort_keys=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    messages = []
    write_synthetic_model("MixtralForCausalLM", config, 5, tmp_path / "m", progress=messages.append)
    assert torch.equal(torch.rand(3), expected)
    assert json.dumps(config, sort_keys=True) == before
    assert messages and any("seed 5" in m for m in messages)


def test_synthetic_qwen3_moe_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    config = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 6,
              "num_experts_per_tok": 2, "norm_topk_prob": True, "vocab_size": 1024, "max_position_embeddings": 256}
    model_dir = write_synthetic_model("Qwen3MoeForCausalLM", config, 3, tmp_path / "qwen3")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.vocab_size == 1024 and model.config.num_experts == 6


def test_registry_names_the_supported_architectures():
    assert {"MixtralForCausalLM", "Qwen3MoeForCausalLM"} <= set(ARCHITECTURES)


def test_unknown_architecture_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as e:
        write_synthetic_model("GPT9ForMagic", {}, 0, tmp_path / "x")
    message = str(e.value)
    assert "GPT9ForMagic" in message and "MixtralForCausalLM" in message and "Qwen3MoeForCausalLM" in message
    assert "\n" not in message
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ({"hiden_size": 64}, ["hiden_size", "did you mean 'hidden_size'"]),
        ({"hidden_size": "big"}, ["hidden_size", "expected int"]),
        ({"vocab_size": 300_000}, ["vocab_size", "too large"]),
        ({"num_experts_per_tok": 9}, ["num_experts_per_tok", "4"]),
        ({"dtype": "bfloat16"}, ["dtype", "model.synthetic.dtype"]),
        ({"eos_token_id": 7}, ["eos_token_id", "2"]),
        ({"hidden_act": "nope"}, ["nope"]),
    ],
)
def test_bad_config_is_a_one_line_recipe_error(tmp_path, override, needles):
    with pytest.raises(RecipeError) as e:
        write_synthetic_model("MixtralForCausalLM", {**TINY_MIXTRAL, **override}, 0, tmp_path / "x")
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_synthetic_dir_name_is_short_and_stable():
    name = synthetic_dir_name("MixtralForCausalLM", TINY_MIXTRAL, 0)
    assert name == synthetic_dir_name("MixtralForCausalLM", dict(reversed(TINY_MIXTRAL.items())), 0)
    assert name.startswith("mixtral-s0-") and len(name) <= 40 and "/" not in name
    assert name != synthetic_dir_name("MixtralForCausalLM", TINY_MIXTRAL, 1)
    assert name != synthetic_dir_name("MixtralForCausalLM", {**TINY_MIXTRAL, "hidden_size": 128}, 0)
    assert name != synthetic_dir_name("Qwen3MoeForCausalLM", TINY_MIXTRAL, 0)
    # vocab_size defaults to 512 for both the model and the name
    no_vocab = {k: v for k, v in TINY_MIXTRAL.items() if k != "vocab_size"}
    assert synthetic_dir_name("MixtralForCausalLM", no_vocab, 0) == name


def test_bfloat16_checkpoint_is_written_and_named_apart(tmp_path):
    from safetensors import safe_open

    out = write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 0, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert synthetic_dir_name("MixtralForCausalLM", TINY_MIXTRAL, 0, "bfloat16") != \
        synthetic_dir_name("MixtralForCausalLM", TINY_MIXTRAL, 0)
    with pytest.raises(RecipeError, match="model.synthetic.dtype"):
        write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 0, tmp_path / "x", dtype="int8")


def test_too_little_disk_is_a_one_line_error_before_writing(tmp_path, monkeypatch):
    """A model larger than the disk's free space fails before the first shard, naming both sizes
    (the 16-layer Mixtral-shaped model once filled a 64 GB disk half-way through save_pretrained)."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(RecipeError) as e:
        write_synthetic_model("MixtralForCausalLM", TINY_MIXTRAL, 0, tmp_path / "x")
    message = str(e.value)
    assert "\n" not in message and "GB free" in message and str(tmp_path / "x") in message
    assert not list((tmp_path / "x").glob("*.safetensors"))


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_a_model_drawn_by_parts_is_transformers_initialisation_in_host_memory(architecture):
    """`draw_by_parts` (a model larger than the GPU, drawn a module at a time on it) writes every
    saved tensor with transformers' own initialisation and leaves the model in host memory; here
    the drawing device is the CPU, which only moves where the NaN-poisoned storage lives."""
    import transformers

    from moec.compiler.synthetic import _build_config, draw_by_parts

    config_name, model_name = ARCHITECTURES[architecture]
    config = {k: v for k, v in TINY_MIXTRAL.items() if k != "vocab_size"}
    if architecture.startswith("Qwen3"):
        config = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2,
                  "head_dim": 16}
    hf_config = _build_config(architecture, config, 512, 1, 2)
    model_cls = getattr(transformers, model_name)
    torch.manual_seed(0)
    parts = draw_by_parts(model_cls, hf_config, "cpu")
    torch.manual_seed(0)
    whole = model_cls(hf_config)
    drawn, reference = parts.state_dict(), whole.state_dict()
    assert drawn.keys() == reference.keys()
    std = hf_config.initializer_range
    for name, t in drawn.items():
        ref = reference[name]
        assert t.device.type == "cpu" and t.shape == ref.shape and t.dtype == ref.dtype, name
        assert torch.isfinite(t).all(), name
        if bool((ref == ref.flatten()[0]).all()):  # norms' ones, zero biases
            assert torch.equal(t, ref), name
        else:  # drawn: the same law, other draws
            assert not torch.equal(t, ref), name
            if ref.numel() >= 256:
                assert abs(t.float().std().item() - std) < 0.2 * std, name
    ids = torch.tensor([[1, 17, 99, 300]])
    assert torch.isfinite(parts(ids).logits).all()


def test_draw_by_parts_names_a_tensor_the_initialisation_leaves_unwritten():
    import transformers

    from moec.compiler.synthetic import _build_config, draw_by_parts

    class WithExtra(transformers.MixtralForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.extra = torch.nn.Parameter(torch.empty(3))  # no _init_weights case covers it

    config = {k: v for k, v in TINY_MIXTRAL.items() if k != "vocab_size"}
    with pytest.raises(RuntimeError, match=r"left extra unwritten"):
        draw_by_parts(WithExtra, _build_config("MixtralForCausalLM", config, 512, 1, 2), "cpu")
