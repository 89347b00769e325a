"""One MoE layer on the GPU: moec's Triton kernels against transformers and the roofline (issue 3).

One run measures, on the same random inputs and weights:
  ceilings    device-to-device copy bandwidth and bf16 matmul rate, measured first, in this run
  moec        fused router (Triton) + `fused_moe` (align, gate/up + SiLU, down + routing weight)
              with the default config table; its CUDA-graph replay at every token count; and a
              sweep of candidate configs: every one the compiler's tuner times, whose fastest (or
              the grouped_mm path, if faster; the finalists replayed round by round, as the tuner
              decides them) is `moec_tuned`, what a compiled artifact runs at that T; then a few more
              (table rows, vLLM-style variants) to find ones to add
  moec_ops    the registered ops the compiler lowers to, dispatched eagerly:
              `torch.ops.moec.moe_router` (PyTorch reference router) + `torch.ops.moec.fused_moe`
  grouped_mm  the CUTLASS alternative the tuner times: moec's router, then the compiler's
              grouped_mm path (sort + torch._grouped_mm gate/up + silu*mul + torch._grouped_mm down
              + weighted combine) through torch.compile, T symbolic, as the artifact runs it
  hf_eager    transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock, experts_implementation
              "eager", the same tensors as its parameters
  hf_compile  the same block with experts_implementation "grouped_mm" under torch.compile
              (default mode, dynamic=False), warmed up until no new graphs are compiled
  roofline    max(bytes / copy_bw, flops / matmul_rate); bytes = weights of the experts actually
              hit + router weight + activations in and out; flops = 2 T K (H 2I + I H) + 2 T H E
and checks moec's output against HF eager (max abs err <= 2e-2 x max |ref| on tokens routed
alike; routing differences must be ties) and against a float32 reference of its own routing.

The CUDA-graph replays (moec, torch._grouped_mm, HF compile; the sweep's configs too) are the
numbers to judge kernels by: the artifact launches its kernels from C++ (AOTInductor) or replays
its decode step as a graph, so Python's per-launch cost (tens of microseconds per Triton launch,
which made eager moec 2.2 ms at T=1 against 0.28 ms replayed on the H100) is not what it pays.
Each is timed in a block of its own, then the three replays again round by round, order rotated
(`*_graph_interleaved`): milliseconds-long calls meet drifting clocks over a block, and the
interleaved medians are the ones to compare paths by where they differ by a few percent.

Timing (measure.py): CUDA events around each call, L2 flushed before each call, median of >= 20
calls after warm-up. Phase 1 measures every path of every case; phase 2 then sweeps configs,
small token counts first, both shapes in turn, until --budget-s is spent (default 520 s: on an
H100 on 2026-12-06, run a shape a call, phase 1 of both shapes took about 205 s and every
tuner candidate of every case about 240 s, so the whole run fits one device call of 600 s; what
was skipped is said in the output and the JSON).

    python benchmarks/moe_layer.py --out $OUT --commit $(git rev-parse HEAD)   # GPU, ~9 min
    python benchmarks/moe_layer.py --out $OUT --quick                          # GPU smoke test
    .venv/bin/python benchmarks/moe_layer.py --device cpu --quick --out /tmp/x # CPU logic test
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/moe_layer.py --device cpu --quick --out /tmp/x
        # ... with moec's Triton kernels run by the interpreter (fp32; times meaningless)

Writes OUT/moe_layer.json (after every case, so a cut-off run leaves what it measured) and
OUT/moe_layer.png, then prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from measure import (  # noqa: E402
    L2Flusher,
    capture_graph,
    copy_bandwidth,
    environment,
    log,
    matmul_rate,
    metric,
    time_fn,
    time_graph,
    time_interleaved,
    write_json,
)

SHAPES = {
    "mixtral-8x7b": {"arch": "mixtral", "hidden": 4096, "inter": 14336, "experts": 8, "top_k": 2},
    "qwen3-30b-a3b": {"arch": "qwen3", "hidden": 2048, "inter": 768, "experts": 128, "top_k": 8},
}
# CPU logic test: the same two HF block classes at toy sizes
TINY_SHAPES = {
    "mixtral-tiny": {"arch": "mixtral", "hidden": 64, "inter": 96, "experts": 4, "top_k": 2},
    "qwen3-tiny": {"arch": "qwen3", "hidden": 64, "inter": 48, "experts": 8, "top_k": 4},
}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
QUICK_TOKENS_GPU = [1, 64, 1024]
QUICK_TOKENS_CPU = [1, 16, 64]
TOL = 2e-2  # max abs err <= TOL * max |reference|
TIE_TOL = 1e-5  # two top-k sets whose probabilities sum within this are both valid (a tie)

PATH_LABELS = {
    "moec": "moec (fused_router + fused_moe, default config)",
    "moec_graph": "moec, CUDA-graph replay",
    "moec_best": "moec, best config of the sweep",
    "moec_tuned": "moec as the compiler's tuner would choose at this T: its fastest candidate (Triton "
                  "configs, CUDA-graph replays, and the grouped_mm path), the finalists retimed round by round",
    "moec_ops": "moec registered ops, eager dispatch (reference router)",
    "grouped_mm": "moec router + its torch._grouped_mm path (torch.compile, T symbolic)",
    "grouped_mm_graph": "moec router + its torch._grouped_mm path (torch.compile, T symbolic), CUDA-graph replay",
    "hf_eager": "transformers block, experts_implementation=eager",
    "hf_compile": "transformers block, experts_implementation=grouped_mm, torch.compile",
    "hf_compile_graph": "transformers grouped_mm + torch.compile, CUDA-graph replay",
    "moec_graph_interleaved": "moec, CUDA-graph replay, timed round by round with the other replays",
    "grouped_mm_graph_interleaved": "the grouped_mm path, CUDA-graph replay, timed round by round with the other "
                                    "replays",
    "hf_compile_graph_interleaved": "transformers grouped_mm + torch.compile, CUDA-graph replay, timed round by "
                                    "round with the other replays",
    "dense_bmm_graph": "the experts' two GEMMs alone as cuBLAS torch.bmm over the experts hit, T*K rows spread "
                       "evenly, CUDA-graph replay: the GEMMs' own ceiling at this T",
    "dense_bmm_graph_interleaved": "the cuBLAS bmm ceiling, CUDA-graph replay, timed round by round with the "
                                   "other replays",
}
HF_COMPILE_PEER = "transformers experts_implementation=grouped_mm + torch.compile (default mode, dynamic=False)"
HF_EAGER_PEER = "transformers experts_implementation=eager"
ROOF_PEER = "roofline max(bytes/copy_bw, flops/matmul_rate), ceilings measured in this run"


# ------------------------------------------------------------------------------------------ config
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory")
    p.add_argument("--commit", default=None, help="git commit of the tree (else git rev-parse HEAD)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bf16 on cuda, float32 on cpu (the Triton interpreter has no bf16)")
    p.add_argument("--shapes", default=None, help="comma list of shape names (default: all)")
    p.add_argument("--tokens", default=None, help="comma list of token counts")
    p.add_argument("--quick", action="store_true", help="a small subset (smoke test)")
    p.add_argument("--iters", type=int, default=None, help="minimum timed calls per measurement (20)")
    p.add_argument("--max-configs", type=int, default=2,
                   help="configs per case the sweep explores beyond the compiler tuner's candidates (all timed)")
    p.add_argument("--sweep-max-tokens", type=int, default=16384, help="no sweep above this token count")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip HF grouped_mm + torch.compile")
    p.add_argument("--cpu-compile", action="store_true", help="on cpu, run the torch.compile path too")
    p.add_argument("--graph-max-tokens", type=int, default=32768,
                   help="CUDA-graph timings up to this many tokens (default: all; the artifact launches the "
                        "kernels from C++, so a replay, not Python's launches, is what it pays)")
    p.add_argument("--budget-s", type=float, default=520.0,
                   help="wall-clock budget (s): the config sweeps (run after every path of every case is "
                        "measured) stop once it is spent; past budget+90 s phase 1 skips torch.compile too")
    p.add_argument("--profile-tokens", default="",
                   help="comma list of token counts at which the moec (default config), grouped_mm and HF "
                        "compiled paths are also profiled: their top kernels by time per call, in the JSON "
                        "and printed last")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every case this many times in a row (moe_layer-rK.json for K > 1, ceilings "
                        "measured again for each): `gpu_gate.sh --flicker N moe_layer` checks the gate on every one")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat wants a number of runs >= 1, got {args.repeat}")
    try:
        args.profile_tokens = {int(t) for t in args.profile_tokens.split(",") if t.strip()}
    except ValueError:
        p.error(f"--profile-tokens wants a comma list of token counts, e.g. 16384 or 1,4096; got {args.profile_tokens!r}")
    return args


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def compile_ok(self) -> bool:
        return self.elapsed() < self.seconds + 90


# ------------------------------------------------------------------------------------ sweep configs
def cfg_name(cfg: dict | None) -> str:
    if cfg is None:
        return "default"
    s = (f"M{cfg['BLOCK_M']}N{cfg['BLOCK_N']}K{cfg['BLOCK_K']}G{cfg['GROUP_M']}"
         f"w{cfg['num_warps']}s{cfg['num_stages']}")
    down = cfg.get("down") or {}
    if down:
        abbr = {"BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G", "num_warps": "w", "num_stages": "s"}
        s += "|d" + "".join(f"{abbr.get(k, k)}{v}" for k, v in sorted(down.items()))
    return s


def _vllm_like(bm: int, bn_full: int, bk: int, gm: int, warps: int, stages: int) -> dict:
    """A vLLM-style fused_moe config in moec's terms: vLLM's BLOCK_SIZE_N spans gate and up
    columns together, moec's gate/up BLOCK_N is per half; the down GEMM takes the full width."""
    return {"BLOCK_M": bm, "BLOCK_N": max(16, bn_full // 2), "BLOCK_K": bk, "GROUP_M": gm,
            "num_warps": warps, "num_stages": stages, "down": {"BLOCK_N": bn_full}}


def _smem_bytes(cfg: dict, itemsize: int) -> int:
    """Pipelined operand buffers of the larger of the two GEMMs (an estimate: Triton adds a little)."""
    gu = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_N"] * cfg["BLOCK_K"]) * itemsize * cfg["num_stages"]
    d = dict(cfg)
    d.update(cfg.get("down") or {})
    dn = (d["BLOCK_M"] * d["BLOCK_K"] + d["BLOCK_N"] * d["BLOCK_K"]) * itemsize * d["num_stages"]
    return max(gu, dn)


def candidate_configs(num_tokens: int, num_experts: int, top_k: int, limit: int,
                      itemsize: int, smem_limit: int | None) -> list[tuple[str, dict, bool]]:
    """(name, config, timed by the compiler's tuner): the default table's config first, then every
    other config the compile-time tuner times (what an artifact can run), then up to `limit`
    neighbouring table rows and vLLM-style variants for this rows-per-expert regime (exploration:
    a config that wins here is one to add to the tuner); those that cannot fit shared memory dropped."""
    from moec.ops.triton import configs as C

    rows = -(-num_tokens * top_k // num_experts)
    default = C.default_config(num_tokens, num_experts, top_k)

    def table_row(r: int) -> dict:  # the table's config for another rows-per-expert bucket
        return copy.deepcopy(C.DEFAULT_CONFIGS[C.bucket_for(max(1, r))])

    near = [table_row(rows * 4), table_row(rows // 4), table_row(rows * 16), table_row(rows // 16)]
    if rows <= 4:  # decode: streaming the hit experts' weights, memory-bound
        extra = [_vllm_like(16, 64, 256, 1, 8, 5), _vllm_like(16, 64, 128, 1, 4, 3),
                 _vllm_like(16, 32, 64, 1, 4, 4),
                 dict(default, BLOCK_K=256, num_stages=3, down={"BLOCK_N": 64, "BLOCK_K": 256}), *near]
    elif rows <= 64:
        extra = [near[0], near[1], _vllm_like(16, 128, 128, 1, 8, 3), _vllm_like(32, 128, 128, 1, 8, 4),
                 _vllm_like(64, 128, 128, 1, 8, 4), _vllm_like(16, 256, 128, 1, 8, 2), *near[2:]]
    elif rows <= 512:
        extra = [near[0], near[1], _vllm_like(64, 128, 64, 1, 8, 3), _vllm_like(128, 256, 64, 16, 8, 4),
                 _vllm_like(32, 256, 128, 1, 8, 2), _vllm_like(128, 128, 64, 1, 4, 5)]
    else:  # prefill: compute-bound, large tiles
        extra = [near[1], _vllm_like(128, 256, 64, 16, 8, 4), _vllm_like(128, 256, 64, 16, 8, 3),
                 _vllm_like(128, 128, 64, 8, 8, 4), _vllm_like(64, 128, 64, 8, 4, 4), near[3]]
    def key(cfg):
        gu, dn = C.split_config(cfg)
        return tuple(sorted(gu.items())), tuple(sorted(dn.items()))

    out = [("default", default, True)]
    seen = {key(default)}
    explored = 0
    for cfg, tuner in [*((c, True) for c in C.candidate_configs()), *((c, False) for c in extra)]:
        if not tuner and explored >= limit:
            break
        try:
            k = key(cfg)  # validates too
        except ValueError:
            continue
        if k in seen:
            continue
        if smem_limit and _smem_bytes(cfg, itemsize) > smem_limit:
            continue
        seen.add(k)
        explored += not tuner
        out.append((cfg_name(cfg), copy.deepcopy(cfg), tuner))
    return out


# ------------------------------------------------------------------------------------------- paths
def triton_mode(device: torch.device) -> str | None:
    """'cuda': the Triton kernels on the GPU; 'interpret': TRITON_INTERPRET=1 on CPU tensors;
    None: no Triton here (the moec path falls back to the registered ops' CPU reference)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if device.type == "cuda":
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpret"
    return None


def route_reference(hidden, gate_w, top_k, renormalize):
    """HF's router computation (bf16/fp16 logits, fp32 softmax, topk, renormalise): probs too."""
    logits = F.linear(hidden, gate_w)
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids, probs


class Layer:
    """One MoE layer's weights (shared by every path) and the paths as callables of hidden [T, H]."""

    def __init__(self, name: str, spec: dict, device, dtype, mode: str | None, seed: int, index: int):
        self.name, self.spec, self.device, self.dtype, self.mode = name, spec, device, dtype, mode
        self.seed_offset = index
        H, I, E = spec["hidden"], spec["inter"], spec["experts"]
        self.H, self.I, self.E, self.K = H, I, E, spec["top_k"]
        self.renormalize = True  # Mixtral always; Qwen3-30B-A3B has norm_topk_prob=true
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        # scaled so activations stay O(1); router logits ~ N(0, 1): realistic, not degenerate, routing
        self.gate_w = (torch.randn(E, H, generator=g, device=device, dtype=dtype) * H ** -0.5).contiguous()
        self.w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype).mul_(H ** -0.5)
        self.w2 = torch.randn(E, H, I, generator=g, device=device, dtype=dtype).mul_(I ** -0.5)
        self._w32 = None
        # the compiler's grouped_mm path, as its tuner times it: through Inductor, T symbolic (on
        # CUDA; op by op elsewhere, where there is nothing to time)
        from moec.compiler.passes.moe_tuning import compiled_grouped_mm
        from moec.ops.fused_moe import fused_moe_grouped_mm
        self._grouped_mm = compiled_grouped_mm() if torch.device(device).type == "cuda" else fused_moe_grouped_mm
        if mode is not None:
            from moec.ops.triton.fused_moe import fused_moe as fused_moe_triton
            from moec.ops.triton.router import fused_router
            self._fused_moe, self._fused_router = fused_moe_triton, fused_router

    def drop_fp32(self) -> None:
        self._w32 = None

    def weights_fp32(self):
        if self._w32 is None:
            self._w32 = (self.w13.float(), self.w2.float())
        return self._w32

    # routers ----------------------------------------------------------------------------------
    def route(self, hidden):
        """moec's router: (weights f32 [T, K], ids [T, K]); on the Triton path without the
        per-expert counts, as the compiled op runs it."""
        if self.mode is not None:
            return self._fused_router(hidden, self.gate_w, self.K, self.renormalize, count=False)[:2]
        return torch.ops.moec.moe_router(hidden, self.gate_w, self.K, self.renormalize)

    def dense_bmm(self, T: int, experts_hit: int):
        """The same GEMM work as cuBLAS batched GEMMs, the easiest form it can take: the experts
        that were hit, T*K rows spread evenly over them, already in expert order (no routing,
        gather, padding, activation or weighted sum; random intermediate). What no grouped kernel
        can be expected to beat: the ceiling of the GEMMs themselves at this T. -> a callable."""
        rows = -(-T * self.K // experts_hit)
        g = torch.Generator(device=self.device).manual_seed(T)
        x = torch.randn(experts_hit, rows, self.H, generator=g, device=self.device, dtype=self.dtype)
        h = torch.randn(experts_hit, rows, self.I, generator=g, device=self.device, dtype=self.dtype)
        w13, w2 = self.w13[:experts_hit].transpose(1, 2), self.w2[:experts_hit].transpose(1, 2)
        gate_up = torch.empty(experts_hit, rows, 2 * self.I, device=self.device, dtype=self.dtype)
        down = torch.empty(experts_hit, rows, self.H, device=self.device, dtype=self.dtype)

        def run():
            torch.bmm(x, w13, out=gate_up)
            return torch.bmm(h, w2, out=down)
        return run

    # paths ------------------------------------------------------------------------------------
    def moec(self, hidden, config=None):
        w, ids = self.route(hidden)
        if self.mode is None:  # CPU without Triton: the op's reference body
            return torch.ops.moec.fused_moe(hidden, self.w13, self.w2, w, ids, "silu")
        return self._fused_moe(hidden, self.w13, self.w2, w, ids, "silu", config)

    def moec_ops(self, hidden):
        w, ids = torch.ops.moec.moe_router(hidden, self.gate_w, self.K, self.renormalize)
        return torch.ops.moec.fused_moe(hidden, self.w13, self.w2, w, ids, "silu")

    def grouped_mm(self, hidden):
        w, ids = self.route(hidden)
        return self._grouped_mm(hidden, self.w13, self.w2, w, ids, "silu")

    # HF blocks --------------------------------------------------------------------------------
    def hf_block(self, impl: str):
        """The HF block built as `from_config(config, experts_implementation=impl)` builds it: the
        config's `_experts_implementation` set to impl (the experts module dispatches on it), the
        module on the meta device, then its parameters replaced by this layer's tensors."""
        from torch import nn

        H, I, E, K = self.H, self.I, self.E, self.K
        if self.spec["arch"] == "mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

            cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                                hidden_act="silu", router_jitter_noise=0.0)
        else:
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

            cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                                 norm_topk_prob=self.renormalize, hidden_act="silu")
        cfg._experts_implementation = impl
        with torch.device("meta"):
            block = Block(cfg)
        want = {"gate.weight": (E, H), "experts.gate_up_proj": (E, 2 * I, H), "experts.down_proj": (E, H, I)}
        have = {n: tuple(p.shape) for n, p in block.named_parameters()}
        if have != want:
            raise RuntimeError(f"HF {Block.__name__} parameter layout {have} is not the expected {want}")
        block.gate.weight = nn.Parameter(self.gate_w, requires_grad=False)
        block.experts.gate_up_proj = nn.Parameter(self.w13, requires_grad=False)
        block.experts.down_proj = nn.Parameter(self.w2, requires_grad=False)
        left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"HF block still has meta tensors: {left}")
        got = getattr(block.experts.config, "_experts_implementation", None)
        if got != impl:
            raise RuntimeError(f"HF experts dispatch on {got!r}, wanted {impl!r}")
        return block.eval()


def experts_forward_name(block) -> str | None:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        impl = block.experts.config._experts_implementation
        fn = ALL_EXPERTS_FUNCTIONS.get_interface(impl, None) if impl != "eager" else None
        return fn.__name__ if fn is not None else f"{type(block.experts).__name__}.forward (eager loop)"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


# ------------------------------------------------------------------------------------- correctness
def routing_stats(ids: torch.Tensor, num_experts: int) -> dict:
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=num_experts)
    hit = counts[counts > 0]
    return {
        "experts_hit": int((counts > 0).sum()),
        "max_per_expert": int(counts.max()),
        "mean_per_expert": float(counts.float().mean()),
        "mean_per_hit_expert": float(hit.float().mean()),
        "min_per_hit_expert": int(hit.min()),
        "max_over_mean": float(counts.max() / counts.float().mean()),
    }


