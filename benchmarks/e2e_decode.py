"""The whole compiled Mixtral-shaped model on one GPU against transformers (issue 5), one device call.

    python benchmarks/e2e_decode.py --out $OUT [--layers 8] [--budget-s 520]

In order, each heavy part in its own process so GPU memory is returned between them:
  1. write the synthetic model of recipes/mixtral-8x7b-shape.yaml (bf16 checkpoint) as an HF dir
  2. `moe-compile` it for CUDA (timed: compile time)
  3. `moe-runtime bench`: ceilings (copy bandwidth, matmul rate), load, prefill tokens/s, decode
     tokens/s per batch with the roofline bound beside each number, NVML energy; and a profile of
     three decode steps per batch (kernels by time, stream busy shares: OUT/profile/)
  4. check: load the artifact, first token (load → first token time), logits and greedy tokens
     of several prompts; transformers eager in fp32 on the same weights (the exact answer: moec's
     error against it next to transformers bf16's error tells rounding from a bug); transformers
     eager in the checkpoint's dtype: the same logits (relative error ≤ 2e-2), greedy tokens, and
     its decode/prefill speed (the eager peer)
  5. transformers with experts_implementation="grouped_mm", static cache and generate's own
     torch.compile (mode "reduce-overhead"): decode speed per batch (the compiled peer),
     smallest batch first, while the time budget lasts
Writes e2e_decode.json and e2e_decode.png under --out; prints a table last. Parts that did not
fit the budget are named in the JSON and the output, never silently dropped.

On a device whose calls are capped below what all five parts take (600 s on the H200 lent here:
the compile alone takes ~260 s), run it in two calls, as phases:

    python benchmarks/e2e_decode.py --out $OUT --phases moec            # parts 1-4
    python benchmarks/e2e_decode.py --out $OUT --phases hf_compile \
        --resume-from benchmarks/results/e2e_decode-<that run>.json     # part 5, merged into it

The second writes the same synthetic model again where the first call's --work is gone (the
same seed gives the same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPTS = [
    "The mixture of experts",
    "Once upon a time, in a kitchen far away, a baker",
    "Printing presses changed how people shared ideas",
    "Seven small boats left the harbour at dawn",
]
START = time.perf_counter()


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to test this script's logic


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(*args) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s]", *args, file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float, env: dict | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a part; past `timeout` it is killed and returns code 124 with what it printed."""
    log("$", " ".join(cmd))
    pipe = subprocess.PIPE if capture else None
    try:
        return subprocess.run(cmd, timeout=max(timeout, 1), env={**os.environ, **(env or {})}, text=True,
                              stdout=pipe, stderr=subprocess.STDOUT if capture else None)
    except subprocess.TimeoutExpired as e:
        log(f"timed out after {timeout:.0f} s")
        printed = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, printed + "\n[timed out]\n", None)


# ------------------------------------------------------------------------------- roles (subprocesses)
def hf_decode_rate(model, batch: int, context: int, new_tokens: int, generator, warmup: bool = True, repeats: int = 2,
                   **generate_kwargs) -> dict:
    """Decode tokens/s of HF generate: (time for N tokens − time for 1 token) over (N − 1) steps,
    each the best of `repeats` calls, after a warm-up call unless `warmup` is False (an eager model
    already warmed at another batch: at batch 128 x 512 an offloaded model's prompt takes minutes,
    and five of them did not fit a device call)."""
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), generator=generator).to(device())
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=model.config.eos_token_id, **generate_kwargs)
        sync()
        return time.perf_counter() - t

    if warmup:
        timed(new_tokens)  # warm-up (and, for the compiled peer, compilation)
    first = min(timed(1) for _ in range(repeats))
    full = min(timed(new_tokens) for _ in range(repeats))
    decode_s = max(full - first, 1e-9)
    return {"batch": batch, "context": context, "decode_tokens": new_tokens, "prefill_s": first,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s, "step_ms": decode_s / (new_tokens - 1) * 1e3}


