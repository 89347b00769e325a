"""The artifact: the on-disk contract between moe-compile and moe-runtime (see DESIGN.md, "The artifact").

A directory holding manifest.json, the compiled step graph (.pt2), its weights (.safetensors) and
the tokenizer. Light on purpose: the runtime imports this, so nothing here imports transformers
or moec.compiler, and nothing is ever loaded with pickle.
"""

from moec.artifact.manifest import FORMAT_VERSION, FileEntry, Manifest, MoeRegion, StepSpec
from moec.artifact.reader import Artifact, check_compatible, open_artifact, open_weights, read_manifest, verify_files
from moec.artifact.summary import render_summary, summary_dict
from moec.artifact.writer import ArtifactWriter

__all__ = [
    "FORMAT_VERSION",
    "Artifact",
    "ArtifactWriter",
    "FileEntry",
    "Manifest",
    "MoeRegion",
    "StepSpec",
    "check_compatible",
    "open_artifact",
    "open_weights",
    "read_manifest",
    "render_summary",
    "summary_dict",
    "verify_files",
]