def compare(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
    """max abs err and its ratio to max |ref| (on `rows` if given), relative Frobenius error."""
    o, r = out.float(), ref.float()
    if rows is not None:
        o, r = o[rows], r[rows]
    if o.numel() == 0:
        return {"rows": 0, "max_abs_err": None, "ref_max_abs": None, "ratio": None, "rel_fro": None,
                "finite": True, "ok": True}
    finite = bool(torch.isfinite(o).all())
    err = (o - r).abs()
    max_err = float(err.max()) if finite else float("inf")
    ref_max = float(r.abs().max())
    ratio = max_err / ref_max if ref_max > 0 else (0.0 if max_err == 0 else float("inf"))
    rel_fro = float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))
    return {"rows": int(o.shape[0]), "max_abs_err": max_err, "ref_max_abs": ref_max, "ratio": ratio,
            "rel_fro": rel_fro, "finite": finite, "ok": bool(finite and ratio <= TOL)}


def routing_agreement(layer: Layer, hidden, moec_ids) -> tuple[torch.Tensor, dict]:
    """Tokens whose moec expert set equals HF's (the mask), and whether the others are ties: both
    sets' top-k probabilities sum to the same within TIE_TOL (bf16 logits tie often with many
    experts; moec takes the lower index, torch.topk either)."""
    _, hf_ids, probs = route_reference(hidden, layer.gate_w, layer.K, layer.renormalize)
    a = torch.sort(moec_ids.to(torch.int64), dim=-1).values
    b = torch.sort(hf_ids, dim=-1).values
    same = (a == b).all(dim=-1)
    diff_rows = (~same).nonzero().flatten()
    gap = 0.0
    if diff_rows.numel():
        pm = probs[diff_rows].gather(1, moec_ids[diff_rows].to(torch.int64)).sum(-1)
        ph = probs[diff_rows].gather(1, hf_ids[diff_rows]).sum(-1)
        gap = float((pm - ph).abs().max())
    return same, {"routing_mismatch_tokens": int(diff_rows.numel()), "routing_mismatch_are_ties": gap <= TIE_TOL,
                  "routing_mismatch_prob_gap": gap}