def hf_step_times(model, batch: int, context: int, new_tokens: int, generator, progress: bool = False,
                  on_step=None) -> dict:
    """Decode tokens/s of HF generate from ONE call: a logits processor reads the clock (after a
    sync) each time generate picks a token, so the prompt's time is the first reading and each
    decode step the gap between two. One prefill, where `hf_decode_rate` pays two: an offloaded
    model's 128 x 512-token prompt takes minutes. The step is the median gap. `on_step(row)`, if
    given, gets the row so far (`partial`: true) after each decode step: a caller stopped by its
    clock before generate returns keeps the steps it did time (the H100's accelerate run at batch
    128 was killed one second after its last token, 2026-12-07)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            if progress:
                log(f"  generate batch {batch} x {context} tokens: token {len(self.times)} at "
                    f"{self.times[-1] - start:.1f} s")
            if on_step is not None and len(self.times) >= 2:
                on_step({**step_row(batch, context, start, self.times), "partial": len(self.times) < new_tokens})
            return scores

    if new_tokens < 2:
        raise ValueError(f"hf_step_times: want new_tokens >= 2 to time a decode step, got {new_tokens}")
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device())
    clock = Clock()
    sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=model.config.eos_token_id, logits_processor=LogitsProcessorList([clock]))
    return step_row(batch, context, start, clock.times)


def step_row(batch: int, context: int, start: float, times: list[float]) -> dict:
    """`hf_step_times`' row from its clock readings (two or more): the prompt's time and the
    median gap between token picks as the decode step."""
    import statistics

    steps = [b - a for a, b in zip(times, times[1:])]
    step = statistics.median(steps)
    return {"batch": batch, "context": context, "decode_tokens": len(times), "prefill_s": times[0] - start,
            "decode_tokens_per_s": batch / step, "step_ms": step * 1e3, "step_times_ms": [t * 1e3 for t in steps],
            "timer": "one generate call; clock read after a sync at each token pick"}


def hf_prefill_rate(model, tokens: int, generator) -> dict:
    import torch

    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=generator).to(device())
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        sync()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t)
    best = sorted(times)[len(times) // 2]
    return {"prompt_tokens": tokens, "prefill_s": best, "prompt_tokens_per_s": tokens / best}


def argmax_or_tie(logits, tokens: list[int], rel: float = 2e-2) -> bool:
    """Whether each token is its row's argmax in `logits` [n, vocab], or within `rel` of the
    row's top value: a near tie, which bf16 rounding may settle either way."""
    import torch

    top = logits.max(dim=-1).values
    picked = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return bool((picked >= top - rel * top.abs()).all())


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def role_check(args) -> int:
    """moec's logits/tokens, then HF eager's on the same weights, then HF eager's speed."""
    import torch

    t0 = time.perf_counter()
    from moec.runtime import Engine

    engine = Engine.load(args.artifact)
    load_s = time.perf_counter() - t0
    first = engine.generate(PROMPTS[0], max_tokens=1)[0]
    first_token_s = time.perf_counter() - t0
    ids = [engine.encode(p) for p in PROMPTS]
    results = engine.generate(ids, max_tokens=16, record_logits=True)
    ours = [(r.token_ids, torch.stack(r.logits).float().cpu()) for r in results]
    # each prompt alone too: a gap between the batched and the lone run would point at batching
    alone = [engine.generate([i], max_tokens=16, record_logits=True)[0] for i in ids]
    alone = [(r.token_ids, torch.stack(r.logits).float().cpu()) for r in alone]
    capture_s = engine.decode_graphs.capture_s if engine.decode_graphs else None
    del engine, results, first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    # The same sequences through transformers in fp32 on the same (bf16) weights: the error both
    # bf16 engines make against it says whether a gap between them is bf16 rounding or a bug.
    sequences = [torch.tensor([prompt_ids + tokens[:-1]]) for prompt_ids, (tokens, _) in zip(ids, ours)]
    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="eager")
    hf = hf.to(device()).eval()
    exact, margins, fp32_greedy = [], [], []
    top_k = hf.config.num_experts_per_tok
    with torch.no_grad():
        for seq, p in zip(sequences, ids):
            out = hf(seq.to(device()), output_router_logits=True)
            exact.append(out.logits[0, len(p) - 1:].float().cpu())
            # fp32's own greedy tokens: where bf16 engines (HF's too) leave them says how close
            # this random model's logits come to ties
            fp32_greedy.append(hf.generate(torch.tensor([p], device=device()), max_new_tokens=16, do_sample=False,
                                           attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device()),
                                           pad_token_id=hf.config.eos_token_id)[0, len(p):].tolist())
            # how close each token's routing came to a tie at the top-k boundary (fp32): bf16
            # rounding flips a choice this close, and the flipped expert changes that token's
            # hidden state and every later token that attends to it
            probs = torch.stack([r.float().softmax(-1) for r in out.router_logits])  # [layers, T, E]
            ranked = probs.sort(-1, descending=True).values
            gap = ranked[..., top_k - 1] - ranked[..., top_k]
            layer, token = divmod(int(gap.argmin()), gap.shape[1])
            margins.append({"min_topk_gap": gap.min().item(), "layer": layer, "token": token})
    del hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    dtype = getattr(torch, json.loads((Path(args.artifact) / "manifest.json").read_text())["dtype"])
    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype, attn_implementation="eager")
    hf = hf.to(device()).eval()
    prompts = []
    with torch.no_grad():
        for p, prompt_ids, (tokens, logits), seq, fp32, margin, (alone_tokens, alone_logits), exact_tokens in zip(
                PROMPTS, ids, ours, sequences, exact, margins, alone, fp32_greedy):
            want = hf(seq.to(device())).logits[0, len(prompt_ids) - 1:].float().cpu()
            per_token = ((logits - want).norm(dim=-1) / want.norm(dim=-1))
            greedy = hf.generate(torch.tensor([prompt_ids], device=device()), max_new_tokens=16, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device()),
                                 pad_token_id=hf.config.eos_token_id)[0, len(prompt_ids):].tolist()
            prompts.append({
                "prompt": p,
                "logits_rel_error": ((logits - want).norm() / want.norm()).item(),
                "moec_vs_hf_fp32": ((logits - fp32).norm() / fp32.norm()).item(),
                "hf_vs_hf_fp32": ((want - fp32).norm() / fp32.norm()).item(),
                # the test is moec against HF in bf16 (<= 2e-2); where HF bf16 itself strays
                # from fp32 by more than that (a random model whose routing near-ties flip), this says
                # whether moec rounds any worse than transformers does: its error against fp32 within
                # 1.25x of HF bf16's (or within the 2e-2 tolerance itself)
                "moec_no_worse_than_hf_bf16": ((logits - fp32).norm() / fp32.norm()).item()
                <= max(1.25 * ((want - fp32).norm() / fp32.norm()).item(), 2e-2),
                "per_token_rel_error_max": per_token.max().item(),
                "tokens_over_2e-2": int((per_token > 2e-2).sum()),
                "greedy_identical_16": tokens == greedy[: len(tokens)],
                "first_divergence": _first_divergence(tokens, greedy),
                "every_pick_argmax_or_tie": argmax_or_tie(want, tokens),
                "moec_tokens": tokens, "hf_tokens": greedy,
                "prompt_tokens": len(prompt_ids),
                "hf_fp32_routing": margin,
                "alone_tokens_identical": alone_tokens == tokens,
                "hf_fp32_tokens": exact_tokens,
                "moec_vs_hf_fp32_first_divergence": _first_divergence(tokens, exact_tokens),
                "hf_bf16_vs_hf_fp32_first_divergence": _first_divergence(greedy, exact_tokens),
                "alone_vs_batched_rel": ((alone_logits[: len(logits)] - logits[: len(alone_logits)]).norm()
                                         / logits.norm()).item(),
            })
    out = {"load_s": load_s, "load_to_first_token_s": first_token_s, "graph_capture_s": capture_s,
           "prompts": prompts}
    log("check:", json.dumps({k: v for k, v in out.items() if k != "prompts"}),
        [(p["logits_rel_error"], p["greedy_identical_16"]) for p in prompts])
    Path(args.result).write_text(json.dumps(out))
    gen = torch.Generator().manual_seed(0)
    eager = {"decode": [], "prefill": None}
    deadline = time.perf_counter() + args.seconds
    for batch in args.batch_sizes:
        if time.perf_counter() > deadline:
            eager.setdefault("skipped", []).append(f"batch {batch}: time budget")
            continue
        try:
            eager["decode"].append(hf_decode_rate(hf, batch, args.context, 16, gen))
        except torch.OutOfMemoryError:  # transformers' default experts path gathers weights per token
            eager.setdefault("skipped", []).append(f"batch {batch}: out of GPU memory")
            torch.cuda.empty_cache()
            continue
        log("hf eager", eager["decode"][-1])
        out["hf_eager"] = eager
        Path(args.result).write_text(json.dumps(out))
    if time.perf_counter() < deadline:
        try:
            eager["prefill"] = hf_prefill_rate(hf, args.prefill, gen)
        except torch.OutOfMemoryError:
            eager.setdefault("skipped", []).append(f"prefill {args.prefill}: out of GPU memory")
        log("hf eager prefill", eager["prefill"])
    out["hf_eager"] = eager
    Path(args.result).write_text(json.dumps(out))
    return 0


