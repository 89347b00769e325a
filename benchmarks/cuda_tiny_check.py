"""GPU smoke check of the whole path: compile the tiny Mixtral for CUDA (bf16), then compare the
artifact's logits and greedy tokens with transformers eager on the same weights and GPU.

    python benchmarks/cuda_tiny_check.py --out $OUT [--offload]

--offload also compiles the same weights offloaded with attention and the KV cache on the CPU
and 2 micro-batches (every expert layer streamed through the double buffer, a batch-1 expert
cache), with the experts kept in host memory while compiling (`host_experts`, the path a model
larger than the GPU takes), and compares its greedy tokens and logits with the plain artifact's
on the same GPU: the pager's copy stream, the micro-batch threads and `external_attention` on
CUDA. (`--device cpu` in bf16 reports a logits difference of 0.36 of their scale on the first
prompt at its 5th generated token, tokens identical, with either compile path; in float32 they
agree to 1e-6. That position is a routing near-tie: in transformers eager on the same weights,
layer 0's second and third experts there differ by 0.0012 in router probability, the smallest
margin of the sequence, so the offloaded artifact's fp32 host attention and the plain one's bf16
attention pick different experts. Checked on CPU, 2026-12-06.)
Writes cuda_tiny_check.json; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The mixture of experts", "Once upon a time, in a kitchen far away, a baker", "Rain"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work", help="working directory (default: a new temp dir)")
    parser.add_argument("--offload", action="store_true", help="also check an offloaded artifact (placement cpu)")
    parser.add_argument("--device", default="cuda", help="cpu: run the script's logic without a GPU")
    args = parser.parse_args()

    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from e2e_decode import argmax_or_tie  # the tie rule of the 8-layer check
    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe
    from moec.compiler.synthetic import write_synthetic_model
    from moec.runtime import Engine
    from moec.runtime.kv_cache import SequenceBlocks, build_step_inputs

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-mixtral.yaml").read_text())
    syn = recipe["model"]["synthetic"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="moec-cuda-"))
    model_dir = write_synthetic_model(syn["architecture"], syn["config"], syn["seed"], work / "hf")
    recipe.update(model={"path": str(model_dir)}, device=args.device, dtype=args.dtype, name="tiny-mixtral-cuda")
    start = time.perf_counter()
    compile_recipe(parse_recipe(recipe), work / "artifact", console=Console(stderr=True))
    compile_s = time.perf_counter() - start
    engine = Engine.load(work / "artifact")
    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(args.device).eval()

    rel_errors, token_matches, ties = [], [], []
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        blocks = SequenceBlocks()
        blocks.ensure_capacity(engine.allocator, len(ids), engine.spec.kv_block_size)
        inputs = build_step_inputs([(blocks.blocks, ids, 0, True)], device=engine.device, all_logits=True)
        got = engine.step_fn(inputs["input_ids"], inputs["positions"], inputs["seq_ids"], inputs["block_tables"],
                             engine.kv_cache, inputs["logits_indices"]).float()
        blocks.release(engine.allocator)
        with torch.no_grad():
            want = hf(torch.tensor([ids], device=args.device)).logits[0].float()
        rel_errors.append(((got - want).norm() / want.norm()).item())
        out = engine.generate(prompt, max_tokens=16)[0].token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids], device=args.device), max_new_tokens=16, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=args.device),
                              pad_token_id=hf.config.eos_token_id)[0, len(ids):].tolist()
        token_matches.append(out == ref[: len(out)])
        # where the tokens part: is each of moec's picks HF's argmax, or within 2e-2 of it (a near
        # tie that bf16 rounding may settle either way)? HF scores moec's own sequence
        with torch.no_grad():
            seq = torch.tensor([ids + out[:-1]], device=args.device)
            scored = hf(seq).logits[0, len(ids) - 1:].float()
        ties.append(argmax_or_tie(scored, out))

    engine.generate(PROMPTS, max_tokens=64, ignore_eos=True)
    results = engine.generate(PROMPTS, max_tokens=64, ignore_eos=True)
    result = {
        "benchmark": "cuda_tiny_check",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "dtype": args.dtype,
        "compile_s": compile_s,
        "logits_rel_error": rel_errors,
        "greedy_16_identical": token_matches,
        "greedy_16_argmax_or_tie": ties,
        "tokens_per_s_batch3": engine.stats.tokens_per_s,
        "generated": sum(len(r.token_ids) for r in results),
    }
    ok = True
    if args.offload:
        result["offload"] = offload_check(recipe, work, engine)
        ok = result["offload"]["ok"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cuda_tiny_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    # tokens identical, or each pick HF's argmax or a near tie with it (the tiny model's 'Rain'
    # parts from HF at a near tie in every run since 2026-11-23, H100 and H200 alike)
    ok = ok and max(rel_errors) <= 2e-2 and all(m or t for m, t in zip(token_matches, ties))
    print("CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def offload_check(recipe: dict, work: Path, plain) -> dict:
    """The plain artifact's weights offloaded (placement cpu, 2 micro-batches, no expert layer
    resident) against the plain artifact: greedy tokens of 4 prompts at once (two micro-batches)
    and of one alone (the expert cache), and the logits' largest difference over their scale."""
    from rich.console import Console

    from moec.compiler.pipeline import compile_recipe
    from moec.compiler.recipe import parse_recipe
    from moec.runtime import Engine

    offload = {"gpu_memory": "64MiB", "host_memory": "4GiB", "workload": {"prompt_len": 64, "gen_len": 32},
               "policy": {"batch": 4, "micro_batches": 2, "placement": "cpu", "resident_expert_layers": 0,
                          "cache_experts": 4}}
    start = time.perf_counter()
    # experts in host memory while compiling, as for a model larger than the GPU (this one fits)
    compile_recipe(parse_recipe({**recipe, "name": "tiny-mixtral-offload", "offload": offload}), work / "offloaded",
                   console=Console(stderr=True), experts_on_host=True)
    compile_s = time.perf_counter() - start
    engine = Engine.load(work / "offloaded")
    prompts = [*PROMPTS, "a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    out = {"compile_s": compile_s, "policy": offload["policy"], "prompts": []}
    for batch in (prompts, [PROMPTS[1]]):
        want = plain.generate(batch, max_tokens=16, record_logits=True)
        got = engine.generate(batch, max_tokens=16, record_logits=True)
        for a, b in zip(want, got):
            same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
            pairs = [(x.float(), y.float()) for x, y in zip(a.logits[:same + 1], b.logits[:same + 1])]
            out["prompts"].append({
                "batch": len(batch), "identical_tokens": same, "of": len(a.token_ids),
                # the HF check's measure (per step, norm of the difference over the norm), and the worst element
                "logits_rel_error": max(((x - y).norm() / x.norm()).item() for x, y in pairs),
                "logits_max_err_over_max": max(((x - y).abs().max() / x.abs().max()).item() for x, y in pairs)})
    out["pager"] = engine.expert_pager.stats()
    out["micro_batch_steps"] = engine.micro_batches.steps
    out["host_attention_calls"] = engine.host_attention.calls
    # bf16 on both sides, but attention on the CPU (SDPA) against the GPU kernel: near ties may flip a token
    out["ok"] = (all(p["logits_rel_error"] <= 2e-2 for p in out["prompts"])
                 and sum(p["identical_tokens"] == p["of"] for p in out["prompts"]) >= len(out["prompts"]) - 1
                 and out["micro_batch_steps"] > 0 and out["pager"]["copies"] > 0)
    return out


if __name__ == "__main__":
    sys.exit(main())
