"""Expert parallelism: all-to-all alone, and how much of it the chunked overlap hides (issue 6).

    python benchmarks/ep_overlap.py --out $OUT                      # GPU host with >= 2 GPUs (NCCL)
    python benchmarks/ep_overlap.py --ep 1,2,4,8 --out $OUT         # more ranks (issue 9)
    .venv/bin/python benchmarks/ep_overlap.py --device cpu --quick --out /tmp/x   # logic test (gloo)

The MoE layers of a synthetic Mixtral-8x7B-shaped model (16 layers, 8 experts, top-2, hidden
4096, intermediate 14336, bf16; `--shape qwen3` for 128 experts/top-8), random weights drawn on
each GPU, routed by random router logits. For each expert-parallel size in `--ep`, one process
per rank (spawned here; NCCL on GPUs, gloo on CPU), rank r owning experts [r*E/W, (r+1)*E/W) as
`moec.ops.expert_dispatch.expert_placement` places them. Workloads are the group's tokens, split
evenly over the ranks (attention and the dense layers are data-parallel: each rank has its own
requests): prefill of 8192 tokens, decode steps of batch 64 and 256. For each:

  step_off    the L MoE layers through `ep_moe` with chunks=1 (no overlap)
  step_on_c   the same with c chunks (c in --chunks): dispatch of chunk i+1 and combine of i-1 in
              flight (async NCCL) while chunk i's experts compute
  a2a         the two all-to-alls of every layer alone, with the same split sizes, nothing else
  compute     each layer's local experts on the rows it received, nothing else
  exposed     step - compute: the communication and bookkeeping the experts did not hide;
              hidden fraction of the all-to-all = 1 - exposed / a2a
  load        expert-load imbalance of the group's routing: busiest over mean, over experts and
              over ranks (the busiest rank sets the step), per layer, averaged over the layers
EP=1 runs `moec::fused_moe` with every expert on one device (what the non-parallel artifact
runs). Also measured, first: NCCL all-to-all bandwidth (256 MiB per rank). Only the MoE part of a
step is timed: the dense part is the same per rank at EP=W as at EP=1 with W times fewer tokens.

Timing: a fixed number of iterations on every rank (collectives must match), a barrier before
each, CUDA events around it (perf_counter on CPU), medians per rank, the slowest rank reported.
Writes OUT/ep_overlap.json (the common result format) and OUT/ep_overlap.png; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SHAPES = {
    "mixtral": {"experts": 8, "top_k": 2, "hidden": 4096, "inter": 14336, "layers": 16},
    "qwen3": {"experts": 128, "top_k": 8, "hidden": 2048, "inter": 768, "layers": 48},
    "tiny": {"experts": 4, "top_k": 2, "hidden": 64, "inter": 128, "layers": 2},
}
WORKLOADS = {"prefill": 8192, "decode_b64": 64, "decode_b256": 256}
QUICK_WORKLOADS = {"prefill": 64, "decode_b8": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default mixtral (tiny with --quick)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default: the shape's)")
    p.add_argument("--ep", default=None, help="expert-parallel sizes, e.g. 1,2 (default: 1 and every power of "
                                               "two up to the GPU count; 1,2 on CPU)")
    p.add_argument("--chunks", default="2,4", help="chunk counts of the overlapped path")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default 10, 3 quick)")
    p.add_argument("--quick", action="store_true", help="tiny shape and token counts: a logic test")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.quick else "mixtral")
    args.iters = args.iters or (3 if args.quick else 10)
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    if args.ep is None:
        n = torch.cuda.device_count() if args.device == "cuda" else 2
        args.ep = [w for w in (1, 2, 4, 8) if w <= max(n, 1)]
    else:
        args.ep = [int(w) for w in args.ep.split(",")]
    return args


# --- one rank ----------------------------------------------------------------------------------------


def timed(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median ms of fn() over `iters` calls, a barrier before each (every rank runs the same count)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def slowest(value: float) -> float:
    """The largest of every rank's value: a step is as slow as its slowest rank."""
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def a2a_bandwidth(device: torch.device, world: int, iters: int, nbytes: int) -> dict:
    """all_to_all_single of `nbytes` per rank: algorithm bandwidth (bytes a rank sends and receives
    over time) and bus bandwidth (x (W-1)/W: what crosses the links)."""
    n = nbytes // 2
    send = torch.randn(n, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    ms = slowest(timed(lambda: dist.all_to_all_single(recv, send), device, iters))
    algbw = nbytes / (ms * 1e-3) / 1e9
    return {"bytes_per_rank": nbytes, "ms": ms, "algbw_gb_s": algbw, "busbw_gb_s": algbw * (world - 1) / world}


def routing(tokens: int, experts: int, top_k: int, hidden: int, device, dtype, g: torch.Generator):
    """Random router logits ~ N(0, 1) → softmax top-k, renormalised (Mixtral's routing)."""
    logits = torch.randn(tokens, experts, generator=g, device=device)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).float(), ids