def check_against_hf(layer: Layer, hidden, out_moec, out_hf, moec_w, moec_ids, same, agree) -> dict:
    """moec vs HF eager on tokens routed to the same expert set (the others must be ties), and
    vs float32 arithmetic on moec's own routing (checks the kernels, not the router)."""
    res = compare(out_moec, out_hf, same)
    res.update(agree)
    res["all_tokens"] = compare(out_moec, out_hf)
    res["ok"] = bool(res["ok"] and agree["routing_mismatch_are_ties"])
    from moec.ops.moe_combine import moe_combine_ref
    from moec.ops.moe_experts import moe_experts_ref

    w13f, w2f = layer.weights_fp32()
    with _ieee_fp32():
        ref32 = moe_combine_ref(moe_experts_ref(hidden.float(), w13f, w2f, moec_ids, "silu"), moec_w.float())
    res["vs_fp32_reference"] = compare(out_moec, ref32)
    return res


class _ieee_fp32:
    """float32 matmuls without TF32 for the reference."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


# ------------------------------------------------------------------------------------------ roofline
def roofline(layer: Layer, T: int, experts_hit: int, copy_gbs: float, tflops: float) -> dict:
    item = torch.empty(0, dtype=layer.dtype).element_size()
    H, I, E, K = layer.H, layer.I, layer.E, layer.K
    weight_bytes = experts_hit * 3 * H * I * item
    router_bytes = E * H * item
    act_bytes = 2 * T * H * item
    nbytes = weight_bytes + router_bytes + act_bytes
    flops = 2.0 * T * K * (H * 2 * I + I * H) + 2.0 * T * H * E
    t_mem = nbytes / (copy_gbs * 1e9) * 1e3
    t_cmp = flops / (tflops * 1e12) * 1e3
    return {"bytes": nbytes, "weight_bytes": weight_bytes, "flops": flops, "memory_ms": t_mem,
            "compute_ms": t_cmp, "roofline_ms": max(t_mem, t_cmp),
            "bound": "memory" if t_mem >= t_cmp else "compute"}


# ---------------------------------------------------------------------------------------- one case
def dynamo_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def dynamo_graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def case_hidden(layer: Layer, T: int, seed: int) -> torch.Tensor:
    """The case's input, the same in both phases: a generator seeded from (seed, shape, T)."""
    g = torch.Generator(device=layer.device).manual_seed(seed * 1_000_003 + layer.seed_offset * 100_003 + T)
    return torch.randn(T, layer.H, generator=g, device=layer.device, dtype=layer.dtype)


