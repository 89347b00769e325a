"""The record that an artifact's files matched their sha256 on this machine, so the next open
need not hash many GB again.

It lives outside the artifact (which may be read-only), keyed by the artifact's real path and its
manifest (`MOEC_CACHE_DIR` moves it; default ~/.cache/moec), and holds each file's state: size,
mtime, ctime (which no tool can set back), inode and device — what any write, replacement or
copy of a file changes. A record that matches the files as they are now stands for the hashing.
Two writers make one: `verify_files` after hashing, and `ArtifactWriter.commit`, which hashed
every file itself to write the manifest (compile and serve on one machine then starts without
hashing the weights a second time: 24 GB took ~30 s of a server's start on the H200).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moec.artifact.manifest import MANIFEST_NAME


def _stamp_path(root: Path) -> Path:
    base = os.environ.get("MOEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moec")
    key = hashlib.sha256(str(root.resolve()).encode() + b"\0" + (root / MANIFEST_NAME).read_bytes()).hexdigest()
    return Path(base) / "verified" / f"{key[:32]}.json"


def file_states(root: Path, files) -> dict[str, list[int]]:
    """The state of the manifest and of every listed file (relative paths)."""
    states = {}
    for rel in [MANIFEST_NAME, *files]:
        st = (root / rel).stat()
        states[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return states


def is_verified(root: Path, states: dict[str, list[int]]) -> bool:
    try:
        return json.loads(_stamp_path(root).read_text()) == states
    except (OSError, ValueError):  # no record yet (or an unreadable one)
        return False


def remember_verified(root: Path, states: dict[str, list[int]]) -> None:
    """Record `states` as verified; a read-only or missing cache only means hashing next time."""
    try:
        stamp = _stamp_path(root)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(states))
        tmp.replace(stamp)
    except OSError:
        pass
