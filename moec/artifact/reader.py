"""Open an artifact, refusing in one line anything this runtime cannot safely run.

Order matters: the manifest is read first (a newer format is reported before its unknown fields
are), then the artifact is matched against this machine, then every file is checksummed. Only
then is anything in it loaded; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from moec.artifact.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from moec.artifact.verified_stamp import file_states, is_verified, remember_verified
from moec.artifact.writer import sha256_file
from moec.errors import ArtifactError

if TYPE_CHECKING:
    import torch

_RECOMPILE = "recompile with moe-compile or copy it again"


def _one_line(text: object, limit: int = 200) -> str:
    """Collapse a library's message to one short line for an error we raise."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


@dataclass(frozen=True)
class Artifact:
    """An opened artifact: its directory and its validated manifest."""

    path: Path
    manifest: Manifest

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest.step.graph

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest.step.weights

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer_dir


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate manifest.json; no file other than the manifest is touched."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{root}: no such artifact directory; check the path, or compile one with moe-compile")
    if not root.is_dir():
        raise ArtifactError(f"{root}: is a file, not an artifact directory; pass the directory moe-compile wrote")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_NAME}, so this is not a moec artifact (or an incomplete copy); "
                            f"{_RECOMPILE}")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({_one_line(e)}); the file is damaged — {_RECOMPILE}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{mpath}: not a JSON object; the file is damaged — {_RECOMPILE}")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool):
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{root}: format version {version} is newer than this moec reads ({FORMAT_VERSION}); "
                                f"upgrade moec")
        if version < FORMAT_VERSION:
            raise ArtifactError(f"{root}: format version {version} is older than this moec reads ({FORMAT_VERSION}); "
                                f"recompile it with this moec")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ArtifactError(f"{mpath}: field {where!r}: {_one_line(err['msg'])}; the manifest is damaged or was not "
                            f"written by moe-compile — recompile it") from None


def verify_files(path: str | os.PathLike, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size and sha256 (sizes first: cheap, and names truncation).

    Hashing a many-GB weights file takes tens of seconds, so a verified artifact is remembered (see
    `moec.artifact.verified_stamp`): while none of its files has been written, replaced or moved since,
    a later open on this machine trusts that check instead of hashing again. The first open, and
    any open after a file changed, hashes everything."""
    root = Path(path)
    for rel, entry in manifest.files.items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"{root}: missing file {rel} (listed in {MANIFEST_NAME}); "
                                f"the artifact is incomplete — {_RECOMPILE}")
        size = f.stat().st_size
        if size < entry.size:
            raise ArtifactError(f"{root}: {rel} is truncated ({size} of {entry.size} bytes); {_RECOMPILE}")
        if size != entry.size:
            raise ArtifactError(f"{root}: {rel} has the wrong size ({size} bytes, expected {entry.size}); "
                                f"the file is damaged — {_RECOMPILE}")
    states = file_states(root, manifest.files)
    if is_verified(root, states):
        return
    for rel, entry in manifest.files.items():
        got = sha256_file(root / rel)
        if got != entry.sha256:
            raise ArtifactError(f"{root}: {rel} sha256 mismatch (expected {entry.sha256[:12]}…, got {got[:12]}…); "
                                f"the file is damaged — {_RECOMPILE}")
    remember_verified(root, states)


def _release(version: str) -> str:
    """`2.11.0+cu128` -> `2.11.0`: the local build tag does not change the .pt2 format."""
    return version.split("+", 1)[0]


def check_compatible(manifest: Manifest, device: str | None = None) -> None:
    """The artifact can run here: same device kind, same torch release, same GPU generation."""
    import torch

    name = manifest.name
    want = (device or manifest.device).split(":", 1)[0]
    if want not in ("cpu", "cuda"):
        raise ArtifactError(f"unknown device {device!r}; use cpu or cuda")
    if want != manifest.device:
        raise ArtifactError(f"artifact {name!r} was compiled for {manifest.device} but asked to run on {want}; "
                            f"recompile the recipe with device: {want}")
    built, here = _release(manifest.torch_version), _release(torch.__version__)
    if built != here:
        raise ArtifactError(f"artifact {name!r} was built with torch {manifest.torch_version} but this is torch "
                            f"{torch.__version__}; a .pt2 loads only under the torch release that built it — "
                            f"recompile on this machine with moe-compile")
    if manifest.device == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError(f"artifact {name!r} was compiled for cuda but no CUDA GPU is available here; run it on "
                                f"a GPU machine or recompile the recipe with device: cpu")
        major, minor = torch.cuda.get_device_capability()
        cc = f"{major}.{minor}"
        if manifest.compute_capability is not None and manifest.compute_capability != cc:
            raise ArtifactError(f"artifact {name!r} was compiled for GPU compute capability "
                                f"{manifest.compute_capability} but this GPU ({torch.cuda.get_device_name()}) is {cc}; "
                                f"recompile on this machine with moe-compile")


def open_artifact(path: str | os.PathLike, verify: bool = True, device: str | None = None) -> Artifact:
    """Read, match to this machine and (unless `verify=False`) checksum an artifact; loads nothing."""
    root = Path(path)
    manifest = read_manifest(root)
    check_compatible(manifest, device)
    if verify:
        verify_files(root, manifest)
    return Artifact(path=root, manifest=manifest)


def open_weights(artifact: Artifact, device: str | None = None, names=None) -> dict[str, torch.Tensor]:
    """The artifact's weights as tensors (safetensors, memory-mapped on cpu), on `device` or the
    artifact's; only `names` when given (an offloaded artifact's experts stay on the host)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = artifact.weights_path
    rel = artifact.manifest.step.weights
    if not path.is_file():
        raise ArtifactError(f"{artifact.path}: missing file {rel}; the artifact is incomplete — {_RECOMPILE}")
    device = device or artifact.manifest.device
    try:
        if names is None:
            return load_file(path, device=device)
        with safe_open(path, framework="pt", device=device) as f:
            present = set(f.keys())
            return {name: f.get_tensor(name) for name in names if name in present}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise ArtifactError(f"{artifact.path}: {rel} is not a valid safetensors file ({_one_line(e)}); "
                            f"{_RECOMPILE}") from None