def timing_kwargs(ctx: dict) -> dict:
    cuda = ctx["device"].type == "cuda"
    return {"warmup": 3 if cuda else 1, "min_iters": ctx["iters"],
            "max_iters": max(ctx["iters"], 200) if cuda else ctx["iters"], "target_s": 0.25 if cuda else 0.0}


def measure_case(layer: Layer, T: int, ctx: dict) -> dict:
    """Phase 1: every path once (outputs checked), then timed; CUDA-graph timings for small T."""
    args, device, flush, budget = ctx["args"], ctx["device"], ctx["flush"], ctx["budget"]
    mode = layer.mode
    timing = timing_kwargs(ctx)
    case: dict = {"shape": layer.name, "tokens": T, "timings": {}, "errors": {}, "skipped": {}, "notes": []}
    hidden = case_hidden(layer, T, args.seed)
    hidden3 = hidden.unsqueeze(0)  # HF blocks take [batch, seq, hidden]

    def attempt(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record, report, carry on with the other paths
            case["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            log(f"  !! {name} failed: {type(e).__name__}: {str(e)[:300]}")
            if os.environ.get("MOE_BENCH_DEBUG"):
                traceback.print_exc()
            return None

    # routing of these inputs (moec's router; its reference if the Triton one fails)
    routed = attempt("moec_router", lambda: layer.route(hidden))
    if routed is None:
        routed = torch.ops.moec.moe_router(hidden, layer.gate_w, layer.K, layer.renormalize)
    w, ids = routed
    del routed
    stats = routing_stats(ids, layer.E)
    case["routing"] = stats
    rows = -(-T * layer.K // layer.E)
    case["rows_per_expert"] = rows
    try:
        from moec.ops.triton.configs import bucket_for
        case["bucket"] = bucket_for(max(rows, 1))
    except ImportError:
        case["bucket"] = None
    case["default_config"] = C_default(T, layer)
    case["roofline"] = roofline(layer, T, stats["experts_hit"], ctx["copy_gbs"], ctx["tflops"])

    # outputs once (also the first warm-up) --------------------------------------------------------
    paths = {
        "moec": lambda: layer.moec(hidden),
        "moec_ops": lambda: layer.moec_ops(hidden),
        "grouped_mm": lambda: layer.grouped_mm(hidden),
    }
    if ctx.get("hf_eager") is not None:
        paths["hf_eager"] = lambda: ctx["hf_eager"](hidden3).view(T, layer.H)
    else:
        case["skipped"]["hf_eager"] = "HF block could not be built"
    if mode is None:
        case["skipped"]["moec_triton"] = ("no CUDA and TRITON_INTERPRET unset: 'moec' is the registered "
                                          "ops' CPU reference, no Triton kernel ran")
        del paths["moec_ops"]  # the same function as 'moec' here
    outs = {}
    for name, fn in paths.items():
        out = attempt(name, fn)
        if out is not None:
            outs[name] = out

    compiled = ctx.get("hf_compiled")
    if compiled is not None and not budget.compile_ok():
        case["skipped"]["hf_compile"] = f"budget: {budget.elapsed():.0f} s elapsed"
        compiled = None
    if compiled is not None:
        def compile_warm():
            g0 = dynamo_graph_count()
            t0 = time.perf_counter()
            out = compiled(hidden3).view(T, layer.H)
            _sync(device)
            info = {"first_call_s": time.perf_counter() - t0, "graphs_first_call": dynamo_graph_count() - g0}
            calls = 1
            for _ in range(5):  # until a call compiles nothing new
                g1 = dynamo_graph_count()
                out = compiled(hidden3).view(T, layer.H)
                calls += 1
                if dynamo_graph_count() == g1:
                    break
            _sync(device)
            info.update({"warm_calls": calls, "graphs_total": dynamo_graph_count() - g0,
                         "graph_breaks_so_far": dynamo_graph_breaks()})
            case["hf_compile_warmup"] = info
            return out
        out = attempt("hf_compile", compile_warm)
        if out is not None:
            outs["hf_compile"] = out
            paths["hf_compile"] = lambda: compiled(hidden3).view(T, layer.H)
    elif "hf_compile" not in case["skipped"]:
        case["skipped"]["hf_compile"] = ctx.get("compile_skip_reason") or "HF block could not be built"

    # correctness --------------------------------------------------------------------------------------
    corr = {}
    same, agree = routing_agreement(layer, hidden, ids)
    case["routing"].update(agree)
    if "moec" in outs and "hf_eager" in outs:
        corr["moec_vs_hf_eager"] = attempt("check_moec", lambda: check_against_hf(
            layer, hidden, outs["moec"], outs["hf_eager"], w, ids, same, agree))
    for other in ("moec_ops", "grouped_mm", "hf_compile"):
        if other in outs and "hf_eager" in outs:
            # on the tokens moec and HF route alike (ties aside, every router here agrees)
            c = compare(outs[other], outs["hf_eager"], same)
            c["all_tokens"] = compare(outs[other], outs["hf_eager"])
            corr[f"{other}_vs_hf_eager"] = c
    case["correctness"] = corr
    main = corr.get("moec_vs_hf_eager")
    case["correct"] = bool(main and main.get("ok"))
    case["check"] = "ok" if case["correct"] else ("MISMATCH" if main else "NOT CHECKED")
    if main and not main.get("ok"):
        log(f"  !!!!! MISMATCH {layer.name} T={T}: moec vs HF eager: max abs err {main.get('max_abs_err')} = "
            f"{main.get('ratio')} x max|ref| (limit {TOL}); routing mismatches {main.get('routing_mismatch_tokens')}"
            f" (ties: {main.get('routing_mismatch_are_ties')}); finite {main.get('finite')}")
    elif not main:
        log(f"  !!!!! NOT CHECKED {layer.name} T={T}: no moec or HF eager output")
    for name, c in corr.items():
        if name != "moec_vs_hf_eager" and c and not c.get("ok"):
            case["notes"].append(f"{name}: ratio {c.get('ratio')} above {TOL}")
    del outs

    # timings ------------------------------------------------------------------------------------------
    for name, fn in paths.items():
        if name in case["errors"]:
            continue
        t = attempt(f"time_{name}", lambda fn=fn: time_fn(fn, device, flush=flush, **timing))
        if t is not None:
            case["timings"][name] = t
    if device.type == "cuda" and T <= args.graph_max_tokens:
        gt = {k: v for k, v in timing.items() if k != "warmup"}
        graphs = {}
        for name in ("moec", "grouped_mm", "hf_compile"):
            if name in case["timings"]:
                r = attempt(f"{name}_graph", lambda name=name: time_graph(paths[name], device, flush=flush, **gt))
                if r is not None:
                    case["timings"][f"{name}_graph"] = r[0]
                    graphs[name] = r[1][1]
                    del r
        # the GEMMs' own ceiling at this T (cuBLAS bmm, evenly spread rows), timed alongside
        bmm = attempt("dense_bmm_graph", lambda: time_graph(layer.dense_bmm(T, case["routing"]["experts_hit"]),
                                                            device, flush=flush, **gt))
        if bmm is not None:
            case["timings"]["dense_bmm_graph"] = bmm[0]
            graphs["dense_bmm"] = bmm[1][1]
            del bmm
        if len(graphs) > 1:  # the same replays again, round by round: one clock drift for all
            r = attempt("graphs_interleaved", lambda: time_interleaved({n: g.replay for n, g in graphs.items()}, device,
                                                                       flush=flush, rounds=max(gt["min_iters"], 30)))
            for name, t in (r or {}).items():
                case["timings"][f"{name}_graph_interleaved"] = t
        del graphs
    elif device.type != "cuda":
        case["skipped"]["graphs"] = "CUDA graphs need a GPU"
    if T in ctx["profile_tokens"]:
        case["profile"] = {name: attempt(f"profile_{name}", lambda fn=fn: profile_kernels(fn, device))
                           for name, fn in paths.items() if name in PROFILED}
    del hidden, hidden3, w, ids, paths, same
    finalize_case(case)
    return case


PROFILED = ("moec", "grouped_mm", "hf_compile")  # what --profile-tokens breaks down


def profile_kernels(fn, device: torch.device, calls: int = 3, top: int = 10) -> list[dict]:
    """Where one call's time goes: the device's kernels (the CPU's operators on a CPU) by total
    time per call, from torch.profiler over `calls` calls after a warm-up call."""
    fn()
    _sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    rows = []
    for ev in prof.key_averages():
        us = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total) / calls
        if us > 0 and (device.type != "cuda" or ev.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"name": ev.key[:120], "us_per_call": us, "count_per_call": ev.count / calls})
    rows.sort(key=lambda r: -r["us_per_call"])
    return rows[:top]


def sweep_reason(layer: Layer, T: int, case: dict, ctx: dict) -> str | None:
    """Why this case gets no sweep (None: it gets one)."""
    args = ctx["args"]
    if layer.mode is None:
        return "no Triton kernels here"
    if args.no_sweep:
        return "--no-sweep"
    if T > args.sweep_max_tokens:
        return f"T > --sweep-max-tokens {args.sweep_max_tokens}"
    if "moec" not in case["timings"]:
        return "moec default failed"
    return None


def sweep_case(layer: Layer, case: dict, ctx: dict) -> None:
    """Phase 2: candidate configs on the case's inputs, each checked against the default config's
    output and timed; the default re-timed alongside them. Stops when the budget is spent."""
    device, flush, budget, args = ctx["device"], ctx["flush"], ctx["budget"], ctx["args"]
    T = case["tokens"]
    timing = timing_kwargs(ctx)
    hidden = case_hidden(layer, T, args.seed)
    ref = layer.moec(hidden)
    cands = candidate_configs(T, layer.E, layer.K, args.max_configs, hidden.element_size(), ctx["smem_limit"])
    sweep = case["sweep"] = []

    def over_budget() -> bool:
        if budget.elapsed() > budget.seconds:
            case["skipped"]["sweep_rest"] = f"budget: {budget.elapsed():.0f} s elapsed of --budget-s {budget.seconds:.0f}"
            return True
        return False

    def time_config(name: str, cfg: dict, tuner: bool) -> None:
        entry = {"name": name, "config": cfg, "tuner": tuner}
        try:
            out = layer.moec(hidden, cfg)
            c = compare(out, ref)
            entry["vs_default"] = {"ratio": c["ratio"], "rel_fro": c["rel_fro"]}
            entry["ok"] = bool(c["finite"] and c["ratio"] is not None and c["ratio"] <= TOL)
            del out
            run = lambda cfg=cfg: layer.moec(hidden, cfg)  # noqa: E731
            if device.type == "cuda":  # as the artifact runs it: launched from C++ or replayed, not from Python
                timed, _ = time_graph(run, device, flush=flush, **{k: v for k, v in timing.items() if k != "warmup"})
            else:
                timed = time_fn(run, device, flush=flush, **timing)
            entry.update(_short(timed))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory on this chip
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            entry["ok"] = False
        sweep.append(entry)

    for name, cfg, tuner in cands:
        if over_budget():
            break
        time_config(name, cfg, tuner)
    # the compiler's tuner then tries other down-GEMM settings on its fastest config (refined ones
    # count as the tuner's: the artifact can run them)
    from moec.ops.triton.configs import down_variants

    tuner_good = [s for s in sweep if s["tuner"] and s.get("ok") and s.get("median_ms") is not None]
    refined = []
    if tuner_good and not case["skipped"].get("sweep_rest"):
        best = min(tuner_good, key=lambda s: s["median_ms"])
        names = {s["name"] for s in sweep}
        for cfg in down_variants(best["config"]):
            if over_budget():
                break
            if cfg_name(cfg) in names:
                continue
            refined.append(cfg_name(cfg))
            time_config(cfg_name(cfg), cfg, True)
    good = [s for s in sweep if s.get("ok") and s.get("median_ms") is not None]
    if good:
        best = min(good, key=lambda s: s["median_ms"])
        case["best_config"] = {"name": best["name"], "config": best["config"], "median_ms": best["median_ms"],
                               "default_ms_in_sweep": next((s.get("median_ms") for s in sweep
                                                            if s["name"] == "default"), None)}
        case["timings"]["moec_best"] = {"median_ms": best["median_ms"], "config": best["name"]}
    # what the artifact would run at this T: the tuner's fastest candidate, grouped_mm included;
    # only once every tuner candidate was timed (a budget-cut sweep would understate it)
    tuner_names = {name for name, _, tuner in cands if tuner} | set(refined)
    timed = {s["name"]: s["median_ms"] for s in good if s["tuner"]}
    if tuner_names <= {s["name"] for s in sweep}:
        if "grouped_mm_graph" in case["timings"]:
            timed["grouped_mm"] = case["timings"]["grouped_mm_graph"]["median_ms"]
        if timed:
            pick = min(timed, key=timed.get)
            case["timings"]["moec_tuned"] = {"median_ms": timed[pick], "config": pick}
            final = attempt_final(layer, hidden, case, good, timed, ctx)
            if final is not None:
                case["timings"]["moec_tuned"] = final
    else:
        case["skipped"]["moec_tuned"] = "the sweep did not time every tuner candidate (budget)"
    del hidden, ref
    finalize_case(case)


def attempt_final(layer: Layer, hidden, case: dict, good: list[dict], timed: dict, ctx: dict) -> dict | None:
    """The tuner's pick decided as the compiler's tuner decides it: its finalists
    (`moe_tuning.finalists`: within 15% of the fastest block median, the fastest of each path
    first, 4 at most) replayed round by round, order rotated, so that no clock drift between the
    sweep's blocks and phase 1 (seconds apart, the GPU hotter by then: its power cap) ranks them.
    -> moec_tuned's timing (with every finalist's median), or None where there is one finalist
    or the replays fail (the block medians' pick stands)."""
    from moec.compiler.passes.moe_tuning import GROUPED_MM, finalists

    device, flush = ctx["device"], ctx["flush"]
    by_name = {s["name"]: s["config"] for s in good if s["tuner"]}
    names = finalists(timed, {n: GROUPED_MM if n == GROUPED_MM else "triton" for n in timed})
    if len(names) < 2:
        return None
    fns = {n: (lambda: layer.grouped_mm(hidden)) if n == GROUPED_MM else
           (lambda cfg=by_name[n]: layer.moec(hidden, cfg)) for n in names}
    try:
        if device.type == "cuda":  # (graph, output) pairs: the outputs stay alive with their graphs
            graphs = {n: capture_graph(fn, device) for n, fn in fns.items()}
            replays = {n: g.replay for n, (g, _) in graphs.items()}
        else:  # the CPU logic test: the calls themselves
            graphs, replays = None, fns
        rounds = time_interleaved(replays, device, flush=flush, rounds=30 if device.type == "cuda" else 3)
    except Exception as e:  # noqa: BLE001 - keep the block medians' pick
        case["errors"]["tuned_finalists"] = f"{type(e).__name__}: {e}"[:2000]
        return None
    del graphs, replays
    medians = {n: t["median_ms"] for n, t in rounds.items()}
    pick = min(medians, key=medians.get)
    return {"median_ms": medians[pick], "config": pick, "finalists_ms": medians,
            "timer": ("cuda_graph_replay" if device.type == "cuda" else "host clock") + ", interleaved"}


def finalize_case(case: dict) -> None:
    roof = case["roofline"]["roofline_ms"]
    tm = {k: v["median_ms"] for k, v in case["timings"].items()}
    case["derived"] = {
        "moec_over_roofline": _div(tm.get("moec"), roof),
        "moec_graph_over_roofline": _div(tm.get("moec_graph"), roof),
        "moec_best_over_roofline": _div(tm.get("moec_best"), roof),
        "moec_tuned_over_roofline": _div(tm.get("moec_tuned"), roof),
        "tuned_speedup_vs_hf_compile_graph": _div(tm.get("hf_compile_graph"), tm.get("moec_tuned")),
        "speedup_vs_hf_compile": _div(tm.get("hf_compile"), tm.get("moec")),
        "speedup_vs_hf_eager": _div(tm.get("hf_eager"), tm.get("moec")),
        "best_speedup_vs_hf_compile": _div(tm.get("hf_compile"), tm.get("moec_best")),
        "graph_speedup_vs_hf_compile_graph": _div(tm.get("hf_compile_graph"), tm.get("moec_graph")),
        "speedup_vs_grouped_mm": _div(tm.get("grouped_mm"), tm.get("moec")),
        "graph_speedup_vs_grouped_mm_graph": _div(tm.get("grouped_mm_graph"), tm.get("moec_graph")),
    }
    # the tuner's pick where it was also timed round by round with transformers' replay (the
    # grouped_mm path, or the default config): a comparison no clock drift over a block can bias
    pick = (case["timings"].get("moec_tuned") or {}).get("config")
    tuned = {"grouped_mm": tm.get("grouped_mm_graph_interleaved"), "default": tm.get("moec_graph_interleaved")}.get(pick)
    if tuned is not None and tm.get("hf_compile_graph_interleaved") is not None:
        case["derived"]["moec_tuned_interleaved_over_roofline"] = _div(tuned, roof)
        case["derived"]["tuned_interleaved_speedup_vs_hf_compile_graph"] = _div(tm["hf_compile_graph_interleaved"], tuned)
    for name in ("grouped_mm", "hf_compile", "dense_bmm"):
        if tm.get(f"{name}_graph_interleaved") is not None:
            case["derived"][f"{name}_interleaved_over_roofline"] = _div(tm[f"{name}_graph_interleaved"], roof)


def C_default(T: int, layer: Layer) -> dict | None:
    try:
        from moec.ops.triton.configs import default_config
        return default_config(T, layer.E, layer.K)
    except ImportError:
        return None


def _short(t: dict) -> dict:
    return {"median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"], "n": t["n"]}


