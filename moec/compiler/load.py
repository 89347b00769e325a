"""Stage 1, load: a Hugging Face model directory → an eval-mode `*ForCausalLM` on the CPU.

`from_pretrained` builds the model on the meta device and streams the safetensors shards into
it, so a large model is never materialised twice.
"""

from __future__ import annotations

import json
import shutil
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


def copy_off_files(model: torch.nn.Module, host: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the host-memory tensors of `model`, and `host`'s (`host_experts`' real experts), out of
    the safetensors files they were loaded from into this process's own memory. `from_pretrained`
    leaves CPU tensors as views of the memory-mapped files, and an unlinked file keeps its disk
    blocks while a mapping lives: the compiler's temporary copy of a synthetic model would hold
    the disk beside the artifact it writes (the 16-layer Mixtral, 2 × 47 GB on a 64 GB disk)."""
    from moec.compiler.host_experts import is_stand_in

    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type == "cpu" and not is_stand_in(t):
                t.data = t.data.clone()
        for name, t in (host or {}).items():
            host[name] = t.clone()


def check_free_disk(path: Path, need: int, what: str, fix: str) -> None:
    """`what`, `need` bytes, about to be written at `path` (which may not exist yet: the nearest
    existing parent's disk counts): a one-line error before writing, not an I/O error with half
    of it on disk."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise RecipeError(f"{path}: {what} need {need / 1e9:.1f} GB and its disk has {free / 1e9:.1f} GB free; "
                          f"free space there or {fix}")


def gpu_free_bytes() -> int:
    """What this process may still allocate on the current GPU: the device's free memory, or less
    where the process was capped (`torch.cuda.set_per_process_memory_fraction`, which the
    device's free memory does not show)."""
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return min(free, int(fraction * total) - torch.cuda.memory_allocated())


def device_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers that hold data (not `host_experts`' stand-ins)."""
    from moec.compiler.host_experts import is_stand_in

    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if not is_stand_in(t))


def fits_device(model: torch.nn.Module, device: str, free_bytes: int | None = None) -> bool:
    """Whether the whole model fits the target GPU's free memory (always, for the CPU)."""
    if device != "cuda":
        return True
    return device_bytes(model) <= (gpu_free_bytes() if free_bytes is None else free_bytes)


def check_fits_device(model: torch.nn.Module, device: str, free_bytes: int | None = None,
                      host_experts=None) -> None:
    """The compiler holds the model on the target device (export, the MoE checks and the tuner run
    it there). A model larger than the GPU's free memory is a one-line error here, not an
    out-of-memory traceback halfway through loading. With `host_experts` (an offloaded or
    expert-parallel artifact, `host_experts.keep_on_host`) the experts stay in host memory and
    the device holds the rest and one MoE block's experts at a time."""
    if device != "cuda":
        return
    if free_bytes is None:
        free_bytes = gpu_free_bytes()
    need = device_bytes(model)
    if host_experts is not None:
        need += host_experts.largest_block_bytes
    if need > free_bytes:
        def size(n: int) -> str:
            return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

        if host_experts is not None:
            raise RecipeError(f"the model's dense weights and one MoE block's experts take {size(need)} and the GPU "
                              f"has {size(free_bytes)} free; compiling with the experts in host memory (offload, "
                              "expert parallelism) needs that much on the GPU, or free the GPU")
        raise RecipeError(f"the model's weights take {size(need)} and the GPU has {size(free_bytes)} "
                          "free; compiling needs the whole model on the GPU (add an offload block to the recipe "
                          "to keep the experts in host memory), or free the GPU")
