"""What the L2 flush between timed calls does to a timing: the measuring method, measured.

    python benchmarks/l2_flush.py --out $OUT        # GPU, about a minute

Every GPU timing here flushes the L2 before each timed call (`measure.L2Flusher`), so that no
call finds its weights left in L2 by the call before. How it flushes matters for calls that
move tens of MB: a flush that writes leaves up to the L2's size of dirty lines, which the timed
call's reads then evict and write back to DRAM inside the timed region. This script times the
same CUDA-graph replays under three flushes (`write`: zeros over 2 x L2, `triton.testing.do_bench`'s
flush and measure.py's until 2026-12-06; `read`: a sum over 2 x L2, measure.py's since; `none`)
for:

  reads      one sum over 16, 48 and 128 MB (less than, about and more than an H100's 50 MB L2):
             with no flush the small one hits in L2, so `read` must be slower than `none` there
             (it does flush) and `write` shows what the write-back adds
  moe layer  moec's MoE layer (router + fused_moe, the default config) at 1 and 4 tokens, Qwen3-
             30B-A3B's and Mixtral-8x7B's shapes, as one replay a timing; and per layer of L
             layers (each its own weights and input) captured in one graph, the way a decode step
             runs them back to back, with each kernel's time inside that graph (torch.profiler)

Writes OUT/l2_flush.json in the common result format and prints a table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from measure import L2Flusher, capture_graph, copy_bandwidth, environment, log, time_fn, write_json  # noqa: E402
from moe_layer import SHAPES, Layer, roofline, routing_stats  # noqa: E402
from result_format import new_result  # noqa: E402

from moec.runtime.regression_gate import metric  # noqa: E402

READ_MB = (16, 48, 128)
LAYER_TOKENS = (1, 4)
LAYERS = {"qwen3-30b-a3b": 8, "mixtral-8x7b": 3}  # 8 x 1.2 GB and 3 x 2.8 GB of expert weights


FLUSHES = ("write", "read", "none")  # the flushes each timing runs after, in table order


def flushes(dev) -> dict:
    return {name: None if name == "none" else L2Flusher(dev, how=name) for name in FLUSHES}


def run_reads(dev, flush: dict) -> list[dict]:
    rows = []
    for mb in READ_MB:
        src = torch.randn(mb << 19, device=dev, dtype=torch.bfloat16)
        total = torch.empty((), device=dev, dtype=torch.float32)
        graph, _ = capture_graph(lambda: torch.sum(src, dim=0, dtype=torch.float32, out=total), dev)
        row = {"mb": mb}
        for name, fl in flush.items():
            row[name] = time_fn(graph.replay, dev, flush=fl, min_iters=100, max_iters=100)["median_ms"] * 1e3
        rows.append(row)
        log(f"  read {mb} MB: " + ", ".join(f"{n} {row[n]:.1f} us" for n in flush))
        del src, graph
    return rows


def kernel_times(replay, flush, calls: int = 5) -> dict[str, float]:
    """Median device time (us) of each kernel name inside `calls` replays of a graph."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush()
            replay()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and "elementwise" not in e.name and "reduce" not in e.name:
            times.setdefault(e.name.split("(")[0][:60], []).append(e.device_time)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_layers(dev, flush: dict, copy_gbs: float, tflops: float) -> list[dict]:
    rows = []
    for shape, n_layers in LAYERS.items():
        layers = [Layer(shape, SHAPES[shape], dev, torch.bfloat16, "cuda", 0, i) for i in range(n_layers)]
        for T in LAYER_TOKENS:
            hidden = [torch.randn(T, layer.H, device=dev, dtype=torch.bfloat16) for layer in layers]
            hits = [routing_stats(layer.route(h)[1], layer.E)["experts_hit"] for layer, h in zip(layers, hidden)]
            roofs = [roofline(layer, T, e, copy_gbs, tflops)["roofline_ms"] * 1e3 for layer, e in zip(layers, hits)]
            one, _ = capture_graph(lambda: layers[0].moec(hidden[0]), dev)
            many, _ = capture_graph(lambda: [layer.moec(h) for layer, h in zip(layers, hidden)], dev)
            row = {"shape": shape, "tokens": T, "layers": n_layers, "experts_hit": hits, "roofline_us": roofs}
            for name, fl in flush.items():
                once = time_fn(one.replay, dev, flush=fl, min_iters=100, max_iters=100)
                row[f"one_{name}_us"] = once["median_ms"] * 1e3
                row[f"per_layer_{name}_us"] = (time_fn(many.replay, dev, flush=fl, min_iters=50, max_iters=50)
                                               ["median_ms"] * 1e3 / n_layers)
            row["one_over_roofline"] = {n: row[f"one_{n}_us"] / roofs[0] for n in flush}
            row["per_layer_over_roofline"] = {n: row[f"per_layer_{n}_us"] * n_layers / sum(roofs) for n in flush}
            try:
                row["kernels_in_graph_us"] = kernel_times(many.replay, flush["read"])
            except Exception as e:  # noqa: BLE001 - the profile is a detail; the timings stand without it
                row["kernels_in_graph_us"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            log(f"  {shape} T={T}: one replay " + ", ".join(f"{n} {row[f'one_{n}_us']:.1f}" for n in flush)
                + f" us; per layer of {n_layers}: " + ", ".join(f"{n} {row[f'per_layer_{n}_us']:.1f}" for n in flush))
            del one, many
        del layers
        torch.cuda.empty_cache()
    return rows


def metrics(reads: list[dict], layers: list[dict], copy_gbs: float) -> list[dict]:
    out = [metric("copy_bandwidth", copy_gbs, "GB/s", "higher")]
    for r in reads:
        out += [metric(f"read_{r['mb']}MB/{n}_flush_us", r[n], "us", "lower") for n in FLUSHES]
    for r in layers:
        key = f"{r['shape']}/T={r['tokens']}"
        for n in FLUSHES:
            out.append(metric(f"{key}/one_replay_{n}_flush_us", r[f"one_{n}_us"], "us", "lower",
                              over_roofline=r["one_over_roofline"][n]))
            out.append(metric(f"{key}/per_layer_of_{r['layers']}_{n}_flush_us", r[f"per_layer_{n}_us"], "us",
                              "lower", over_roofline=r["per_layer_over_roofline"][n]))
    return out


def table(reads: list[dict], layers: list[dict]) -> str:
    lines = ["what                              write    read    none   (us; x roofline for layers)"]
    for r in reads:
        lines.append(f"sum of {r['mb']:>3} MB                     {r['write']:7.1f} {r['read']:7.1f} {r['none']:7.1f}")
    for r in layers:
        for kind, label in (("one", "one replay"), ("per_layer", f"per layer of {r['layers']}")):
            cells = " ".join(f"{r[f'{kind}_{n}_us']:7.1f}" for n in FLUSHES)
            ratio = r[f"{kind}_over_roofline"]["read"]
            lines.append(f"{r['shape'][:12]:12} T={r['tokens']} {label:16} {cells}   {ratio:.2f}x (read)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--commit", default=None, help="git commit of the tree (else git rev-parse HEAD)")
    p.add_argument("--tflops", type=float, default=800.0,
                   help="matmul rate for the roofline (the layers here are memory-bound: it does not decide)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("l2_flush: needs a CUDA GPU (the L2 and CUDA graphs are what it measures)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    env = environment(dev, args.commit)
    copy_gbs = copy_bandwidth(dev)["value"]
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    flush = flushes(dev)
    reads = run_reads(dev, flush)
    layers = run_layers(dev, flush, copy_gbs, args.tflops)
    result = new_result("l2_flush", "cuda", env["device"]["name"], metrics(reads, layers, copy_gbs),
                        env["versions"], env=env, reads=reads, layers=layers,
                        notes="")
    result["git_commit"] = env["commit"]
    write_json(Path(args.out) / "l2_flush.json", result)
    print(table(reads, layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