def _div(a, b):
    return a / b if a is not None and b else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ results
def case_metrics(case: dict) -> list[dict]:
    p = f"{case['shape']}/T={case['tokens']}/"
    tm = {k: v["median_ms"] for k, v in case["timings"].items()}
    d = case["derived"]
    roof = case["roofline"]
    out = [metric(p + "roofline_ms", roof["roofline_ms"], "ms", "bound",
                  how=f"{roof['bound']}-bound; bytes {roof['bytes']}, flops {roof['flops']:.4g}")]
    for k in ("moec", "moec_graph", "moec_best", "moec_tuned", "moec_ops", "grouped_mm", "grouped_mm_graph",
              "hf_eager", "hf_compile", "hf_compile_graph", "moec_graph_interleaved", "grouped_mm_graph_interleaved",
              "hf_compile_graph_interleaved", "dense_bmm_graph", "dense_bmm_graph_interleaved"):
        if k in tm:
            out.append(metric(p + f"{k}_ms", tm[k], "ms", "lower", what=PATH_LABELS[k],
                              config=case["timings"][k].get("config")))
    for k, peer in (("moec_over_roofline", ROOF_PEER), ("moec_graph_over_roofline", ROOF_PEER),
                    ("moec_best_over_roofline", ROOF_PEER), ("moec_tuned_over_roofline", ROOF_PEER),
                    ("moec_tuned_interleaved_over_roofline", ROOF_PEER),
                    ("grouped_mm_interleaved_over_roofline", ROOF_PEER),
                    ("hf_compile_interleaved_over_roofline", ROOF_PEER),
                    ("dense_bmm_interleaved_over_roofline", ROOF_PEER)):
        if d.get(k) is not None:
            out.append(metric(p + k, d[k], "x", "lower", peer=peer))
    for k, peer in (("speedup_vs_hf_compile", HF_COMPILE_PEER), ("speedup_vs_hf_eager", HF_EAGER_PEER),
                    ("best_speedup_vs_hf_compile", HF_COMPILE_PEER),
                    ("graph_speedup_vs_hf_compile_graph", HF_COMPILE_PEER + ", both CUDA-graph replays"),
                    ("tuned_speedup_vs_hf_compile_graph", HF_COMPILE_PEER + ", both CUDA-graph replays"),
                    ("tuned_interleaved_speedup_vs_hf_compile_graph",
                     HF_COMPILE_PEER + ", both CUDA-graph replays, timed round by round"),
                    ("speedup_vs_grouped_mm", PATH_LABELS["grouped_mm"]),
                    ("graph_speedup_vs_grouped_mm_graph", PATH_LABELS["grouped_mm_graph"])):
        if d.get(k) is not None:
            out.append(metric(p + k, d[k], "x", "higher", peer=peer))
    c = case["correctness"].get("moec_vs_hf_eager")
    if c:
        out.append(metric(p + "max_abs_err_over_ref_max", c.get("ratio"), "ratio", "lower", peer=HF_EAGER_PEER,
                          threshold=TOL, passed=c.get("ok"),
                          routing_mismatch_tokens=c.get("routing_mismatch_tokens")))
    return out


