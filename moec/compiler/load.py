"""Stage 1, load: a Hugging Face model directory → an eval-mode `*ForCausalLM` on the CPU.

`from_pretrained` builds the model on the meta device and streams the safetensors shards into
it, so a large model is never materialised twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moec.compiler.step import ATTN_IMPLEMENTATION, register_attention
from moec.errors import RecipeError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")


def read_hf_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise RecipeError(f"model directory not found: {model_dir} (set model.path to a Hugging Face model directory)")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{config_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise RecipeError(
            f"{config_file}: architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not list(model_dir.glob("*.safetensors")):
        raise RecipeError(
            f"{model_dir} has no *.safetensors weights (moec reads only safetensors; convert .bin weights with save_pretrained)"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise RecipeError(f"{model_dir} has no tokenizer.json (moec needs a fast tokenizer file)")
    return config


def load_model(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    read_hf_config(model_dir)
    register_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{model_dir}: cannot load the model: {first}") from None
    return model.eval().requires_grad_(False)


def check_fits_device(model: torch.nn.Module, device: str, free_bytes: int | None = None) -> None:
    """The compiler holds the whole model on the target device (export, the MoE checks and the
    tuner run it there). A model larger than the GPU's free memory is a one-line error here, not
    an out-of-memory traceback halfway through loading. An offloaded artifact only needs the
    plan's budget when it runs, but compiling it still needs a GPU that holds the whole model."""
    if device != "cuda":
        return
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info()
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if need > free_bytes:
        def size(n: int) -> str:
            return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

        raise RecipeError(f"the model's weights take {size(need)} and the GPU has {size(free_bytes)} "
                          "free; compiling needs the whole model on the GPU (an offloaded artifact runs within "
                          "offload.gpu_memory, but compile it on a GPU that holds the model), or free the GPU")
