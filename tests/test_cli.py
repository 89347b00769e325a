"""The user-facing commands on the tiny artifact, and the runtime's light dependencies."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import run_cli


def test_generate_prints_text_and_speed(tiny_artifact):
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "The mixture of experts",
                   "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The mixture of experts")
    assert len(proc.stdout.strip()) > len("The mixture of experts")
    assert "tokens/s" in proc.stderr and "time to first token" in proc.stderr


def test_generate_batch_of_prompts(tiny_artifact):
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--prompt",
                   "Once upon a time", "--max-tokens", "6", "--temperature", "0.8", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("---") == 2


def logprob_lines(stdout: str) -> list[str]:
    """The per-token lines of `generate --logprobs` (the completion's own text may hold any
    character, "\v" and "\n" included, so lines are picked by their form, not their place)."""
    return [line for line in stdout.split("\n") if re.match(r'^ +".*" +-?\d+\.\d{4}', line)]


def test_generate_logprobs_and_logit_bias(tiny_artifact):
    """--logprobs prints one line per token with the top-N; a +100 --logit-bias makes greedy decoding
    pick that token every time, and that token's log-probability (before the bias) is printed;
    --min-tokens 4 holds that token, also a stop token, off until the fifth token, which ends the output."""
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--max-tokens", "5",
                   "--logprobs", "2", "--logit-bias", "7=100", "--presence-penalty", "0.5",
                   "--repetition-penalty", "1.1", "--min-tokens", "4", "--stop-token-id", "7", "--min-p", "0.1")
    assert proc.returncode == 0, proc.stderr
    lines = logprob_lines(proc.stdout)
    assert len(lines) == 5
    for line in lines:
        text, logprob, rest = line.split(maxsplit=2)
        assert float(logprob) <= 0 and rest.startswith("top: ") and rest.count('"') == 4
    pieces = [line.split()[0] for line in lines]
    assert pieces[4] not in pieces[:4]  # the biased token, held off by min_tokens, then ends it
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--max-tokens", "3",
                   "--logprobs", "0", "--logit-bias", "7=100")
    assert [line.split()[0] for line in logprob_lines(proc.stdout)] == [pieces[4]] * 3


def test_generate_bad_sampling_flags(tiny_artifact):
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--logprobs", "21")
    assert proc.returncode != 0 and "logprobs must be in [0, 20]" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--logit-bias", "7:100")
    assert proc.returncode == 2 and "'7:100' is not TOKEN_ID=BIAS" in proc.stderr


def test_ep_chunks_is_checked(tiny_artifact):
    """--ep-chunks sets the overlap of an expert-parallel artifact (tests/test_expert_parallel_runtime.py
    runs chunks 1 and 3 through Engine.load); anywhere else, and below 1, it is a one-line error."""
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--ep-chunks", "2")
    assert proc.returncode != 0 and "not expert-parallel" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("moec.runtime", "generate", str(tiny_artifact), "--prompt", "Rain", "--ep-chunks", "0")
    assert proc.returncode == 2 and "--ep-chunks: '0' is not an integer >= 1" in proc.stderr


def test_served_model_name_is_checked(tiny_artifact):
    """`serve --served-model-name` (used in tests/test_server.py) refuses a name with spaces before loading."""
    proc = run_cli("moec.runtime", "serve", str(tiny_artifact), "--served-model-name", "my model")
    assert proc.returncode == 2 and "--served-model-name: 'my model' is not a model name" in proc.stderr


def test_inspect_human_and_json(tiny_artifact):
    proc = run_cli("moec.runtime", "inspect", str(tiny_artifact))
    assert proc.returncode == 0, proc.stderr
    assert "MixtralForCausalLM" in proc.stdout and "native code" in proc.stdout
    proc = run_cli("moec.runtime", "inspect", str(tiny_artifact), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["format_version"] == 1
    assert len(data["moe_regions"]) == 2
    assert data["contains_native_code"] is True
    assert set(data["files"]) >= {"model.pt2", "weights.safetensors", "tokenizer/tokenizer.json"}


def test_runtime_does_not_import_compiler_or_transformers(tiny_artifact):
    code = (
        "import sys, moec.runtime\n"
        f"e = moec.runtime.Engine.load({str(tiny_artifact)!r})\n"
        "e.generate('hi', max_tokens=2)\n"
        "bad = [m for m in sys.modules if m == 'transformers' or m.startswith(('transformers.', 'moec.compiler'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_no_pickle_in_artifact(tiny_artifact):
    """Nothing in an artifact is loaded with torch.load or pickle: no pickle files at all."""
    import zipfile

    for path in tiny_artifact.rglob("*"):
        assert path.suffix not in {".pt", ".pth", ".pkl", ".bin"}, path
    with zipfile.ZipFile(tiny_artifact / "model.pt2") as z:
        assert not [n for n in z.namelist() if n.endswith((".pkl", "data.pkl"))]
