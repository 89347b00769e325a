import sys, torch
sys.path.insert(0, "benchmarks")
from measure import L2Flusher, capture_graph, time_interleaved
import dbg_gg_old as old
from moec.ops.triton import grouped_gemm as new
from moec.ops.triton.align import moe_align_block_size
from moec.ops.triton.configs import split_config, default_config
dev = torch.device("cuda"); flush = L2Flusher(dev)
DT = torch.bfloat16
CASES = [("qwen3", 2048, 768, 128, 8, 4), ("qwen3", 2048, 768, 128, 8, 16), ("qwen3", 2048, 768, 128, 8, 64),
         ("mixtral", 4096, 14336, 8, 2, 4), ("mixtral", 4096, 14336, 8, 2, 16),
         ("qwen3", 2048, 768, 128, 8, 16384), ("mixtral", 4096, 14336, 8, 2, 4096)]
BIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 3, "down": {"BLOCK_N": 256, "num_stages": 4}}
for shape, H, I, E, K, T in CASES:
    g = torch.Generator().manual_seed(1)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dev, DT)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dev, DT)
    x = torch.randn(T, H, generator=g).to(dev, DT)
    probs, ids = torch.randn(T, E, generator=g).softmax(-1).topk(K, dim=-1)
    wts, ids = (probs / probs.sum(-1, keepdim=True)).to(dev), ids.to(dev)
    cfg = BIG if T >= 4096 else default_config(T, E, K)
    gu, dn = split_config(cfg)
    al = moe_align_block_size(ids, E, gu["BLOCK_M"])
    calls = {}
    keep = []
    for tag, mod in (("old", old), ("new", new)):
        def layer(mod=mod):
            out = torch.empty(T, H, device=dev, dtype=DT)
            h = mod.gate_up_grouped(x, w13, *al, K, gu, zero_out=out)
            return mod.down_grouped(h, w2, wts, *al, dn, out=out)
        graph, o = capture_graph(layer, dev); keep.append(o)
        calls[tag] = graph.replay
    if T >= 4096:
        gp = dict(gu, PERSISTENT=True)
        def layer_p():
            out = torch.empty(T, H, device=dev, dtype=DT)
            h = new.gate_up_grouped(x, w13, *al, K, gp, zero_out=out)
            return new.down_grouped(h, w2, wts, *al, dn, out=out)
        graph, o = capture_graph(layer_p, dev); keep.append(o); calls["new gate/up P"] = graph.replay
    t = time_interleaved(calls, dev, flush=flush, rounds=30)
    for o in keep[1:]:
        assert (o.float() - keep[0].float()).abs().max() <= 2e-2 * keep[0].float().abs().max(), "mismatch"
    print(shape, T, "  ".join(f"{k} {v['median_ms']*1e3:.1f}us" for k, v in t.items()), flush=True)
