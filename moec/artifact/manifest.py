"""manifest.json: what an artifact holds and what it was built with, so the runtime can refuse what it cannot run.

The manifest is the whole contract between compiler and runtime. Models forbid unknown fields so a
typo in the compiler fails at compile time, not as a silently ignored key at load time.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_relative(path: str) -> str:
    """Artifact paths stay inside the artifact: relative, posix, no `..`."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or ".." in p.parts:
        raise ValueError(f"{path!r} is not a relative path inside the artifact")
    return path


RelPath = Annotated[str, AfterValidator(_check_relative)]


class FileEntry(_Strict):
    """One file of the artifact, checked before anything in it is loaded."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class StepSpec(_Strict):
    """The exported step function and the static limits it was compiled for."""

    graph: RelPath = "model.pt2"
    weights: RelPath = "weights.safetensors"
    max_batch: int = Field(ge=1)
    max_seq_len: int = Field(ge=1)
    max_tokens_per_step: int = Field(ge=1)
    kv_block_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    kv_dtype: str


class MoeRegion(_Strict):
    """One MoE block the compiler lowered to moec ops."""

    layer: int
    path: str
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    renormalize: bool
    activation: str


class Manifest(_Strict):
    """Everything the runtime needs to know about an artifact before it runs any of it."""

    format_version: int = Field(ge=1)
    name: str
    created_at: str  # ISO-8601, UTC
    moec_version: str
    torch_version: str
    triton_version: str | None
    python_version: str
    device: Literal["cpu", "cuda"]
    compute_capability: str | None  # "9.0"; None for cpu
    dtype: str  # "float32" / "bfloat16" / "float16"
    architecture: str
    hf_config: dict
    recipe: dict
    step: StepSpec
    moe_regions: list[MoeRegion]
    kernels: dict = {}
    parallel: dict = {}
    offload: dict = {}
    # A .pt2 holds a compiled shared library: loading an artifact runs its code, so artifacts are trusted code.
    contains_native_code: bool = True
    tokenizer_dir: RelPath = "tokenizer"
    files: dict[str, FileEntry]

    @field_validator("files")
    @classmethod
    def _files_inside(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in files:
            _check_relative(rel)
            if rel == MANIFEST_NAME:
                raise ValueError(f"{MANIFEST_NAME} cannot list itself")
        return files

    @model_validator(mode="after")
    def _step_files_listed(self) -> Manifest:
        """The graph and weights must be files of the artifact, so they are always checksummed."""
        for rel in (self.step.graph, self.step.weights):
            if rel not in self.files:
                raise ValueError(f"step file {rel!r} is not among the artifact's files")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def _dist_version(*names: str) -> str | None:
    """A distribution's version without importing it (importing triton is slow and may touch the GPU)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment_fields(device: str) -> dict:
    """The manifest fields describing the build environment: versions, time, GPU generation."""
    import torch

    import moec

    capability = None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        capability = f"{major}.{minor}"
    return {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "moec_version": moec.__version__,
        "torch_version": torch.__version__,
        "triton_version": _dist_version("triton", "pytorch-triton"),
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "compute_capability": capability,
    }
