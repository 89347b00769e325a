"""Shared fixtures: one synthetic tiny Mixtral, compiled once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-mixtral.yaml"


@pytest.fixture(autouse=True, scope="session")
def _private_verify_cache(tmp_path_factory):
    """Artifacts the tests verify are remembered in a cache of this session, not the user's."""
    os.environ["MOEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("moec-cache"))


def pytest_collection_modifyitems(config, items):
    """Kernel tests marked `interpreted` need TRITON_INTERPRET=1 set before Triton loads:
    test_triton_kernels.py runs them in a subprocess, and only them there."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    keep = [item for item in items if (item.get_closest_marker("interpreted") is not None) == interpret]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def tiny_synthetic() -> dict:
    return yaml.safe_load(TINY_RECIPE.read_text())["model"]["synthetic"]


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    """The tiny Mixtral as a real Hugging Face directory (the oracle loads the same files)."""
    from moec.compiler.synthetic import write_synthetic_model

    syn = tiny_synthetic()
    out = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    return write_synthetic_model(syn["architecture"], syn["config"], syn["seed"], out)


def tiny_recipe_dict(model_dir: Path, **overrides) -> dict:
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["model"] = {"path": str(model_dir)}
    recipe.update(overrides)
    return recipe


@pytest.fixture(scope="session")
def tiny_artifact(hf_model_dir, tmp_path_factory) -> Path:
    from rich.console import Console

    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe

    out = tmp_path_factory.mktemp("artifacts") / "tiny-mixtral"
    recipe = parse_recipe(tiny_recipe_dict(hf_model_dir))
    compile_recipe(recipe, out, console=Console(stderr=True, quiet=True))
    return out


@pytest.fixture(scope="session")
def hf_model(hf_model_dir):
    from transformers import AutoModelForCausalLM

    import torch

    return AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy a test may damage."""
    dst = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, dst)
    return dst


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` as a user would, capturing output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]