def role_hf_compile(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.bfloat16, experts_implementation="grouped_mm")
    hf = hf.to(device()).eval()
    gen = torch.Generator().manual_seed(1)
    out = {"decode": [], "prefill": None, "skipped": []}
    deadline = time.perf_counter() + args.seconds
    for batch in args.batch_sizes:
        if time.perf_counter() > deadline:
            out["skipped"].append(f"batch {batch}: time budget")
            continue
        try:
            out["decode"].append(hf_decode_rate(hf, batch, args.context, 32, gen, cache_implementation="static"))
        except torch.OutOfMemoryError:
            out["skipped"].append(f"batch {batch}: out of GPU memory")
            torch.cuda.empty_cache()
            continue
        log("hf grouped_mm+compile", out["decode"][-1])
        Path(args.result).write_text(json.dumps(out))
    if time.perf_counter() < deadline:
        try:
            out["prefill"] = hf_prefill_rate(hf, args.prefill, gen)
        except torch.OutOfMemoryError:
            out["skipped"].append(f"prefill {args.prefill}: out of GPU memory")
    Path(args.result).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------- main
def write_model(recipe_path: Path, layers: int, hf_dir: Path) -> dict:
    import yaml

    from moec.compiler.synthetic import write_synthetic_model

    recipe = yaml.safe_load(recipe_path.read_text())
    syn = recipe["model"]["synthetic"]
    syn["config"]["num_hidden_layers"] = layers
    t = time.perf_counter()
    write_synthetic_model(syn["architecture"], syn["config"], syn["seed"], hf_dir, progress=log,
                          dtype=syn.get("dtype", "float32"), init_device=device())
    log(f"wrote the {layers}-layer model in {time.perf_counter() - t:.0f} s")
    recipe["model"] = {"path": str(hf_dir)}
    recipe["name"] = f"{recipe['name']}-{layers}l"
    return recipe


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result.get("moec", {}).get("decode", [])
    if rows:
        b = [r["batch"] for r in rows]
        ax.plot(b, [r["bound_tokens_per_s"] for r in rows], "k--", label="roofline bound")
        ax.plot(b, [r["decode_tokens_per_s"] for r in rows], "o-", label="moec")
    for key, label in (("hf_eager", "transformers eager"), ("hf_compile", "transformers grouped_mm + compile")):
        peer = (result.get(key) or {}).get("decode", [])
        if peer:
            ax.plot([r["batch"] for r in peer], [r["decode_tokens_per_s"] for r in peer], "s-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoding together, 512-token context)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result.get('model')} on {result.get('device')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict) -> str:
    lines = [f"{result.get('model')} | {result.get('device')} | compile {result.get('compile_s', 0):.0f} s | "
             f"load→first token {result.get('check', {}).get('load_to_first_token_s', float('nan')):.1f} s"]
    peers = {k: {r["batch"]: r for r in (result.get(k) or {}).get("decode", [])} for k in ("hf_eager", "hf_compile")}
    lines.append(f"{'batch':>5} {'moec tok/s':>11} {'bound':>9} {'% bound':>8} {'HF eager':>9} {'HF compile':>10}")
    for r in result.get("moec", {}).get("decode", []):
        e, c = peers["hf_eager"].get(r["batch"]), peers["hf_compile"].get(r["batch"])
        lines.append(f"{r['batch']:>5} {r['decode_tokens_per_s']:>11.1f} {r['bound_tokens_per_s']:>9.1f} "
                     f"{r['achieved_percent_of_bound']:>7.1f}% {e['decode_tokens_per_s'] if e else float('nan'):>9.1f} "
                     f"{c['decode_tokens_per_s'] if c else float('nan'):>10.1f}")
    for c in result.get("check", {}).get("prompts", []):
        lines.append(f"{c['prompt'][:28]:<28} vs HF fp32: moec {c.get('moec_vs_hf_fp32', float('nan')):.4f}, "
                     f"HF {c.get('hf_vs_hf_fp32', float('nan')):.4f} | moec vs HF {c['logits_rel_error']:.4f} | "
                     f"greedy 16 same: {c['greedy_identical_16']} | no worse than HF bf16: "
                     f"{c.get('moec_no_worse_than_hf_bf16')} | leaves fp32's greedy at: moec "
                     f"{c.get('moec_vs_hf_fp32_first_divergence')}, HF bf16 {c.get('hf_bf16_vs_hf_fp32_first_divergence')}")
    p = result.get("moec", {}).get("prefill")
    if p:
        lines.append(f"prefill {p['prompt_tokens']} tokens: moec {p['prompt_tokens_per_s']:.0f} tok/s "
                     f"({p.get('achieved_percent_of_bound', float('nan')):.1f}% of bound)")
    return "\n".join(lines)


def measure(args, result: dict, save, work: Path, out: Path, deadline: float, reserve: float = 0.0,
            first: bool = True) -> None:
    """moec's bench, then the check (logits, tokens, HF eager's speed), then (first run only, if
    the budget allows) HF grouped_mm + compile, into `result`, saved after each part; `reserve`
    seconds of the budget stay for later repeats."""
    bench_json = work / "moec_bench.json"
    proc = run([sys.executable, "-m", "moec.runtime", "bench", str(work / "artifact"), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
                "--context", str(args.context), "--decode-tokens", "64", "--prefill-tokens", str(args.prefill),
                "--json", str(bench_json), "--no-verify", *(["--profile", str(out / "profile")] if first else [])],
               timeout=deadline - time.perf_counter())
    print(proc.stdout[-16000:], file=sys.stderr)  # the bench table and every batch's profile table
    if bench_json.is_file():
        result["moec"] = json.loads(bench_json.read_text())
    save()

    check_json = work / "check.json"
    left = deadline - time.perf_counter()
    proc = run([sys.executable, __file__, "--role", "check", "--artifact", str(work / "artifact"),
                "--hf-dir", str(work / "hf"), "--result", str(check_json), "--seconds", str(max(left - reserve - 150, 20)),
                "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--context", str(args.context),
                "--prefill", str(args.prefill)], timeout=left)
    print(proc.stdout[-3000:], file=sys.stderr)
    if check_json.is_file():
        check = json.loads(check_json.read_text())
        result["hf_eager"] = check.pop("hf_eager", None)
        result["check"] = check
    save()

    left = deadline - time.perf_counter() - reserve
    if "hf_compile" not in args.phases:
        result["skipped"].append("hf grouped_mm + compile: not in --phases (run --phases hf_compile --resume-from)")
    elif first and left > 60:
        measure_hf_compile(args, result, work, left)
    else:
        result["skipped"].append("hf grouped_mm + compile: time budget")
    save()


def measure_hf_compile(args, result: dict, work: Path, seconds: float) -> None:
    """Part 5, transformers grouped_mm + static cache + compile, in a process of its own."""
    compile_json = work / "hf_compile.json"
    proc = run([sys.executable, __file__, "--role", "hf_compile", "--hf-dir", str(work / "hf"),
                "--result", str(compile_json), "--seconds", str(seconds - 50),
                "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--context", str(args.context),
                "--prefill", str(args.prefill)], timeout=seconds)
    print(proc.stdout[-3000:], file=sys.stderr)
    if compile_json.is_file():
        result["hf_compile"] = json.loads(compile_json.read_text())


def resume_hf_compile(args, out: Path, work: Path, deadline: float) -> int:
    """`--phases hf_compile`: part 5 alone, merged into the result of an earlier `--phases moec`."""
    if not args.resume_from or not Path(args.resume_from).is_file():
        print(f"e2e_decode: --phases hf_compile needs --resume-from RESULT.json of a '--phases moec' run "
              f"(got {args.resume_from!r})", file=sys.stderr)
        return 2
    result = json.loads(Path(args.resume_from).read_text())
    if not (work / "hf" / "config.json").is_file():
        write_model(Path(args.recipe), args.layers, work / "hf")
    measure_hf_compile(args, result, work, deadline - time.perf_counter())
    result["skipped"] = [s for s in result.get("skipped", []) if not s.startswith("hf grouped_mm + compile")]
    result["hf_compile_date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "e2e_decode.json").write_text(json.dumps(result, indent=1))
    return finish(args, result, out, work)


def finish(args, result: dict, out: Path, work: Path) -> int:
    """The plot, the table last, and --work removed unless kept."""
    plot(result, out / "e2e_decode.png")
    print(table(result))
    if not args.keep_work:  # the model and the artifact, tens of GB: a later call on the same disk needs it
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["main", "check", "hf_compile"], default="main")
    parser.add_argument("--out", default=".")
    parser.add_argument("--work", default="/tmp/moec-e2e")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "mixtral-8x7b-shape.yaml"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=520)
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--artifact")
    parser.add_argument("--hf-dir")
    parser.add_argument("--result")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--keep-work", action="store_true",
                        help="keep --work (the written model and the compiled artifact) after the run; "
                             "by default it is removed, as it fills tens of GB of the device's disk")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure the compiled model this many times (e2e_decode-rK.json for K > 1): "
                             "gpu_gate.sh --flicker checks that the gates hold on every one")
    parser.add_argument("--repeat-s", type=float, default=75,
                        help="seconds one repeat needs (bench + check); budgeted before HF compile")
    parser.add_argument("--phases", default="moec,hf_compile",
                        help="moec: parts 1-4; hf_compile: part 5 (alone: with --resume-from)")
    parser.add_argument("--resume-from", help="an earlier '--phases moec' result to add part 5 to")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - {"moec", "hf_compile"})
    if unknown or not args.phases:
        parser.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; choose from moec, hf_compile")
    if args.repeat < 1:
        parser.error(f"--repeat wants a number of runs >= 1, got {args.repeat}")
    if args.role == "check":
        return role_check(args)
    if args.role == "hf_compile":
        return role_hf_compile(args)

    import torch
    import yaml

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = START + args.budget_s
    if "moec" not in args.phases:
        return resume_hf_compile(args, out, work, deadline)
    result = {"benchmark": "e2e_decode", "model": f"{Path(args.recipe).stem}, {args.layers} layers",
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "versions": {"torch": torch.__version__}, "skipped": []}
    try:
        import transformers
        import triton

        result["versions"].update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save = lambda: (out / "e2e_decode.json").write_text(json.dumps(result, indent=1))  # noqa: E731

    recipe = write_model(Path(args.recipe), args.layers, work / "hf")
    if device() == "cpu":
        recipe.update(device="cpu", max_batch=max(*args.batch_sizes, len(PROMPTS)))
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    t = time.perf_counter()
    proc = run([sys.executable, "-m", "moec.compiler", str(work / "recipe.yaml"), "--output", str(work / "artifact")],
               timeout=deadline - time.perf_counter())
    print(proc.stdout[-8000:], file=sys.stderr)  # its stages, the tuning table; the error, if any
    result["compile_s"] = time.perf_counter() - t
    if proc.returncode != 0:
        result["error"] = "compile timed out" if proc.returncode == 124 else "compile failed"
        result["compile_output_tail"] = proc.stdout.splitlines()[-40:]  # why, kept with the result
        save()
        return 1
    # what the compile-time tuner chose per token bucket (and every candidate's time): the MoE
    # kernels' configs behind the prefill and decode numbers
    result["moe_tuning"] = json.loads((work / "artifact" / "manifest.json").read_text()).get("kernels", {}).get("moe")
    save()

    measure(args, result, save, work, out, deadline, reserve=(args.repeat - 1) * args.repeat_s)
    for k in range(2, args.repeat + 1):  # the same artifact measured again (gpu_gate.sh --flicker)
        if time.perf_counter() + args.repeat_s > deadline:
            log(f"repeat {k} of {args.repeat}: not enough of the budget left; stopping")
            break
        again = {**{key: result[key] for key in ("benchmark", "model", "device", "versions", "compile_s")},
                 "skipped": [], "repeat": k, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = out / f"e2e_decode-r{k}.json"
        measure(args, again, lambda r=again, path=path: path.write_text(json.dumps(r, indent=1)), work, out, deadline,
                reserve=(args.repeat - k) * args.repeat_s, first=False)
    return finish(args, result, out, work)


if __name__ == "__main__":
    sys.exit(main())
