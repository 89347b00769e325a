"""Write an artifact so that a reader only ever sees a complete one, or none at all.

Files go into a temporary directory next to the destination; `commit` checksums them, writes
manifest.json and renames the directory into place. A crash or an exception at any point before
that leaves the destination as it was.

    with ArtifactWriter(out_dir) as w:
        save(w.tmp / "weights.safetensors")
        w.commit({...manifest fields except files...})
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from moec.artifact.manifest import FORMAT_VERSION, MANIFEST_NAME, FileEntry, Manifest
from moec.artifact.verified_stamp import file_states, remember_verified
from moec.errors import ArtifactError

_CHUNK = 8 << 20  # 8 MiB: weight files may be many GB


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so memory stays flat whatever its size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


class ArtifactWriter:
    """Context manager building an artifact in `.tmp`, published to `out_dir` only by `commit`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.tmp: Path | None = None
        self._committed = False

    def __enter__(self) -> ArtifactWriter:
        self._check_replaceable()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self._sibling("tmp")
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self.tmp is not None:
            _remove(self.tmp)

    def _sibling(self, kind: str) -> Path:
        """A fresh hidden name in the destination's directory, so renames stay on one filesystem."""
        while True:
            p = self.out_dir.parent / f".{self.out_dir.name}.{kind}-{secrets.token_hex(4)}"
            if not p.exists():
                return p

    def _check_replaceable(self) -> None:
        """Only an old artifact (or an empty directory) may be replaced: never a user's other files."""
        out = self.out_dir
        if not out.exists() and not out.is_symlink():
            return
        if not out.is_dir() or out.is_symlink():
            raise ArtifactError(f"{out}: exists and is not an artifact directory; "
                                f"remove it or choose another output directory")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise ArtifactError(f"{out}: exists and is not a moec artifact (no {MANIFEST_NAME}), so it will not be "
                                f"replaced; remove it or choose another output directory")

    def _file_entries(self) -> dict[str, FileEntry]:
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            rel = p.relative_to(self.tmp).as_posix()
            if p.is_symlink():  # a link could point outside the artifact: copy files in instead
                raise ValueError(f"artifact file {rel} is a symlink; write a real file into the artifact")
            if p.is_file() and rel != MANIFEST_NAME:
                files[rel] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        return files

    def commit(self, manifest_fields: dict) -> Path:
        """Checksum every file, validate and write manifest.json, then publish atomically; returns out_dir."""
        if self.tmp is None or self._committed:
            raise RuntimeError("ArtifactWriter.commit needs an open, uncommitted writer (use it as a context manager)")
        fields = {"format_version": FORMAT_VERSION, **manifest_fields, "files": self._file_entries()}
        manifest = Manifest.model_validate(fields)  # a bad manifest fails here, before anything is published
        manifest_path = self.tmp / MANIFEST_NAME
        with open(manifest_path, "w", encoding="utf-8") as f:
            f.write(manifest.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        hashed = file_states(self.tmp, manifest.files)  # the files as they were hashed above
        self._publish()
        self._committed = True
        if file_states(self.out_dir, manifest.files) == hashed:  # the rename left every file as it was
            remember_verified(self.out_dir, hashed)
        return self.out_dir

    def _publish(self) -> None:
        """Swap the finished directory into place: the old artifact moves aside, the new one moves in."""
        self._check_replaceable()  # the destination may have changed while we compiled
        old = None
        if self.out_dir.exists():
            old = self._sibling("old")
            os.replace(self.out_dir, old)
        try:
            os.replace(self.tmp, self.out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, self.out_dir)
            raise
        if old is not None:
            _remove(old)