def plot(cases: list[dict], path: Path, title: str) -> str | None:
    """Per shape: time vs tokens (log-log) with the roofline; below, each path's time over the roofline."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    shapes = list(dict.fromkeys(c["shape"] for c in cases))
    if not shapes:
        return "no plot: no cases"
    fig, axes = plt.subplots(2, len(shapes), figsize=(7 * len(shapes), 9.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    styles = [("moec", "moec (default cfg)", "C0", "o-"), ("moec_best", "moec (best cfg)", "C0", "^--"),
              ("moec_tuned", "moec (tuned, as compiled)", "C4", "*-"),
              ("moec_graph", "moec (CUDA graph)", "C0", "s"), ("grouped_mm", "torch._grouped_mm", "C2", "d-"),
              ("grouped_mm_graph", "torch._grouped_mm (CUDA graph)", "C2", "d"),
              ("hf_eager", "HF eager", "C3", "x-"), ("hf_compile", "HF grouped_mm + compile", "C1", "v-"),
              ("hf_compile_graph", "HF compile (CUDA graph)", "C1", "D")]
    for col, shape in enumerate(shapes):
        ax, axr = axes[0][col], axes[1][col]
        cs = sorted((c for c in cases if c["shape"] == shape), key=lambda c: c["tokens"])
        xs = [c["tokens"] for c in cs]
        ax.plot(xs, [c["roofline"]["roofline_ms"] for c in cs], "k--", lw=2, label="roofline")
        axr.axhline(1.0, color="k", ls="--", lw=2, label="roofline")
        for key, label, color, style in styles:
            pts = [(c["tokens"], c["timings"][key]["median_ms"], c["roofline"]["roofline_ms"])
                   for c in cs if key in c["timings"]]
            if pts:
                kw = {"color": color, "label": label, "ms": 6, "mfc": "none" if key.endswith("graph") else None}
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, **kw)
                axr.plot([p[0] for p in pts], [p[1] / p[2] for p in pts], style, **kw)
        bad = [(c["tokens"], c["timings"]["moec"]["median_ms"]) for c in cs
               if c.get("check") == "MISMATCH" and "moec" in c["timings"]]
        if bad:
            ax.plot(*zip(*bad), "r*", ms=16, label="moec MISMATCH vs HF")
        for a in (ax, axr):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.grid(True, which="both", alpha=0.3)
            a.set_xlabel("tokens")
        ax.set_ylabel("ms per MoE layer (median)")
        axr.set_ylabel("time / roofline")
        ax.set_title(shape)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.{nd}f}"
    return str(v)


def table(cases: list[dict]) -> str:
    head = ["shape", "T", "roof ms", "moec ms", "ratio", "graph ms", "g.ratio", "tuned ms", "t.ratio", "best ms",
            "gmm ms", "gmm graph", "HF eager", "HF compile", "HFc graph", "x compile", "g.x compile", "t.x compile",
            "t.ratio i", "t.x i", "bmm ratio", "ok", "tuned choice"]
    rows = [head]
    for c in cases:
        tm = {k: v["median_ms"] for k, v in c["timings"].items()}
        d = c["derived"]
        corr = c["correctness"].get("moec_vs_hf_eager") or {}
        ok = {"ok": "ok", "MISMATCH": "FAIL"}.get(c.get("check"), "n/c") + (
            f"({corr['ratio']:.0e})" if corr.get("ratio") is not None else "")
        rows.append([c["shape"], str(c["tokens"]), _fmt(c["roofline"]["roofline_ms"]), _fmt(tm.get("moec")),
                     _fmt(d["moec_over_roofline"], 2), _fmt(tm.get("moec_graph")),
                     _fmt(d["moec_graph_over_roofline"], 2), _fmt(tm.get("moec_tuned")),
                     _fmt(d.get("moec_tuned_over_roofline"), 2), _fmt(tm.get("moec_best")), _fmt(tm.get("grouped_mm")),
                     _fmt(tm.get("grouped_mm_graph")), _fmt(tm.get("hf_eager")), _fmt(tm.get("hf_compile")),
                     _fmt(tm.get("hf_compile_graph")), _fmt(d["speedup_vs_hf_compile"], 2),
                     _fmt(d["graph_speedup_vs_hf_compile_graph"], 2), _fmt(d.get("tuned_speedup_vs_hf_compile_graph"), 2),
                     _fmt(d.get("moec_tuned_interleaved_over_roofline"), 2),
                     _fmt(d.get("tuned_interleaved_speedup_vs_hf_compile_graph"), 2),
                     _fmt(d.get("dense_bmm_interleaved_over_roofline"), 2), ok, (c["timings"].get("moec_tuned") or {}).get("config", "-")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(x.rjust(w) if i not in (0, len(head) - 1) else x.ljust(w)
                               for i, (x, w) in enumerate(zip(r, widths))) for r in rows)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)

    import moec.ops  # noqa: F401 - registers torch.ops.moec.*

    mode = triton_mode(device)
    shapes = TINY_SHAPES if device.type != "cuda" else SHAPES
    if args.shapes:
        pick = [s.strip() for s in args.shapes.split(",") if s.strip()]
        allshapes = {**SHAPES, **TINY_SHAPES}
        unknown = [s for s in pick if s not in allshapes]
        if unknown:
            raise SystemExit(f"unknown shapes {unknown}; known: {sorted(allshapes)}")
        shapes = {s: allshapes[s] for s in pick}
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    elif args.quick:
        tokens = QUICK_TOKENS_GPU if device.type == "cuda" else QUICK_TOKENS_CPU
    else:
        tokens = TOKENS
    iters = args.iters or (20 if device.type == "cuda" else 5)
    if mode == "interpret" and dtype == torch.bfloat16:
        raise SystemExit("the Triton interpreter has no bf16: use --dtype float32")
    if args.quick and not args.no_sweep:
        args.max_configs = min(args.max_configs, 3 if device.type == "cuda" else 2)

    env = environment(device, args.commit)
    log(f"device   {env['device']['name']} ({device})")
    log("versions " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    log(f"date     {env['date']}   commit {env['commit']}")
    log(f"dtype    {str(dtype).replace('torch.', '')}   triton kernels: "
        f"{ {'cuda': 'GPU', 'interpret': 'TRITON_INTERPRET=1 (interpreter on CPU tensors)'}.get(mode, 'SKIPPED (no CUDA; moec = CPU reference of the registered ops)') }")

    compile_skip = None
    if args.no_compile:
        compile_skip = "--no-compile"
    elif device.type != "cuda" and not args.cpu_compile:
        compile_skip = "torch.compile path skipped on CPU (pass --cpu-compile to run it)"
    if compile_skip:
        log(f"note     HF grouped_mm + torch.compile: {compile_skip}")
    if device.type != "cuda":
        log("note     CPU: logic smoke test only; CUDA graphs skipped; timings are host-clock, not L2-flushed")

    result: dict = {
        "benchmark": "moe_layer",
        "issue": 3,
        **env,
        "dtype": str(dtype).replace("torch.", ""),
        "args": vars(args),
        "method": {
            "timer": "CUDA events around each call, L2 flushed (a read of max(256 MiB, 2 x L2)) before each "
                     "call outside the events, warm-up first, median of >= %d calls" % iters
                     if device.type == "cuda" else "perf_counter (CPU logic test)",
            "graph": f"CUDA-graph replay timings for T <= {args.graph_max_tokens}",
            "roofline": "max(bytes / copy_bw, flops / matmul_rate); bytes = 3*H*I*itemsize per expert hit + "
                        "E*H*itemsize router + 2*T*H*itemsize activations; flops = 2*T*K*(H*2I + I*H) + 2*T*H*E",
            "correctness": f"moec vs HF eager: max abs err <= {TOL} x max |HF| on tokens with the same expert "
                           f"set; differing sets must be ties (prob sums within {TIE_TOL}); also vs a float32 "
                           "reference on moec's routing",
            "inputs": "fresh randn hidden per case; weights randn scaled 1/sqrt(fan_in); router randn/sqrt(H) "
                      "(logits ~ N(0,1)); same tensors in every path",
            "hf_blocks": "built from a config whose _experts_implementation is set as "
                         "from_config(..., experts_implementation=...) sets it; parameters replaced by the "
                         "benchmark's tensors",
        },
        "triton_mode": mode,
        "ceilings": {},
        "cases": [],
        "metrics": [],
        "skipped": {},
    }
    if mode is None:
        result["skipped"]["triton"] = "no CUDA and TRITON_INTERPRET unset"
    if compile_skip:
        result["skipped"]["hf_compile"] = compile_skip
    json_path = out_dir / "moe_layer.json"
    png_path = out_dir / "moe_layer.png"

    # ceilings ----------------------------------------------------------------------------------------
    bw = copy_bandwidth(device)
    mm = matmul_rate(device)
    result["ceilings"] = {"copy_bandwidth": bw, "matmul": mm}
    base_metrics = [
        metric("copy_bandwidth", bw["value"], "GB/s", "higher", how=bw["how"]),
        metric("matmul_rate", mm["value"], "TFLOP/s", "higher", how=mm["how"]),
    ]
    result["metrics"] = list(base_metrics)
    log(f"ceilings copy {bw['value']:.0f} GB/s (read+write), matmul {mm['value']:.1f} TFLOP/s "
        f"({mm['dtype']} {mm['n']}^3)   [{budget.elapsed():.0f} s]")

    flush = L2Flusher(device)
    smem_limit = None
    if device.type == "cuda":
        smem_limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if device.type == "cuda" or args.cpu_compile:
        import torch._dynamo.config as dcfg
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 256))

    ctx = {"args": args, "device": device, "flush": flush, "budget": budget, "iters": iters,
           "copy_gbs": bw["value"], "tflops": mm["value"], "smem_limit": smem_limit,
           "compile_skip_reason": compile_skip,
           "profile_tokens": args.profile_tokens}

    def save() -> None:
        result["metrics"] = base_metrics + [m for c in result["cases"] for m in case_metrics(c)]
        result["elapsed_s"] = budget.elapsed()
        write_json(json_path, result)

    # phase 1: every path, every case -------------------------------------------------------------------
    layers: dict[str, Layer] = {}
    cases: dict[tuple[str, int], dict] = {}
    repeats: dict[int, list[dict]] = {k: [] for k in range(2, args.repeat + 1)}  # the same cases measured again
    for si, (name, spec) in enumerate(shapes.items()):
        log(f"\n== {name}: hidden {spec['hidden']}, intermediate {spec['inter']}, {spec['experts']} experts, "
            f"top-{spec['top_k']}   [{budget.elapsed():.0f} s]")
        layer = layers[name] = Layer(name, spec, device, dtype, mode, args.seed, si)
        ctx["hf_eager"] = ctx["hf_compiled"] = None
        shape_info = {}
        try:
            ctx["hf_eager"] = layer.hf_block("eager")
            gmm_block = layer.hf_block("grouped_mm")
            shape_info = {"hf_block": type(gmm_block).__name__,
                          "hf_eager_experts_forward": experts_forward_name(ctx["hf_eager"]),
                          "hf_grouped_mm_experts_forward": experts_forward_name(gmm_block)}
            if not compile_skip:
                ctx["hf_compiled"] = torch.compile(gmm_block, dynamic=False)
            log(f"   HF eager experts -> {shape_info['hf_eager_experts_forward']}; "
                f"HF grouped_mm experts -> {shape_info['hf_grouped_mm_experts_forward']}")
        except Exception as e:  # noqa: BLE001
            log(f"  !! building HF blocks failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            result["skipped"][f"{name}/hf"] = f"{type(e).__name__}: {e}"
        result.setdefault("shapes", {})[name] = {**spec, "dtype": str(dtype).replace("torch.", ""), **shape_info}

        for T in tokens:
            t0 = time.perf_counter()
            try:
                case = measure_case(layer, T, ctx)
            except Exception as e:  # noqa: BLE001 - keep the other cases
                log(f"  !! case {name} T={T} failed: {type(e).__name__}: {str(e)[:500]}")
                traceback.print_exc()
                result["skipped"][f"{name}/T={T}"] = f"{type(e).__name__}: {str(e)[:500]}"
                continue
            case["wall_s"] = time.perf_counter() - t0
            result["cases"].append(case)
            cases[(name, T)] = case
            tm = {k: v["median_ms"] for k, v in case["timings"].items()}
            r = case["routing"]
            log(f"  T={T:<6} hit {r['experts_hit']:>3}/{layer.E} max/mean {r['max_per_expert']}/"
                f"{r['mean_per_expert']:.1f}  roof {case['roofline']['roofline_ms']:.3f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in tm.items())
                + f"  {case['check']}  ({case['wall_s']:.1f} s, total {budget.elapsed():.0f} s)")
            if r.get("routing_mismatch_tokens"):
                log(f"     {r['routing_mismatch_tokens']} tokens routed differently from HF "
                    f"(ties: {r['routing_mismatch_are_ties']}, prob gap {r['routing_mismatch_prob_gap']:.1e})")
            if case["errors"]:
                log(f"     errors: {list(case['errors'])}")
            for k in repeats:  # back to back, the compiled paths warm: a flicker check's runs
                again = measure_case(layer, T, ctx)
                repeats[k].append(again)
                log(f"  T={T:<6} repeat {k}: " + "  ".join(f"{n} {v['median_ms']:.3f}" for n, v in again["timings"].items()))
            save()
        # free what phase 2 does not need: the HF blocks, compiled graphs, fp32 weights
        ctx["hf_eager"] = ctx["hf_compiled"] = None
        gmm_block = None
        layer.drop_fp32()
        if device.type == "cuda" or args.cpu_compile:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for k, again in repeats.items():  # each repeat as its own result, with its own ceilings
        bw_k, mm_k = copy_bandwidth(device), matmul_rate(device)
        write_json(out_dir / f"moe_layer-r{k}.json", {
            **{key: v for key, v in result.items() if key not in ("cases", "metrics")}, "repeat": k,
            "ceilings": {"copy_bandwidth": bw_k, "matmul": mm_k}, "cases": again,
            "metrics": [metric("copy_bandwidth", bw_k["value"], "GB/s", "higher", how=bw_k["how"]),
                        metric("matmul_rate", mm_k["value"], "TFLOP/s", "higher", how=mm_k["how"])]
            + [m for c in again for m in case_metrics(c)]})
        log(f"wrote {out_dir / f'moe_layer-r{k}.json'}")

    # phase 2: config sweeps, small token counts first, shapes interleaved, until the budget is spent ----
    log(f"\n== config sweeps (the tuner's candidates and up to {args.max_configs} more per case; "
        f"budget {args.budget_s:.0f} s)"
        f"   [{budget.elapsed():.0f} s]")
    for T in tokens:
        for name, layer in layers.items():
            case = cases.get((name, T))
            if case is None:
                continue
            reason = sweep_reason(layer, T, case, ctx)
            if reason is None and budget.elapsed() > budget.seconds:
                reason = f"budget: {budget.elapsed():.0f} s elapsed of --budget-s {budget.seconds:.0f}"
            if reason is not None:
                case["skipped"]["sweep"] = reason
                case.setdefault("sweep", [])
                continue
            t0 = time.perf_counter()
            try:
                sweep_case(layer, case, ctx)
            except Exception as e:  # noqa: BLE001
                case["errors"]["sweep"] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"  !! sweep {name} T={T} failed: {type(e).__name__}: {str(e)[:300]}")
            b = case.get("best_config") or {}
            log(f"  {name:<14} T={T:<6} {len(case.get('sweep', []))} configs, best {b.get('name', '-')} "
                f"{_fmt(b.get('median_ms'))} ms (default {_fmt(b.get('default_ms_in_sweep'))})"
                f"  ({time.perf_counter() - t0:.1f} s, total {budget.elapsed():.0f} s)")
            save()
    del layers
    gc.collect()

    # summary -------------------------------------------------------------------------------------------
    best = {}
    for c in result["cases"]:
        if c.get("best_config"):
            best.setdefault(c["shape"], {})[f"T={c['tokens']} (bucket {c['bucket']})"] = {
                "name": c["best_config"]["name"], "config": c["best_config"]["config"],
                "best_ms": c["best_config"]["median_ms"],
                "default_ms": c["best_config"].get("default_ms_in_sweep") or c["timings"]["moec"]["median_ms"]}
    result["best_configs"] = best
    result["all_correct"] = all(c.get("correct") for c in result["cases"])
    result["elapsed_s"] = budget.elapsed()
    title = (f"MoE layer, {result['dtype']}, {env['device']['name']};\nceilings {bw['value']:.4g} GB/s copy, "
             f"{mm['value']:.4g} TFLOP/s matmul;\ncommit {str(env['commit'])[:10]}; {env['date']}")
    err = plot(result["cases"], png_path, title)
    if err:
        result["skipped"]["plot"] = err
    write_json(json_path, result)

    log(f"\nwrote {json_path}" + ("" if err else f" and {png_path}") + f"   [{budget.elapsed():.0f} s]")
    if best:
        log("best config per case (sweep):")
        for shape, per in best.items():
            for key, b in per.items():
                log(f"  {shape:<14} {key:<22} {b['name']:<40} {b['best_ms']:.3f} ms (default {b['default_ms']:.3f})")
    skipped = {k: v for c in result["cases"] for k, v in c["skipped"].items()}
    if skipped or result["skipped"]:
        log("skipped: " + "; ".join(f"{k}: {v}" for k, v in {**result["skipped"], **skipped}.items()))
    for c in result["cases"]:
        for path, rows in (c.get("profile") or {}).items():
            log(f"profile {c['shape']} T={c['tokens']} {path}: " + ("failed" if rows is None else ", ".join(
                f"{r['name'][:40]} {r['us_per_call']:.0f}us x{r['count_per_call']:g}" for r in rows[:6])))
    if not result["all_correct"]:
        bad = [f"{c['shape']}/T={c['tokens']}" for c in result["cases"] if not c.get("correct")]
        log(f"!!!!! MISMATCH vs HF eager, or not checked: {bad}")
    log(f"\n{env['device']['name']} | {result['dtype']} | copy {bw['value']:.4g} GB/s | matmul "
        f"{mm['value']:.4g} TFLOP/s | torch {env['versions']['torch']} triton {env['versions']['triton']} "
        f"transformers {env['versions']['transformers']} | commit {str(env['commit'])[:12]}")
    log("ratio = time/roofline; graph = CUDA-graph replay; tuned = what the compiler's tuner picks at this T "
        "(its fastest candidate, grouped_mm included, CUDA-graph replays); best = fastest config of the sweep; gmm = "
        "torch._grouped_mm path; x compile = HF compile time / moec time; g.x / t.x compile = the same, CUDA-graph "
        "replays, moec's default / tuned; t.ratio i / t.x i = the tuned ratio and speed-up where the pick (grouped_mm "
        "or default) was timed round by round with HF compile's replay; bmm ratio = the GEMMs alone as cuBLAS bmm over "
        "evenly spread rows, over the roofline (their ceiling at this T); ok(e): e = max abs err / max|HF eager|")
    log(table(result["cases"]))
    return 0 if result["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