def expert_load(routes: list, experts: int, world: int) -> dict:
    """How evenly the group's assignments fall, per layer then averaged over the layers, as max
    over mean (1.0 = even): over experts, and over ranks (each owning a contiguous E/W of them,
    as `expert_placement` places them). A step waits for its busiest rank, so the rank figure is
    what costs time; random routing over few tokens is uneven by chance alone."""
    counts = torch.stack([torch.bincount(ids.reshape(-1), minlength=experts) for _, ids in routes]).double()
    dist.all_reduce(counts)  # the group's assignments, not this rank's
    per_rank = counts.view(len(routes), world, experts // world).sum(-1)

    def max_over_mean(x: torch.Tensor) -> float:
        return float((x.max(1).values / x.mean(1)).mean())

    return {"expert_max_over_mean": max_over_mean(counts), "rank_max_over_mean": max_over_mean(per_rank)}


def rank_main(rank: int, world: int, port: int, args, result_path: str) -> None:
    from moec.ops.expert_dispatch import _Exchange, _local_experts, ep_moe, expert_placement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300), **({"device_id": device} if device.type == "cuda" else {}))
    shape = SHAPES[args.shape]
    E, K, H, I = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    layers = args.layers or shape["layers"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mine = expert_placement(E, world)[rank]
    g = torch.Generator(device=device).manual_seed(args.seed * 7919 + rank)
    w13 = [torch.randn(len(mine), 2 * I, H, generator=g, device=device, dtype=dtype).mul_(H ** -0.5) for _ in range(layers)]
    w2 = [torch.randn(len(mine), H, I, generator=g, device=device, dtype=dtype).mul_(I ** -0.5) for _ in range(layers)]
    out = {"world": world, "layers": layers, "workloads": {}}
    if world > 1:
        out["a2a_bandwidth"] = a2a_bandwidth(device, world, args.iters, (4 << 20) if args.quick else (256 << 20))
    for name, total in (QUICK_WORKLOADS if args.quick else WORKLOADS).items():
        tokens = total // world
        hidden = torch.randn(tokens, H, generator=g, device=device, dtype=dtype)
        routes = [routing(tokens, E, K, H, device, dtype, g) for _ in range(layers)]
        row = {"group_tokens": total, "tokens_per_rank": tokens, "load": expert_load(routes, E, world)}
        if world == 1:
            def step(chunks=1):
                x = hidden
                for layer in range(layers):
                    w, ids = routes[layer]
                    x = torch.ops.moec.fused_moe(x, w13[layer], w2[layer], w, ids, "silu")
                return x
            row["step_ms"] = slowest(timed(step, device, args.iters))
        else:
            def step(chunks):
                x = hidden
                for layer in range(layers):
                    w, ids = routes[layer]
                    x = ep_moe(x, w, ids, w13[layer], w2[layer], E, "silu", chunks=chunks)
                return x

            # the exchanges of every layer, prepared once: what the a2a-alone and compute-alone runs replay
            exchanges = []
            for layer in range(layers):
                ex = _Exchange(hidden, routes[layer][1], E // world, world, None, None)
                for work in ex.works:
                    work.wait()
                exchanges.append(ex)

            def a2a_alone():
                for ex in exchanges:
                    dist.all_to_all_single(ex.recv_rows, hidden.index_select(0, ex.order // K), ex.recv_splits,
                                           ex.send_splits)
                    back = ex.recv_rows.new_empty(sum(ex.send_splits), H)
                    dist.all_to_all_single(back, ex.recv_rows, ex.send_splits, ex.recv_splits)

            def compute_alone():
                for layer, ex in enumerate(exchanges):
                    _local_experts(ex.recv_rows, ex.recv_ids, w13[layer], w2[layer], "silu")

            row["received_rows"] = sum(ex.recv_rows.shape[0] for ex in exchanges) / layers
            row["a2a_ms"] = slowest(timed(a2a_alone, device, args.iters))
            row["compute_ms"] = slowest(timed(compute_alone, device, args.iters))
            row["step_off_ms"] = slowest(timed(lambda: step(1), device, args.iters))
            for c in args.chunks:
                row[f"step_on_{c}_ms"] = slowest(timed(lambda c=c: step(c), device, args.iters))
            best = min([1, *args.chunks], key=lambda c: row["step_off_ms" if c == 1 else f"step_on_{c}_ms"])
            row["best_chunks"] = best
            row["step_ms"] = row["step_off_ms" if best == 1 else f"step_on_{best}_ms"]
            row["exposed_off_ms"] = row["step_off_ms"] - row["compute_ms"]
            row["exposed_on_ms"] = row["step_ms"] - row["compute_ms"]
            # clamped: 0 when the step's time beyond its experts exceeds the all-to-all alone
            row["hidden_fraction"] = (min(max(1.0 - row["exposed_on_ms"] / row["a2a_ms"], 0.0), 1.0)
                                      if row["a2a_ms"] > 0 else None)
        row["tokens_per_s"] = total / (row["step_ms"] * 1e-3)
        out["workloads"][name] = row
        del hidden, routes
    if rank == 0:
        Path(result_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# --- the whole run -----------------------------------------------------------------------------------


def run_world(world: int, args) -> dict:
    from measure import free_port

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        mp.spawn(rank_main, args=(world, free_port(), args, path), nprocs=world, join=True)
        return json.loads(Path(path).read_text())


def to_metrics(runs: dict[int, dict]) -> list[dict]:
    from measure import metric

    out = []
    for world, run in sorted(runs.items()):
        if "a2a_bandwidth" in run:
            out.append(metric(f"ep{world}/a2a_busbw", run["a2a_bandwidth"]["busbw_gb_s"], "GB/s", "higher",
                              how=f"all_to_all_single of {run['a2a_bandwidth']['bytes_per_rank'] >> 20} MiB per rank"))
        for name, row in run["workloads"].items():
            tag = f"ep{world}/{name}"
            out.append(metric(f"{tag}/tokens_per_s", row["tokens_per_s"], "tokens/s", "higher",
                              why=f"{row['group_tokens']} tokens over the group, {run['layers']} MoE layers"))
            out.append(metric(f"{tag}/step_ms", row["step_ms"], "ms", "lower"))
            for key in ("a2a_ms", "compute_ms", "step_off_ms", "exposed_off_ms", "exposed_on_ms"):
                if key in row:
                    out.append(metric(f"{tag}/{key[:-3]}_ms", row[key], "ms", "lower"))
            for key, over in (("rank", "ranks"), ("expert", "experts")):
                if f"{key}_max_over_mean" in row.get("load", {}) and (key == "expert" or world > 1):
                    out.append(metric(f"{tag}/{key}_load_max_over_mean", row["load"][f"{key}_max_over_mean"], "x",
                                      "lower", why=f"assignments over {over}, busiest / mean, averaged over layers"))
            if row.get("hidden_fraction") is not None:
                out.append(metric(f"{tag}/a2a_hidden_fraction", row["hidden_fraction"], "fraction", "higher",
                                  why=f"1 - exposed / a2a alone, with {row['best_chunks']} chunks"))
            if world > 1 and 1 in runs and name in runs[1]["workloads"]:
                out.append(metric(f"{tag}/throughput_over_ep1", row["tokens_per_s"] / runs[1]["workloads"][name]["tokens_per_s"],
                                  "x", "higher", peer="EP=1: moec::fused_moe with every expert on one device"))
    return out


def plot(runs: dict[int, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(runs.values()))["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels, compute, exposed_off, exposed_on, single = [], [], [], [], []
        for world, run in sorted(runs.items()):
            row = run["workloads"][name]
            labels.append(f"EP={world}")
            if world == 1:
                single.append(row["step_ms"])
                compute.append(row["step_ms"])
                exposed_off.append(0.0)
                exposed_on.append(0.0)
            else:
                compute.append(row["compute_ms"])
                exposed_off.append(max(row["exposed_off_ms"], 0.0))
                exposed_on.append(max(row["exposed_on_ms"], 0.0))
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], compute, 0.4, label="experts (compute alone)", color="tab:blue")
        ax.bar([i - 0.2 for i in x], exposed_off, 0.4, bottom=compute, label="exposed, overlap off", color="tab:red")
        ax.bar([i + 0.2 for i in x], compute, 0.4, color="tab:blue")
        ax.bar([i + 0.2 for i in x], exposed_on, 0.4, bottom=compute, label="exposed, overlap on", color="tab:orange")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms per step (MoE layers)")
        ax.set_title(f"{name}: {next(iter(runs.values()))['workloads'][name]['group_tokens']} tokens")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: dict[int, dict]) -> str:
    lines = [f"{'workload':<12} {'EP':>3} {'tok/s':>11} {'step ms':>9} {'a2a ms':>8} {'compute':>8} "
             f"{'exp. off':>8} {'exp. on':>8} {'hidden':>7} {'vs EP1':>7} {'rank ld':>7} {'exp. ld':>7}"]
    for world, run in sorted(runs.items()):
        for name, row in run["workloads"].items():
            base = runs.get(1, {}).get("workloads", {}).get(name)
            f = lambda k: f"{row[k]:8.3f}" if k in row else f"{'-':>8}"  # noqa: E731
            hidden = f"{row['hidden_fraction']:7.0%}" if row.get("hidden_fraction") is not None else f"{'-':>7}"
            ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:6.2f}x" if base else f"{'-':>7}"
            load = row.get("load", {})
            rank_ld = f"{load['rank_max_over_mean']:6.2f}x" if world > 1 and load else f"{'-':>7}"
            exp_ld = f"{load['expert_max_over_mean']:6.2f}x" if load else f"{'-':>7}"
            lines.append(f"{name:<12} {world:>3} {row['tokens_per_s']:11.0f} {row['step_ms']:9.3f} {f('a2a_ms')} "
                         f"{f('compute_ms')} {f('exposed_off_ms')} {f('exposed_on_ms')} {hidden} {ratio} {rank_ld} {exp_ld}")
        if "a2a_bandwidth" in run:
            bw = run["a2a_bandwidth"]
            lines.append(f"{'':<12} {world:>3} all-to-all {bw['bytes_per_rank'] >> 20} MiB/rank: "
                         f"{bw['algbw_gb_s']:.1f} GB/s algbw, {bw['busbw_gb_s']:.1f} GB/s busbw")
    return "\n".join(lines)


def main(argv=None) -> int:
    from measure import environment, write_json
    from result_format import new_result, versions

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ep):
        print(f"ep_overlap: --ep {max(args.ep)} needs {max(args.ep)} GPUs, this machine has {torch.cuda.device_count()}",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    env = environment(device)
    runs: dict[int, dict] = {}
    skipped = {}
    for world in args.ep:
        if SHAPES[args.shape]["experts"] % world:
            skipped[world] = f"{SHAPES[args.shape]['experts']} experts do not split over {world} ranks"
            continue
        start = time.perf_counter()
        print(f"EP={world}: {world} rank(s) ...", file=sys.stderr, flush=True)
        runs[world] = run_world(world, args)
        runs[world]["seconds"] = time.perf_counter() - start
    name = env["device"]["name"] if args.device == "cuda" else f"{env['device'].get('processor', 'cpu')}"
    result = new_result("ep_overlap", args.device, name, to_metrics(runs), versions("torch", "triton"),
                        shape={**SHAPES[args.shape], "layers": args.layers or SHAPES[args.shape]["layers"]},
                        args={k: v for k, v in vars(args).items()}, runs={str(w): r for w, r in runs.items()},
                        skipped=skipped, environment=env)
    write_json(out / "ep_overlap.json", result)
    plot(runs, out / "ep_overlap.png", f"{args.shape}-shaped MoE layers, expert parallel on {name}")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
