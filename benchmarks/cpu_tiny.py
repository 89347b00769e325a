"""CPU, tiny Mixtral: compile time, artifact size, load time, and tokens/s against transformers eager.

One run measures everything on the same machine:
    .venv/bin/python benchmarks/cpu_tiny.py [--out benchmarks/results]
Greedy decoding of a fixed number of tokens (EOS ignored on both sides), medians of repeats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The mixture of experts",
    "Once upon a time, in a kitchen far away, a baker",
    "Rain fell on the old printing house while",
    "Compilers turn programs into",
    "A storm crossed the valley and",
    "Weather in the mountains changes",
    "The history of bread begins",
    "Every expert in the mixture",
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe
    from moec.compiler.synthetic import write_synthetic_model
    from moec.runtime import Engine
    from moec.runtime.ceilings import median_time_s

    recipe_data = yaml.safe_load((ROOT / "recipes" / "tiny-mixtral.yaml").read_text())
    syn = recipe_data["model"]["synthetic"]
    work = Path(tempfile.mkdtemp(prefix="moec-bench-"))
    model_dir = write_synthetic_model(syn["architecture"], syn["config"], syn["seed"], work / "hf")
    recipe_data["model"] = {"path": str(model_dir)}
    artifact = work / "artifact"

    start = time.perf_counter()
    compile_recipe(parse_recipe(recipe_data), artifact, console=Console(stderr=True, quiet=True))
    compile_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())

    # load time in a fresh process: this one already has the compiled library mapped
    probe = (
        "import time, sys; t0 = time.perf_counter(); from moec.runtime import Engine; t1 = time.perf_counter(); "
        f"Engine.load({str(artifact)!r}); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    loads = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
             for _ in range(3)]
    import_s = statistics.median(float(x[0]) for x in loads)
    load_s = statistics.median(float(x[1]) for x in loads)
    engine = Engine.load(artifact)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    n = args.tokens
    rows = []
    for batch in (1, 4, 8):
        prompts = PROMPTS[:batch]
        encoded = [engine.encode(p) for p in prompts]

        def run_moec():
            out = engine.generate(encoded, max_tokens=n, ignore_eos=True)
            assert all(len(r.token_ids) == n for r in out)

        width = max(len(e) for e in encoded)
        pad = hf.config.eos_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])

        def run_hf():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=pad)
            assert out.shape[1] == width + n

        run_moec(), run_hf()  # warm-up
        cpu = torch.device("cpu")
        t_moec = median_time_s(run_moec, cpu, warmup=0, iters=args.repeats)
        t_hf = median_time_s(run_hf, cpu, warmup=0, iters=args.repeats)
        rows.append({
            "batch": batch,
            "new_tokens_per_seq": n,
            "moec_tokens_per_s": batch * n / t_moec,
            "hf_eager_tokens_per_s": batch * n / t_hf,
            "speedup": t_hf / t_moec,
        })

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    import tokenizers
    import transformers

    result = {
        "benchmark": "cpu_tiny",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": {"kind": "cpu", "processor": platform.processor() or platform.machine(),
                   "cores": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "model": {"recipe": "recipes/tiny-mixtral.yaml", **syn["config"]},
        "metrics": [
            {"name": "compile_time", "value": compile_s, "unit": "s", "direction": "lower"},
            {"name": "artifact_size", "value": size, "unit": "bytes", "direction": "lower"},
            {"name": "load_time", "value": load_s, "unit": "s", "direction": "lower",
             "note": "Engine.load in a fresh process, checksums verified; median of 3"},
            {"name": "runtime_import_time", "value": import_s, "unit": "s", "direction": "lower"},
        ],
        "decode": rows,
        "peer": "transformers eager (generate, dynamic KV cache), same weights, same machine, same run",
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"cpu_tiny-{dt.date.today().isoformat()}.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")

    print(f"compile {compile_s:.1f}s   artifact {size / 1e6:.2f} MB   import {import_s:.2f}s   load {load_s:.2f}s"
          f"   → {out_file}")
    print(f"{'batch':>5}  {'moec tok/s':>10}  {'hf eager tok/s':>14}  {'speedup':>7}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['moec_tokens_per_s']:>10.1f}  {r['hf_eager_tokens_per_s']:>14.1f}  {r['speedup']:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
