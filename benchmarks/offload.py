"""Offloaded Mixtral-8x7B-shaped model on a GPU capped below its size (issue 8), one device call.

    python benchmarks/offload.py --out $OUT [--layers 16] [--gpu-memory 24GiB] [--budget-s 560]
                                 [--policy JSON] [--phases compile,moec,accelerate,report]

In order, each heavy part in its own process:
  1. compile: `moe-compile --profile-hardware` (this machine's host link, GPU and CPU figures),
     then `moe-compile` of recipes/mixtral-8x7b-shape.yaml's synthetic model with --layers layers
     (bf16, drawn by the compiler, which keeps no second copy on disk) and `offload: {gpu_memory,
     hardware: the profile, workload: 512 + 128}`, in a process capped at --gpu-memory as the run
     is (the experts stay in host memory while compiling): the plan (batch, micro-batches,
     placement, resident layers, expert cache), its predicted tokens/s, the compiler's peak GPU
     memory
  2. moec: with the process capped at --gpu-memory (`set_per_process_memory_fraction`):
     `moe-runtime bench` at batch 1 and at the plan's batch (512-token prompts, 128 generated):
     decode tokens/s, expert bytes copied per step, the link's busy share; then 3 decode steps
     of each batch under the CUDA profiler, the plan's drawn as a timeline of the copy stream
     against the compute stream
  3. accelerate: the artifact deleted, the same model written as an HF directory, then
     transformers + accelerate `device_map="auto"` with the same GPU budget, at the same batches
     (the offload a user has today; its resident weights leave room for each batch's cache and
     activations), while the time budget lasts
  4. report: the rows, plot and table below
Each phase saves into --work/offload.json and --out; `--phases moec,accelerate,report` resumes a
run whose compile took an earlier device call (on a machine kept warm between the calls), and
`--resume-from RESULT.json` seeds a fresh --work from a committed result, e.g. to add the
accelerate baseline at one batch in a call of its own:
    --phases accelerate,report --resume-from benchmarks/results/offload-h200-2026-12-03.json
    --accelerate-batches 128
The bound at each batch: the expert bytes a step must stream over the measured host-to-device
bandwidth. Writes offload.json, offload.png (tokens/s) and offload_timeline.png under --out;
prints a table last. With --recipe recipes/tiny-mixtral.yaml it runs on CPU to test its logic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e_decode import device, hf_step_times, log, run, write_model  # noqa: E402

PROMPT, GEN = 512, 128


def gib(text: str) -> int:
    from pydantic import ByteSize, TypeAdapter

    return int(TypeAdapter(ByteSize).validate_python(text))


def cap_gpu(limit: int) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(0).total_memory))


# ------------------------------------------------------------------------------- roles (subprocesses)
def role_compile(args) -> int:
    """`moe-compile` under the same GPU cap as the run: an offloaded model compiles on a GPU that
    cannot hold it (the experts stay in host memory). Writes the compiler's exit code and its
    peak GPU memory to --result."""
    import torch

    from moec.compiler.cli import main as moe_compile

    cap_gpu(gib(args.gpu_memory))
    rc = moe_compile([args.recipe, "--output", args.artifact])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    Path(args.result).write_text(json.dumps({"rc": rc, "peak_gpu_bytes": peak}))
    return rc


def role_moec(args) -> int:
    from moec.runtime.bench import BenchSettings, run_bench

    cap_gpu(gib(args.gpu_memory))
    plan = json.loads((Path(args.artifact) / "manifest.json").read_text())["offload"]
    batches = sorted({1, int(plan["policy"]["batch"])})
    settings = BenchSettings(batch_sizes=tuple(batches), context=args.context, decode_tokens=args.gen,
                             prefill_tokens=args.context, repeats=1)

    def keep(partial: dict) -> None:  # each row as it is measured: a run stopped by its clock keeps them
        Path(args.result).write_text(json.dumps({"partial": partial}))

    # --profile: 3 decode steps per batch (and the 512-token prompt) under the CUDA profiler, in
    # the same process (a second engine would not fit the capped GPU beside the first); the
    # plan's batch's trace is drawn as the copy-vs-compute timeline
    bench = run_bench(args.artifact, settings, verify=False, cuda_graphs=False, progress=keep,
                      profile_dir=Path(args.result).parent / "profile")
    result = {"bench": bench, "trace": (bench.get("offload") or {}).get("profiled_trace")}
    Path(args.result).write_text(json.dumps(result))
    return 0


def accelerate_headroom(config, batch: int, context: int, new_tokens: int) -> int:
    """GPU bytes HF generate needs beside the weights at `batch`: its KV cache, and the prompt's
    activations (hidden states, attention, the experts' intermediates; generous: an estimate)."""
    from moec.compiler.step import head_dim

    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim(config) * 2 * batch * (context + new_tokens)
    tokens = batch * context
    activations = tokens * (16 * config.hidden_size + 3 * config.intermediate_size) * 2
    # accelerate moves an offloaded module's weights to the GPU whole for its forward: one layer's
    # experts (2.6 GiB for Mixtral), twice for the allocator's fragments. An H100 run at 24 GiB ran
    # out of memory at batch 1 with room left for the cache and activations only; at large batches
    # the activations' room (freed by then) holds them.
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = 3 * (getattr(config, "num_local_experts", None) or config.num_experts) * config.hidden_size * inter * 2
    return kv + max(activations, 2 * experts) + (1 << 30)


def role_accelerate(args) -> int:
    """transformers + accelerate `device_map="auto"` under the GPU cap, as a user would run it:
    the weights it keeps on the GPU leave room for the batch's cache and activations (the whole
    budget at batch 1 left none at batch 128: out of memory), reloaded with less on a batch that
    needs more, and with less again if that still runs out of memory."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {"decode": [], "skipped": [], "loads": []}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        out["skipped"].append("accelerate is not installed here")
        Path(args.result).write_text(json.dumps(out))
        return 0
    limit = gib(args.gpu_memory)
    cap_gpu(limit)
    cuda = torch.cuda.is_available()
    config = AutoConfig.from_pretrained(args.hf_dir)
    model, weights_budget = None, None

    def load(budget: int):
        nonlocal model, weights_budget
        model = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        max_memory = {0: max(budget, 0), "cpu": 400 << 30} if cuda else None
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory=max_memory).eval()
        weights_budget = budget
        out["loads"].append({"max_memory_gpu": budget, "load_s": time.perf_counter() - t})
        log(f"accelerate: loaded with {budget / 2**30:.1f} GiB for weights on the GPU in {out['loads'][-1]['load_s']:.0f} s")
        Path(args.result).write_text(json.dumps(out))  # what a run stopped by its clock did get to

    gen = torch.Generator().manual_seed(0)
    deadline = time.perf_counter() + args.seconds
    for batch in args.batches:
        want = limit - accelerate_headroom(config, batch, args.context, 4)
        for attempt in range(3):
            if time.perf_counter() > deadline:
                out["skipped"].append(f"batch {batch}: time budget")
                break
            if model is None or weights_budget > want:
                load(want)
            resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
            try:
                hf_step_times(model, 1, 16, 2, gen)  # CUDA and cuBLAS set up, not timed
                # warmed up by a short generate after each load; then one generate call, its steps timed
                # from inside (one prompt of batch x context tokens: two, at 128 x 512, did not finish in
                # 477 s on the H200)
                def keep(partial: dict) -> None:  # steps timed so far, for a run its clock stops
                    Path(args.result).write_text(json.dumps(
                        {**out, "decode": [*out["decode"], {**partial, "resident_gpu_bytes": resident,
                                                            "max_memory_gpu": weights_budget}]}))

                row = hf_step_times(model, batch, args.context, 5, gen, progress=True, on_step=keep)
            except torch.OutOfMemoryError:
                want = int(weights_budget * 0.6)
                if attempt == 2:
                    out["skipped"].append(f"batch {batch}: out of GPU memory with {resident / 2**30:.1f} GiB "
                                          "of weights resident")
                continue
            out["decode"].append({**row, "resident_gpu_bytes": resident, "max_memory_gpu": weights_budget})
            break
        Path(args.result).write_text(json.dumps(out))
    Path(args.result).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------- main
def timeline(trace_path: Path, png: Path) -> dict:
    """Copy-stream and compute-stream activity of the traced steps, drawn; busy shares returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in json.loads(trace_path.read_text()).get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not events:
        return {}
    t0 = min(e["ts"] for e in events)
    span = max(e["ts"] + e["dur"] for e in events) - t0
    lanes: dict[str, list] = {}
    for e in events:
        kind = "copy (host→GPU)" if e["cat"] == "gpu_memcpy" else "compute"
        lanes.setdefault(f"{kind}, stream {e.get('tid')}", []).append(((e["ts"] - t0) / 1e3, e["dur"] / 1e3))
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(lanes)))
    for i, (name, bars) in enumerate(sorted(lanes.items())):
        ax.broken_barh(bars, (i - 0.35, 0.7), color="tab:orange" if name.startswith("copy") else "tab:blue")
    ax.set_yticks(range(len(lanes)), sorted(lanes))
    ax.set_xlabel("ms")
    ax.set_title("offloaded decode: copy stream vs compute stream")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return {name: sum(d for _, d in bars) / (span / 1e3) for name, bars in lanes.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("rows", [])
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, (key, label) in enumerate((("moec", "moec offload"), ("accelerate", "transformers + accelerate"),
                                      ("bound", "host-link bound"))):
        ax.bar([j + (i - 1) * width for j in range(len(rows))], [r.get(key) or 0 for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"batch {r['batch']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result['model']}, GPU capped at {result['gpu_memory']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PHASES = ("compile", "moec", "accelerate", "report")


def compile_phase(args, result: dict, work: Path, deadline: float) -> bool:
    """This machine's figures, then the synthetic model compiled with the offload block. The
    compiler draws the weights itself and drops its copy once they are loaded, so the disk holds
    one copy of the model at a time (16 layers: 47 GB of a 64 GB disk)."""
    import yaml

    profile = work / "profile.json"
    run([sys.executable, "-m", "moec.compiler", "--profile-hardware", "-o", str(profile)], timeout=120)
    result["hardware"] = json.loads(profile.read_text())
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    recipe["model"]["synthetic"]["config"]["num_hidden_layers"] = args.layers
    recipe.update(name=f"{recipe['name']}-{args.layers}l",
                  offload={"gpu_memory": args.gpu_memory, "hardware": str(profile),
                           "workload": {"prompt_len": args.context, "gen_len": args.gen},
                           **({"policy": json.loads(args.policy)} if args.policy else {})},
                  max_seq_len=max(recipe.get("max_seq_len", 0), args.context + args.gen + 16))
    if device() == "cpu":
        recipe.update(device="cpu")
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    t = time.perf_counter()
    compiled = work / "compile.json"
    compiled.unlink(missing_ok=True)
    proc = run([sys.executable, __file__, "--role", "compile", "--recipe", str(work / "recipe.yaml"),
                "--artifact", str(work / "artifact"), "--gpu-memory", args.gpu_memory, "--result", str(compiled)],
               timeout=deadline - time.perf_counter(), capture=False)
    result["compile_s"] = time.perf_counter() - t
    if proc.returncode != 0 or not compiled.is_file():
        result["error"] = "compile failed"
        return False
    result["compile_peak_gpu_gib"] = json.loads(compiled.read_text())["peak_gpu_bytes"] / 2**30
    plan = json.loads((work / "artifact" / "manifest.json").read_text())["offload"]
    result["plan"] = {k: plan[k] for k in ("policy", "prediction", "gpu_memory", "host_memory")}
    return True


def moec_rows(moec: dict) -> tuple[dict, list[str]]:
    """The moec role's document → the result's "moec" part, and what it did not finish: a role
    stopped by the clock left the rows it had measured (`partial`), which are kept."""
    bench, skipped = moec.get("bench"), []
    if bench is None and moec.get("partial"):
        partial = moec["partial"]
        done = [r["batch"] for r in partial["decode"]]
        bench = {**partial, "offload": {"h2d_bytes_per_s_measured": partial.get("h2d_bytes_per_s_measured")},
                 "notes": [f"partial: the moec role stopped after {len(done)} decode rows"]}
        skipped.append(f"moec: decode rows finished only for batch {done}")
    bench = bench or {}
    return {k: bench.get(k) for k in ("decode", "offload", "load_s", "notes")}, skipped


def moec_phase(args, result: dict, work: Path, out: Path, deadline: float) -> None:
    moec_json = work / "moec.json"
    proc = run([sys.executable, __file__, "--role", "moec", "--artifact", str(work / "artifact"), "--result",
                str(moec_json), "--gpu-memory", args.gpu_memory, "--context", str(args.context), "--gen", str(args.gen)],
               timeout=deadline - time.perf_counter() - 30)
    if proc.returncode != 0:
        log(f"moec role exited {proc.returncode}:\n{(proc.stdout or '')[-4000:]}")
        result["skipped"].append(f"moec: exited {proc.returncode}")
    moec = json.loads(moec_json.read_text()) if moec_json.is_file() else {}
    result["moec"], skipped = moec_rows(moec)
    result["skipped"] += skipped
    if moec.get("trace"):
        result["timeline_busy_share"] = timeline(Path(moec["trace"]), out / "offload_timeline.png")


def accelerate_phase(args, result: dict, work: Path, deadline: float) -> None:
    """transformers + accelerate on the same model: the artifact goes first (its numbers are in the
    result; the disk holds one copy), then the model is drawn again as an HF directory, same seed."""
    import shutil

    shutil.rmtree(work / "artifact", ignore_errors=True)
    t = time.perf_counter()
    write_model(Path(args.recipe), args.layers, work / "hf")
    result["hf_write_s"] = time.perf_counter() - t  # drawing and writing the model again, before accelerate loads it
    batches = args.accelerate_batches or [r["batch"] for r in (result.get("moec") or {}).get("decode") or []] or [1]
    acc_json = work / "accelerate.json"
    left = deadline - time.perf_counter()
    if left > 60:
        proc = run([sys.executable, __file__, "--role", "accelerate", "--hf-dir", str(work / "hf"), "--result",
                    str(acc_json), "--gpu-memory", args.gpu_memory, "--context", str(args.context),
                    "--seconds", str(left - 45), "--batches", ",".join(map(str, batches))], timeout=left - 10)
        print((proc.stdout or "")[-4000:], file=sys.stderr)  # its load and per-token progress
    else:
        result["skipped"].append("accelerate baseline: time budget")
    acc = json.loads(acc_json.read_text()) if acc_json.is_file() else {}
    # rows of batches not measured this time (a run resumed to add one batch) are kept
    earlier = [r for r in (result.get("accelerate") or {}).get("decode", []) if r["batch"] not in batches]
    result["accelerate"] = {**acc, "decode": sorted(earlier + acc.get("decode", []), key=lambda r: r["batch"])}
    result["skipped"] += acc.get("skipped", [])


def report_phase(result: dict, out: Path) -> None:
    moec = result.get("moec") or {}
    h2d = (moec.get("offload") or {}).get("h2d_bytes_per_s_measured")
    theirs = {r["batch"]: r for r in (result.get("accelerate") or {}).get("decode", [])}
    result["rows"] = []
    for r in moec.get("decode") or []:
        per_step = (r.get("offload") or {}).get("expert_bytes_per_step")
        bound = r["batch"] * h2d / per_step if h2d and per_step else None
        other = theirs.get(r["batch"], {}).get("decode_tokens_per_s")
        mine = r.get("decode_tokens_per_s")
        result["rows"].append({"batch": r["batch"], "moec": mine, "accelerate": other, "bound": bound,
                               "percent_of_bound": 100 * mine / bound if mine and bound else None,
                               "speedup_vs_accelerate": mine / other if mine and other else None,
                               "link_busy_fraction": (r.get("offload") or {}).get("link_busy_fraction"),
                               "accelerate_partial": bool(theirs.get(r["batch"], {}).get("partial"))})
    plot(result, out / "offload.png")
    plan = result.get("plan") or {}
    print(f"{result['model']} | {result['device']} | GPU {result['gpu_memory']} | plan {plan.get('policy')}")
    if plan:
        print(f"predicted {plan['prediction']['tokens_per_s']:.1f} tok/s over the workload, bound by the "
              f"{plan['prediction']['bottleneck']}")
    if result.get("compile_s") is not None:
        peak = result.get("compile_peak_gpu_gib")
        print(f"compiled in {result['compile_s']:.0f} s under the cap"
              + (f", {peak:.1f} GiB of GPU memory at most" if peak is not None else ""))
    print(f"{'batch':>5} {'moec':>9} {'accel.':>9} {'bound':>9} {'%bound':>7} {'x accel':>8} {'link busy':>9}")
    for r in result["rows"]:
        def f(v, spec):
            return format(v, spec) if v is not None else "-"
        print(f"{r['batch']:>5} {f(r['moec'], '9.1f')} {f(r['accelerate'], '9.2f')} {f(r['bound'], '9.1f')} "
              f"{f(r['percent_of_bound'], '7.1f')} {f(r['speedup_vs_accelerate'], '8.1f')} "
              f"{f(r['link_busy_fraction'], '9.2f')}")
    for r in result["rows"]:
        if r["accelerate_partial"]:
            steps = len(theirs[r["batch"]]["step_times_ms"])
            print(f"accelerate at batch {r['batch']}: from {steps} decode step(s), its run stopped by the clock")
    if result["skipped"]:
        print("skipped:", "; ".join(result["skipped"]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["main", "compile", "moec", "accelerate"], default="main")
    parser.add_argument("--out", default=".")
    parser.add_argument("--work", default="/tmp/moec-offload")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "mixtral-8x7b-shape.yaml"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--gpu-memory", default="24GiB")
    parser.add_argument("--policy", help="offload.policy fields to pin, as JSON (default: the search's choice)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"which of {','.join(PHASES)} to run, in order; later phases resume from --work, so "
                             "a run too long for one device call can be split over calls on a machine kept warm")
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--context", type=int, default=PROMPT)
    parser.add_argument("--gen", type=int, default=GEN)
    parser.add_argument("--artifact")
    parser.add_argument("--hf-dir")
    parser.add_argument("--result")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    parser.add_argument("--accelerate-batches", type=lambda s: [int(x) for x in s.split(",")],
                        help="the batches the accelerate phase measures (default: the moec rows')")
    parser.add_argument("--resume-from", help="an earlier offload.json (e.g. from benchmarks/results/) to resume "
                                              "when --work holds none: say, only the accelerate baseline at one batch")
    args = parser.parse_args()
    if args.role == "compile":
        return role_compile(args)
    if args.role == "moec":
        return role_moec(args)
    if args.role == "accelerate":
        return role_accelerate(args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        parser.error(f"--phases: {unknown or 'none given'}; choose from {','.join(PHASES)}")

    import torch

    deadline = time.perf_counter() + args.budget_s
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state = work / "offload.json"
    if args.resume_from and not state.is_file():
        if not Path(args.resume_from).is_file():
            parser.error(f"--resume-from {args.resume_from}: no such file; give an offload.json result")
        state.write_text(Path(args.resume_from).read_text())
    if phases[0] != "compile" and not state.is_file():
        parser.error(f"--phases {args.phases}: {state} holds no earlier phases; start with compile or pass --resume-from")
    result = json.loads(state.read_text()) if phases[0] != "compile" else {
        "benchmark": "offload", "model": f"{Path(args.recipe).stem}, {args.layers} layers",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpu_memory": args.gpu_memory, "workload": {"prompt_len": args.context, "gen_len": args.gen},
        "versions": {"torch": torch.__version__}, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "skipped": []}

    def save() -> None:
        for path in (state, out / "offload.json"):
            path.write_text(json.dumps(result, indent=1))

    for phase in phases:
        log(f"offload phase {phase}")
        began = time.perf_counter()
        if phase == "compile" and not compile_phase(args, result, work, deadline):
            save()
            return 1
        if phase == "moec":
            moec_phase(args, result, work, out, deadline)
        if phase == "accelerate":
            accelerate_phase(args, result, work, deadline)
        if phase == "report":
            report_phase(result, out)
        result.setdefault("phases_done", []).append(phase)
        # each phase's wall seconds (a resumed result from before these were kept has fewer than
        # phases_done): what the next run's device calls must hold
        result.setdefault("phase_s", []).append([phase, round(time.perf_counter() - began, 1)])
        log(f"offload phase {phase} took {result['phase_s'][-1][1]} s")
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
