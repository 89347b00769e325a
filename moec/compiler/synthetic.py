"""Synthetic models: a real Hugging Face architecture with seeded random weights, written to disk.

No machine here reaches a model hub, so a recipe may name an architecture and a config instead
of a checkpoint. `write_synthetic_model` writes a complete Hugging Face model directory
(config.json, model.safetensors, generation_config.json, tokenizer files) which the compiler then
loads through exactly the code path a downloaded checkpoint takes. Same inputs, same bytes.

transformers is imported lazily: the runtime never needs it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from moec.errors import RecipeError

# architecture (config.json "architectures"[0]) -> (transformers config class, model class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "MixtralForCausalLM": ("MixtralConfig", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

DEFAULT_VOCAB_SIZE = 512
# Bump when what write_synthetic_model writes changes for the same inputs (cache names change too).
SYNTHETIC_FORMAT = 1

# Keys a synthetic config may not set, and why.
_RESERVED = {
    "architectures": "it is the recipe's model.synthetic.architecture",
    "model_type": "it follows from model.synthetic.architecture",
    "dtype": "it is model.synthetic.dtype (the checkpoint's dtype); the recipe's dtype is what is compiled",
    "torch_dtype": "it is model.synthetic.dtype (the checkpoint's dtype); the recipe's dtype is what is compiled",
}

Progress = Callable[[str], None]


def _classes(architecture: str):
    if architecture not in ARCHITECTURES:
        raise RecipeError(
            f"unknown synthetic architecture {architecture!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    import transformers

    config_name, model_name = ARCHITECTURES[architecture]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _first_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return f"unknown value {e.args[0]!r}"
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _field_error(e: Exception) -> str:
    """transformers' strict-dataclass error, e.g. "Field 'hidden_size' expected int, got str (value: 'x')"."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    last = lines[-1]
    for prefix in ("TypeError: ", "ValueError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


@cache
def _names_read_by(model_cls) -> frozenset[str]:
    """Config attributes the architecture's modeling code reads, fields or not.

    Some are not config fields (Qwen3MoeForCausalLM reads `getattr(config, "head_dim", ...)`),
    so the dataclass fields alone would reject settings that do change the model.
    """
    source_file = getattr(sys.modules.get(model_cls.__module__), "__file__", None)
    if not source_file:
        return frozenset()
    source = Path(source_file).read_text(encoding="utf-8")
    names = set(re.findall(r"\bconfig\.([A-Za-z_]\w*)", source))
    names |= set(re.findall(r"getattr\(\s*(?:self\.)?config\s*,\s*[\"'](\w+)[\"']", source))
    return frozenset(names)


def _build_config(architecture: str, config: dict[str, Any], vocab_size: int, bos_id: int, eos_id: int,
                  dtype: str = "float32"):
    config_cls, model_cls = _classes(architecture)
    where = "model.synthetic.config"
    for key, why in _RESERVED.items():
        if key in config:
            raise RecipeError(f"{where}.{key} cannot be set: {why}")
    for key, tid in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        if key in config and config[key] != tid:
            raise RecipeError(f"{where}.{key} must be {tid} (the synthetic tokenizer's id) or left out; got {config[key]!r}")

    # a deep copy: transformers edits nested dicts (rope_scaling) in place, and `config` is the caller's
    kwargs = {**copy.deepcopy(config), "vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype}
    try:
        hf_config = config_cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "bad config value"
        raise RecipeError(f"{where} for {architecture}: {_field_error(e)}") from None

    # transformers keeps unknown keys as plain attributes: a typo would silently become a default.
    known = {f.name for f in dataclasses.fields(config_cls)} | set(getattr(config_cls, "attribute_map", {}))
    known |= _names_read_by(model_cls)
    for key in config:
        if key not in known and key in vars(hf_config):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}.{key} is not a setting {architecture} reads{hint}")
    experts, top_k = getattr(hf_config, "num_experts", None), getattr(hf_config, "num_experts_per_tok", None)
    if isinstance(experts, int) and isinstance(top_k, int) and not 1 <= top_k <= experts:
        raise RecipeError(f"{where}.num_experts_per_tok must be between 1 and the number of experts ({experts}); got {top_k}")
    hf_config.architectures = [architecture]
    return hf_config


def write_synthetic_model(
    architecture: str,
    config: dict[str, Any],
    seed: int,
    out_dir: Path,
    progress: Progress | None = None,
    dtype: str = "float32",
    init_device: str = "cpu",
) -> Path:
    """Write `architecture` with `config` and weights drawn from `seed` as a Hugging Face directory.

    The directory holds config.json, model.safetensors (`dtype`, transformers' own initialisation
    with the config's `initializer_range`), generation_config.json, tokenizer.json,
    tokenizer_config.json and special_tokens_map.json. The tokenizer is a byte-level BPE with
    exactly `config["vocab_size"]` tokens (default 512); BOS/EOS ids come from it. Same arguments,
    byte-identical files. Returns `out_dir`. `init_device="cuda"` draws the weights on the GPU (a
    Mixtral-sized model takes minutes on a CPU, seconds there): still seeded and repeatable on one
    GPU type, but not the same weights as a CPU draw; a model larger than the GPU's free memory is
    drawn module by module on the GPU into host memory (`draw_by_parts`: a 47 GB Mixtral drawn
    on the H100's CPU took longer than a 9-minute device call).

    Raises RecipeError for an unknown architecture, a config key the architecture does not have,
    a value transformers rejects, or a vocab size the tokenizer cannot reach.
    """
    import torch

    from moec.compiler.load import check_free_disk, gpu_free_bytes
    from moec.compiler.tokenizer_build import BOS, EOS, build_tokenizer, write_tokenizer_files

    say = progress or (lambda _msg: None)
    _, model_cls = _classes(architecture)
    config = dict(config or {})
    out_dir = Path(out_dir)

    vocab_size = config.pop("vocab_size", DEFAULT_VOCAB_SIZE)
    say(f"training a {vocab_size}-token tokenizer")
    try:
        tok = build_tokenizer(vocab_size)
    except ValueError as e:
        raise RecipeError(f"model.synthetic.config.vocab_size: {e}") from None
    if dtype not in ("float32", "bfloat16", "float16"):
        raise RecipeError(f"model.synthetic.dtype must be float32, bfloat16 or float16; got {dtype!r}")
    hf_config = _build_config(architecture, config, vocab_size, tok.token_to_id(BOS), tok.token_to_id(EOS), dtype)

    on_gpu, by_parts = torch.device(init_device).type == "cuda", False
    previous_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(getattr(torch, dtype))  # drawn in the checkpoint's dtype: no float32 copy
        if on_gpu:  # a model larger than the GPU (one to offload) is drawn a module at a time on it
            with torch.device("meta"):
                need = sum(p.numel() * p.element_size() for p in model_cls(hf_config).parameters())
            by_parts = need > gpu_free_bytes()
            if by_parts:
                say(f"{need / 2**30:.1f} GiB of weights do not fit the GPU's free memory: drawing them module by "
                    f"module on the GPU into host memory")
        say(f"initialising {architecture} with seed {seed} on {init_device}")
        rng_devices = [torch.device(init_device).index or 0] if on_gpu else []
        with torch.random.fork_rng(devices=rng_devices):  # caller's RNG state kept
            torch.manual_seed(seed)
            if by_parts:
                model = draw_by_parts(model_cls, hf_config, init_device)
            else:
                with torch.device(init_device):
                    model = model_cls(hf_config)
    except (ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError, IndexError, KeyError) as e:
        raise RecipeError(f"cannot build {architecture} from model.synthetic.config: {_first_line(e)}") from None
    finally:
        torch.set_default_dtype(previous_dtype)
    model.eval()
    count = sum(p.numel() for p in model.parameters())

    say(f"writing {count:,} parameters to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # weights of an earlier model here would be loaded with ours
    check_free_disk(out_dir, sum(p.numel() * p.element_size() for p in model.parameters()),
                    "the synthetic model's weights", "write the model elsewhere")
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would clutter moe-compile's output
    try:
        model.save_pretrained(out_dir)  # transformers 5 writes safetensors only (no safe_serialization flag)
    finally:
        if bar:
            hf_logging.enable_progress_bar()

    del model
    if on_gpu:
        torch.cuda.empty_cache()  # the caller's later processes want this GPU memory back
    GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id).save_pretrained(out_dir)
    write_tokenizer_files(tok, out_dir, model_max_length=getattr(hf_config, "max_position_embeddings", None))
    return out_dir


def draw_by_parts(model_cls, hf_config, device: str):
    """`model_cls(hf_config)` with transformers' initialisation run one module at a time on
    `device`, each module's tensors then moved to host memory: a model larger than the GPU, drawn
    at GPU speed. Built on the meta device first (no allocation, no initialisation), then each
    module, children before their parent as transformers initialises, gets `device` storage
    filled with NaN, its `_init_weights` (that of the nearest `PreTrainedModel` above it), and a
    check that every saved tensor was written. Repeatable on one device type; not the same bytes
    as a whole-model draw (whose module constructors also draw)."""
    import torch
    from transformers import PreTrainedModel

    with torch.device("meta"):
        model = model_cls(hf_config)
    saved = set(model.state_dict())  # persistent tensors: what save_pretrained writes

    def draw(module: torch.nn.Module, owner: PreTrainedModel, prefix: str) -> None:
        for name, child in module.named_children():
            draw(child, child if isinstance(child, PreTrainedModel) else owner, f"{prefix}{name}.")
        if next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None:
            return
        module.to_empty(device=device, recurse=False)
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for _, t in own:
            if t.is_floating_point():
                t.data.fill_(float("nan"))  # what the initialisation leaves unwritten is found below
        owner._init_weights(module)
        for name, t in own:
            if prefix + name in saved and t.is_floating_point() and bool(torch.isnan(t).any()):
                raise RuntimeError(f"{type(owner).__name__}._init_weights left {prefix}{name} unwritten")
        module.to("cpu")

    with torch.no_grad():
        draw(model, model, "")
    model.tie_weights()
    return model


def _corpus_digest() -> str:
    from moec.compiler.tokenizer_build import corpus_text

    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()


def synthetic_dir_name(architecture: str, config: dict[str, Any], seed: int, dtype: str = "float32") -> str:
    """A short, stable directory name for caching the model these arguments write.

    E.g. "mixtral-s0-1f3a9c0b2d4e6f70". The hash covers the arguments (vocab_size defaulted),
    the tokenizer corpus, and the torch/transformers versions, which decide the bytes written.
    """
    import torch
    import transformers

    config = {"vocab_size": DEFAULT_VOCAB_SIZE, **(config or {})}
    key = {
        "format": SYNTHETIC_FORMAT,
        "architecture": architecture,
        "config": config,
        "seed": seed,
        **({} if dtype == "float32" else {"dtype": dtype}),  # float32 names stay what they were
        "corpus": _corpus_digest(),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    short = architecture.removesuffix("ForCausalLM").lower() or "model"
    short = "".join(c for c in short if c.isalnum()) or "model"
    return f"{short}-s{seed}-{digest}"
