"""The recipe: what `moe-compile` builds. Validated strictly, so a typo is an error, not a default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from moec.errors import RecipeError

DTYPES = ("float32", "bfloat16", "float16")
_BYTES = TypeAdapter(ByteSize)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SyntheticSource(Strict):
    """A real HF architecture with seeded random weights: no download, ever."""

    architecture: str
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    # the checkpoint's dtype: float32 by default; bfloat16 halves what a large model writes to disk
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ModelSource(Strict):
    """Exactly one of `path` (a Hugging Face model directory) or `synthetic`."""

    path: str | None = None
    synthetic: SyntheticSource | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of model.path (an HF directory) or model.synthetic")
        return self


class QuantizationPlan(Strict):
    """Expert-weight quantization (a later issue); today only `none`."""

    method: Literal["none"] = "none"


class ParallelPlan(Strict):
    """Expert parallelism: the routed experts split over `ep` ranks (attention data-parallel)."""

    ep: int = Field(default=1, ge=1, le=1024)
    chunks: int = Field(default=1, ge=1, le=64)  # token chunks per MoE layer: all-to-all overlaps compute (1 = off)


class OffloadWorkload(Strict):
    """The requests the offload policy is planned for: prompt and generated tokens per sequence."""

    prompt_len: int = Field(default=512, ge=1)
    gen_len: int = Field(default=128, ge=1)


class OffloadPolicyChoice(Strict):
    """Pins any part of the offload policy; the search chooses the rest."""

    batch: int | None = Field(default=None, ge=1)
    micro_batches: int | None = Field(default=None, ge=1)
    placement: Literal["gpu", "gpu-kv-host", "cpu"] | None = None  # decode attention / KV cache
    resident_expert_layers: int | None = Field(default=None, ge=0)
    cache_experts: int | None = Field(default=None, ge=0)
    # the compiled step's token limit (prefill steps of at most this many tokens, each streaming the
    # experts once); default: the recipe's max_tokens_per_step, doubled while it pays
    prefill_step_tokens: int | None = Field(default=None, ge=1)


class OffloadPlan(Strict):
    """Experts in host memory, streamed to the GPU (moec.compiler.offload_policy plans it)."""

    gpu_memory: int | str  # bytes, or "24GiB"
    host_memory: int | str | None = None  # default: this machine's memory
    hardware: str = "h100-sxm"  # a named profile, or a JSON file from `moe-compile --profile-hardware`
    workload: OffloadWorkload = Field(default_factory=OffloadWorkload)
    policy: Literal["auto"] | OffloadPolicyChoice = "auto"

    @field_validator("gpu_memory", "host_memory")
    @classmethod
    def _bytes(cls, value):
        if value is None:
            return None
        try:
            size = int(_BYTES.validate_python(value))
        except ValidationError:
            raise ValueError("want a size such as 24GiB, 512MB or a number of bytes") from None
        if size <= 0:
            raise ValueError("must be more than 0 bytes")
        return size


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSource
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: Literal["cpu", "cuda"] = "cuda"
    max_batch: int = Field(default=8, ge=1, le=4096)
    max_seq_len: int = Field(default=2048, ge=16)
    max_tokens_per_step: int | None = Field(default=None, ge=1)
    kv_block_size: int = Field(default=16, ge=1, le=1024)
    output_dir: str | None = None
    quantization: QuantizationPlan = Field(default_factory=QuantizationPlan)
    parallel: ParallelPlan = Field(default_factory=ParallelPlan)
    offload: OffloadPlan | None = None

    @model_validator(mode="after")
    def _limits(self):
        if self.parallel.ep > 1 and self.offload is not None:
            raise ValueError("parallel.ep > 1 with offload is not supported yet; use one of them")
        if self.max_tokens_per_step is None:
            self.max_tokens_per_step = max(self.max_seq_len, self.max_batch)
        if self.max_tokens_per_step < self.max_batch:
            raise ValueError("max_tokens_per_step must be at least max_batch (one decode token per sequence)")
        step = self.offload.policy.prefill_step_tokens if self.offload and self.offload.policy != "auto" else None
        if step is not None and step < self.max_batch:
            raise ValueError(f"offload.policy.prefill_step_tokens {step} is below max_batch {self.max_batch} "
                             "(one decode token per sequence); raise it or lower max_batch")
        return self

    def resolved_output_dir(self, base: Path) -> Path:
        return Path(self.output_dir) if self.output_dir else base / "artifacts" / self.name


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{where}': remove it or check its spelling"
    if kind == "missing":
        return f"missing required key '{where}'"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"'{where}': {msg}{shown}"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys (name, model, dtype, ...), not {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_describe(e)}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (pass the path of a .yaml recipe, e.g. recipes/tiny-mixtral.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    return parse_recipe(data, str(path))
