"""The grouped_mm MoE path's formulations under Inductor: where its time goes around the GEMMs.

    python benchmarks/grouped_mm_path.py --out $OUT          # GPU, ~4 min

moe_layer-h200-2026-12-03T1825 profiled moec's grouped_mm path at 16384 tokens: its two CUTLASS
GEMMs took what transformers' compiled block's took, but the gather back to token order took
2.53 ms on Qwen3's shape (transformers: 0.84) and the gather of the input rows 0.64 ms on
Mixtral's (transformers: 0.13). This compiles formulations of the same computation, with T
symbolic (as the artifact compiles it) and static, checks each against the op's reference,
times each (median of CUDA events, L2 flushed before each call), profiles its kernels, and
keeps Inductor's generated code (TORCH_LOGS=output_code goes to stderr: redirect it). Each
variant compiles afresh (torch._dynamo.reset()), its dynamic graph first at the lowest T.

  moec       `moec.ops.fused_moe.fused_moe_grouped_mm` as the tree has it (on CUDA: the row moves
             are `moec.ops.triton.moe_permute`'s kernels)
  aten       the same with the row moves as aten ops (`row_kernels=False`), as it was before them
  hf         transformers' order of work: rows gathered with an index, the routing weight applied
             to the sorted rows, the inverse permutation by an index put, a view summed over K
  unrolled   aten with the combine as K row gathers summed in a fixed order (one pointwise kernel)
  tuner      moec through `compiled_grouped_mm()` (what the tuner and moe_layer.py time), called at
             T = 1 and 4 first as moe_layer.py does, so Dynamo specializes then generalizes T
  noassert   aten with Inductor's bounds asserts on indirect loads off (assert_indirect_indexing)

`--graph` also times and profiles each as a CUDA-graph replay: moe_layer-h200-2026-12-03T2225
found moec's path 2.5-6% slower than transformers' compiled block replayed and level with it
launched directly, with the same kernel time in an (eager) profile. Each variant's replays are
timed in a block of their own, and then all the variants' replays again interleaved round by
round (`measure.time_interleaved`), so that clock drift over a block cannot pass for a difference.

Writes OUT/grouped_mm_path.json and prints a table. GPU only: exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import (  # noqa: E402
    L2Flusher,
    environment,
    log,
    time_fn,
    time_graph,
    time_interleaved,
    write_json,
)
from benchmarks.moe_layer import SHAPES, profile_kernels  # noqa: E402
from moec.compiler.passes.moe_tuning import compiled_grouped_mm  # noqa: E402
from moec.ops.fused_moe import fused_moe_grouped_mm  # noqa: E402
from moec.ops.moe_combine import moe_combine_ref  # noqa: E402
from moec.ops.moe_experts import ACTIVATIONS  # noqa: E402


def expert_order(topk_ids, num_experts):
    """The assignments sorted by expert (stable) and each expert's row end, as moec's path has them."""
    sorted_experts, order = torch.sort(topk_ids.reshape(-1), stable=True)
    ends = torch.arange(num_experts, device=topk_ids.device, dtype=sorted_experts.dtype)
    return order, torch.searchsorted(sorted_experts, ends, right=True).to(torch.int32)


def hf_order(hidden, w13, w2, topk_weights, topk_ids, activation):
    """transformers' grouped_mm experts forward (integrations/moe.py), stable sort and
    searchsorted offsets kept so that the rows match moec's."""
    T, H = hidden.shape
    K = topk_ids.shape[1]
    two_i = w13.shape[1]
    perm, offs = expert_order(topk_ids, w13.shape[0])
    x = hidden[perm // K]
    gate_up = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
    h = ACTIVATIONS[activation](gate_up[:, : two_i // 2]) * gate_up[:, two_i // 2:]
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    y = y * topk_weights.reshape(-1)[perm].unsqueeze(-1).to(y.dtype)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(T, K, H).float().sum(dim=1).to(hidden.dtype)


def unrolled(hidden, w13, w2, topk_weights, topk_ids, activation):
    """moec's path with the combine written as K gathers summed in a fixed order (one pointwise
    kernel, every load a whole row) instead of a gather then a reduction over K."""
    T, H = hidden.shape
    K = topk_ids.shape[1]
    two_i = w13.shape[1]
    order, offs = expert_order(topk_ids, w13.shape[0])
    x = hidden.index_select(0, order // K)
    gate_up = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
    h = ACTIVATIONS[activation](gate_up[:, : two_i // 2]) * gate_up[:, two_i // 2:]
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    position = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    position = position.view(T, K)
    out = y.index_select(0, position[:, 0]).float() * topk_weights[:, :1]
    for k in range(1, K):
        out = out + y.index_select(0, position[:, k]).float() * topk_weights[:, k:k + 1]
    return out.to(hidden.dtype)


def aten_rows(hidden, w13, w2, topk_weights, topk_ids, activation):
    return fused_moe_grouped_mm(hidden, w13, w2, topk_weights, topk_ids, activation, row_kernels=False)


VARIANTS = {"moec": (fused_moe_grouped_mm, {}), "aten": (aten_rows, {}), "hf": (hf_order, {}),
            "unrolled": (unrolled, {}), "tuner": None,
            "noassert": (aten_rows, {"assert_indirect_indexing": False})}


def compiled(fn, inductor_options: dict, dynamic: bool):
    c = torch.compile(fn, fullgraph=True, dynamic=False if not dynamic else None, options=inductor_options or None)

    def run(hidden, w13, w2, w, ids):
        if dynamic:
            for t in (hidden, w, ids):
                torch._dynamo.mark_dynamic(t, 0)
        return c(hidden, w13, w2, w, ids, "silu")

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--commit", default=None)
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b")
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--static", action="store_true", help="also compile each variant with static shapes")
    p.add_argument("--graph", action="store_true", help="also time and profile each as a CUDA-graph replay")
    args = p.parse_args(argv)
    for flag, given, known in (("--shapes", args.shapes, SHAPES), ("--variants", args.variants, VARIANTS)):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            p.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens wants a comma list of token counts, e.g. 4096,16384; got {args.tokens!r}")
    if not torch.cuda.is_available():
        print("grouped_mm_path.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda"), torch.bfloat16
    flush = L2Flusher(device)
    result = {"benchmark": "grouped_mm_path", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "env": environment(device, args.commit), "cases": []}
    modes = [True, False] if args.static else [True]
    for shape in args.shapes.split(","):
        spec = SHAPES[shape]
        H, I, E, K = spec["hidden"], spec["inter"], spec["experts"], spec["top_k"]
        g = torch.Generator(device=device).manual_seed(0)
        w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype).mul_(H ** -0.5)
        w2 = torch.randn(E, H, I, generator=g, device=device, dtype=dtype).mul_(I ** -0.5)
        inputs, graphs = {}, {T: {} for T in tokens}
        for T in tokens:
            hidden = torch.randn(T, H, generator=g, device=device, dtype=dtype)
            w, ids = torch.randn(T, E, generator=g, device=device).softmax(-1).topk(K, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            ref = moe_combine_ref(torch.ops.moec.moe_experts(hidden, w13, w2, ids, "silu"), w).float()
            inputs[T] = (hidden, w, ids, ref)
        for v in args.variants.split(","):
            for dyn in ([True] if v == "tuner" else modes):
                torch._dynamo.reset()  # each variant compiles afresh: Dynamo's cache is the function's
                if v == "tuner":
                    tuner = compiled_grouped_mm()
                    for t in (1, 4):
                        x = torch.randn(t, H, device=device, dtype=dtype)
                        ww, ii = torch.randn(t, E, device=device).softmax(-1).topk(K, dim=-1)
                        tuner(x, w13, w2, ww, ii, "silu")

                    def run(hidden, w13, w2, w, ids, tuner=tuner):
                        return tuner(hidden, w13, w2, w, ids, "silu")
                else:
                    run = compiled(VARIANTS[v][0], VARIANTS[v][1], dyn)
                for T in tokens:
                    hidden, w, ids, ref = inputs[T]
                    case = {"shape": shape, "tokens": T, "variant": v, "dynamic": dyn}
                    t0 = time.perf_counter()
                    try:
                        got = run(hidden, w13, w2, w, ids).float()
                        case["first_call_s"] = time.perf_counter() - t0
                        case["max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
                        case["timing"] = time_fn(lambda: run(hidden, w13, w2, w, ids), device, flush=flush)
                        case["profile"] = profile_kernels(lambda: run(hidden, w13, w2, w, ids), device, top=6)
                        if args.graph:
                            case["timing_graph"], (_, graph) = time_graph(lambda: run(hidden, w13, w2, w, ids), device,
                                                                          flush=flush)
                            case["profile_graph"] = profile_kernels(graph.replay, device, top=6)
                            graphs[T][f"{v}{'' if dyn else '-static'}"] = graph
                    except Exception as e:  # noqa: BLE001 - a failed variant is a result
                        case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    result["cases"].append(case)
                    log(f"{shape:14s} T={T:6d} {v:9s} {'dyn' if dyn else 'static':6s} "
                        + (case.get("error") or f"{case['timing']['median_ms']:.3f} ms  err {case['max_rel_err']:.1e}  "
                           + ", ".join(f"{r['name'][:40]} {r['us_per_call']:.0f}" for r in case["profile"][:5])
                           + ("" if "timing_graph" not in case else
                              f"\n{'':39s}replayed {case['timing_graph']['median_ms']:.3f} ms  "
                              + ", ".join(f"{r['name'][:40]} {r['us_per_call']:.0f}" for r in case["profile_graph"][:5]))))
        for T, by_variant in graphs.items():  # the replays again, side by side: the same clocks for all
            if len(by_variant) > 1:
                timed = time_interleaved({v: g.replay for v, g in by_variant.items()}, device, flush=flush)
                result.setdefault("interleaved", []).append({"shape": shape, "tokens": T, "timing_graph": timed})
                log(f"{shape:14s} T={T:6d} replays interleaved: "
                    + ", ".join(f"{v} {t['median_ms']:.3f}" for v, t in timed.items()))
        del inputs, graphs
        del w13, w2
        torch.cuda.empty_cache()
        write_json(out / "grouped_mm_path.json", result)  # after each shape: a cut run keeps what it measured
    log(f"wrote {out / 'grouped_mm_path.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
