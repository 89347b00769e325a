"""Launch configs for the grouped GEMMs, and the default table used until a tuned one exists.

A config is a plain dict, one per `fused_moe` call:

    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
     "down": {"BLOCK_N": 64, "BLOCK_K": 128, ...}}   # optional overrides for the down GEMM

BLOCK_M is shared by both GEMMs (the sort/align step pads every expert to a multiple of it).
In the gate/up GEMM, BLOCK_N is the width of *each* half: a program computes BLOCK_N gate
columns and the matching BLOCK_N up columns, so its tile is effectively BLOCK_M x 2*BLOCK_N.
"PERSISTENT": true (optional, default false; the down GEMM may override it) launches about one
program per SM, each looping over tiles, instead of one program per tile.

The default table is keyed by a token-count bucket: the average number of rows each expert's
GEMM sees, ceil(T * top_k / E), which is what sets the GEMM shape (T tokens on Mixtral's 8
experts/top-2 give each expert 4x more rows than on Qwen3's 128 experts/top-8). The values are
untuned starting points for H100 in the spirit of vLLM's defaults; the compile-time tuner
replaces them per MoE shape and per token bucket, and records its choice in the manifest.
"""

from __future__ import annotations

import copy
import json

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 32768)

# What the CUDA kernels handle, stated here (no Triton import) so the compiler can reject a model
# before it is exported. `align` keeps one histogram lane per expert in registers: at most
# MAX_EXPERTS. Row indices (sorted_ids, slots) are int32 and every config's BLOCK_M is at most
# MAX_BLOCK_M, so T*K + min(T*K, E)*(MAX_BLOCK_M - 1) must stay below INT32_LIMIT. Within one
# expert the kernels offset weight pointers in int32: 2*I*H (w13) must stay below it too.
CUDA_DTYPES = ("bfloat16", "float16", "float32")
MAX_EXPERTS = 1024
MAX_BLOCK_M = 256
INT32_LIMIT = 2**31

_SMALL = {
    "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
    "down": {"BLOCK_N": 64, "BLOCK_K": 128},
}
_MEDIUM = {
    "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 4,
    "down": {"BLOCK_N": 64, "BLOCK_K": 128},
}
_LARGE = {
    "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
    "down": {"BLOCK_N": 128, "BLOCK_K": 64},
}
_HUGE = {
    "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4,
    "down": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
}
# compute-bound: gate/up persistent (one program per SM looping over tiles), down one program per
# tile. The fastest of step_kernels-h100-2026-12-06T0804's tiles at 256+ rows per expert: 645 and
# 603 TFLOP/s for Mixtral's and Qwen3's gate/up at 4096 and 16384 tokens, 15-20% above the same
# tile one program per tile; a persistent down was 2.4-3.6x slower there
_PERSISTENT = {
    "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 3,
    "PERSISTENT": True, "down": {"BLOCK_N": 256, "BLOCK_K": 64, "num_stages": 4, "PERSISTENT": False},
}

# The grouped_mm path's gate/up GEMM on CUDA (only its gate/up settings are used; CUTLASS runs the
# down GEMM): the persistent tile, which beat torch._grouped_mm's gate/up on the same routed rows
# from 1024 to 16384 tokens on both MoE shapes in step_kernels-h100-2026-12-06T0804, before
# counting the gather of x and the activation pass that GEMM needs around it
GROUPED_MM_GATE_UP = _PERSISTENT

# rows-per-expert bucket (upper bound) -> config
DEFAULT_CONFIGS: dict[int, dict] = {
    1: _SMALL, 4: _SMALL, 16: _SMALL,
    64: _MEDIUM,
    256: _LARGE,
    1024: _PERSISTENT, 4096: _PERSISTENT, 16384: _PERSISTENT, 32768: _PERSISTENT,
}

# Used when the token count is symbolic (an exported graph with a dynamic token dimension):
# kernels are compiled once, so one config must serve every T. BLOCK_M=64 costs little at decode
# (the weights are streamed once either way; only MMA work on padding rows grows) and is within
# ~2x of the best tile at prefill. The tuner's per-bucket choice replaces this.
DYNAMIC_CONFIG = _LARGE

# What the compile-time tuner times besides the table's rows (untuned guesses; the tuner's
# measurements decide): for decode, wider K tiles and more warps to stream the weights; for the
# middle, wider N in the down GEMM; for prefill, larger M/N tiles with L2-friendly GROUP_M. A
# config that does not compile for a shape and dtype (shared memory in fp32) fails in the tuner
# and is not chosen. Every one compiles for sm_90 in bf16 (tests/test_triton_kernels.py).
_VARIANTS = [
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
     "down": {"BLOCK_N": 64, "BLOCK_K": 256}},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 8, "num_stages": 3,
     "down": {"BLOCK_N": 128, "BLOCK_K": 128}},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 8, "num_stages": 4,
     "down": {"BLOCK_N": 128, "BLOCK_K": 128}},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
     "down": {"BLOCK_N": 128, "BLOCK_K": 64}},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16, "num_warps": 8, "num_stages": 3,
     "down": {"BLOCK_N": 256, "BLOCK_K": 64}},
    # the previous one with a 4-stage gate/up pipeline: fastest at 256-1024 tokens on Mixtral's
    # shape on an H200, by ~2% (e2e_decode-h200-2026-12-03T0938); 4-warp 64x256 and 128x128
    # gate/up tiles timed in the same run won no bucket and were dropped (each candidate adds
    # compile-time tuning)
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4,
     "down": {"BLOCK_N": 256, "BLOCK_K": 64, "num_stages": 3}},
    # many small experts (Qwen3-30B-A3B: 128 of I = 768): at one token, narrow tiles so the 8 hit
    # experts' weights spread over more programs; at 64-128 tokens (a few rows per expert), wide N
    # with 8 warps. From vLLM's tuned table for this shape on the H100 (its BLOCK_N spans gate and
    # up together: twice ours); not yet timed here
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
     "down": {"BLOCK_N": 32}},
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 8, "num_stages": 3},
    # the old 1024+ default (one program per tile, narrow gate/up), and the table's persistent
    # tile with a 4-stage gate/up pipeline (it fits: 224 KiB of shared memory)
    _HUGE,
    {**_PERSISTENT, "GROUP_M": 8, "num_stages": 4},
]


# Down-GEMM settings the tuner tries on each bucket's fastest config (same BLOCK_M, which the align
# step fixes for both GEMMs): the gate/up and down GEMMs have different shapes (N = 2I and K = H,
# then N = H and K = I), so the best down tile is not always the one its config carries. On the
# H200's Mixtral layer at one token the down GEMM took 480 us a step with N64 K128 and 442 with
# N64 K256 (e2e_decode-h200-2026-12-03T1342 against e2e_decode-h200-2026-12-03), while the
# gate/up GEMM was faster with the former's N64 K128 tile. Every entry fits sm_90's shared memory
# at its BLOCK_M in bf16 (tests/test_triton_kernels.py compiles them).
_DOWN_SMALL_M = [  # BLOCK_M <= 32: decode, streaming the weights
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 5},
]
_DOWN_LARGE_M = [  # BLOCK_M >= 64: prefill, compute
    # 128x128 in 3 stages: two programs fit on an SM at BLOCK_M 128 (96 KB of shared memory, ~110
    # registers), so one's atomic epilogue overlaps the other's loads: 1149 us against 1202 for the
    # 128x256 tile at Qwen3-30B-A3B's 16384 tokens on an H100 (step_kernels-h100-2026-12-06T0924)
    # and 1464 for this tile in 4 stages (one an SM; …T0920); 5% slower than 128x256 at Mixtral's 4096
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]


def down_variants(config: dict) -> list[dict]:
    """`config` with each other down-GEMM setting of its BLOCK_M's list (GROUP_M kept): what the
    tuner times after a bucket's candidates, on the fastest of them."""
    gate_up, down = split_config(config)
    out = []
    for settings in _DOWN_SMALL_M if gate_up["BLOCK_M"] <= 32 else _DOWN_LARGE_M:
        if all(down[k] == v for k, v in settings.items()):
            continue
        cfg = copy.deepcopy(config)
        cfg["down"] = {k: v for k, v in {**down, **settings}.items() if k != "BLOCK_M"}
        out.append(cfg)
    return out


def candidate_configs() -> list[dict]:
    """Every config the tuner times: the default table's rows, then the variants; distinct."""
    out, seen = [], set()
    for cfg in [*DEFAULT_CONFIGS.values(), *_VARIANTS]:
        name = config_name(cfg)
        if name not in seen:
            seen.add(name)
            out.append(copy.deepcopy(cfg))
    return out


def config_name(cfg: dict) -> str:
    """A short label: 'M16N64K128G1w4s4' for the gate/up launch, '|d…' for the down overrides."""
    gate_up, down = split_config(cfg)
    name = "M{BLOCK_M}N{BLOCK_N}K{BLOCK_K}G{GROUP_M}w{num_warps}s{num_stages}".format(**gate_up)
    name += "P" if gate_up["PERSISTENT"] else ""
    diff = {k: int(v) if isinstance(v, bool) else v for k, v in down.items() if gate_up[k] != v}
    if diff:
        abbr = {"BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G", "num_warps": "w", "num_stages": "s", "PERSISTENT": "P"}
        name += "|d" + "".join(f"{abbr[k]}{v}" for k, v in sorted(diff.items(), key=lambda kv: list(abbr).index(kv[0])))
    return name


_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def bucket_for(rows: int) -> int:
    """The smallest bucket >= rows (the largest bucket above the table)."""
    for b in TOKEN_BUCKETS:
        if rows <= b:
            return b
    return TOKEN_BUCKETS[-1]


def default_config(num_tokens: int, num_experts: int, top_k: int) -> dict:
    rows = -(-num_tokens * top_k // max(num_experts, 1))
    return copy.deepcopy(DEFAULT_CONFIGS[bucket_for(max(rows, 1))])


def _check_pow2(name: str, value: int, lo: int) -> None:
    if not isinstance(value, int) or value < lo or value & (value - 1):
        raise ValueError(f"MoE config: {name} must be a power of two >= {lo}, got {value!r}")


def split_config(config: dict) -> tuple[dict, dict]:
    """Validate a config; return (gate_up, down) launch dicts with every key filled in."""
    missing = [k for k in _KEYS if k not in config]
    if missing:
        raise ValueError(f"MoE config: missing {missing}")
    unknown = set(config) - set(_KEYS) - {"down", "PERSISTENT"}
    if unknown:
        raise ValueError(f"MoE config: unknown keys {sorted(unknown)}")
    gate_up = {k: config[k] for k in _KEYS} | {"PERSISTENT": config.get("PERSISTENT", False)}
    down = dict(gate_up)
    extra = config.get("down") or {}
    overridable = set(_KEYS) - {"BLOCK_M"} | {"PERSISTENT"}
    bad = set(extra) - overridable
    if bad:
        raise ValueError(f"MoE config: down may override {sorted(overridable)}, not {sorted(bad)}")
    down.update(extra)
    for cfg in (gate_up, down):
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            _check_pow2(k, cfg[k], 16)  # tl.dot needs every tile side >= 16
        if cfg["BLOCK_M"] > MAX_BLOCK_M:
            raise ValueError(f"MoE config: BLOCK_M must be <= {MAX_BLOCK_M}, got {cfg['BLOCK_M']}")
        _check_pow2("num_warps", cfg["num_warps"], 1)
        if not isinstance(cfg["GROUP_M"], int) or cfg["GROUP_M"] < 1:
            raise ValueError(f"MoE config: GROUP_M must be a positive int, got {cfg['GROUP_M']!r}")
        if not isinstance(cfg["num_stages"], int) or cfg["num_stages"] < 1:
            raise ValueError(f"MoE config: num_stages must be a positive int, got {cfg['num_stages']!r}")
        if not isinstance(cfg["PERSISTENT"], bool):
            raise ValueError(f"MoE config: PERSISTENT must be true or false, got {cfg['PERSISTENT']!r}")
    return gate_up, down


# A plan says what one `fused_moe` call runs; the tuner chooses it at compile time and the
# lowering pass hands it to the op as a string constant (its `plan` argument), so the compiled
# graph carries the choice and nothing is decided at run time but which token range T is in:
#   {"path": "triton", "ranges": [[16, cfg], [256, cfg], [null, cfg]]}
#       T <= 16 runs the first config, 16 < T <= 256 the second, larger T the last
#   {"path": "grouped_mm"}
#       sort + torch._grouped_mm (PyTorch's CUTLASS grouped GEMM) for every T
# The empty string is the untuned default (the table above; DYNAMIC_CONFIG for a symbolic T).
PLAN_PATHS = ("triton", "grouped_mm")


def parse_plan(text: str) -> dict | None:
    """The plan a `plan` string encodes, validated; None for the untuned default ("")."""
    if not text:
        return None
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"MoE plan: not JSON ({e})") from None
    if not isinstance(plan, dict) or plan.get("path") not in PLAN_PATHS:
        raise ValueError(f"MoE plan: want {{'path': one of {PLAN_PATHS}, ...}}, got {text[:80]!r}")
    if plan["path"] == "grouped_mm":
        if set(plan) != {"path"}:
            raise ValueError(f"MoE plan: grouped_mm takes no settings, got {sorted(set(plan) - {'path'})}")
        return plan
    ranges = plan.get("ranges")
    if set(plan) != {"path", "ranges"} or not isinstance(ranges, list) or not ranges:
        raise ValueError("MoE plan: triton needs a non-empty 'ranges' list and nothing else")
    bounds = [r[0] if isinstance(r, list) and len(r) == 2 else "bad" for r in ranges]
    if bounds[-1] is not None or not all(isinstance(b, int) and b >= 1 for b in bounds[:-1]) \
            or bounds[:-1] != sorted(set(bounds[:-1])):
        raise ValueError(f"MoE plan: ranges must be [max_tokens, config] pairs with increasing "
                         f"max_tokens and null last; got bounds {bounds}")
    for _, cfg in ranges:
        split_config(cfg)
    return {"path": "triton", "ranges": [(b, copy.deepcopy(c)) for b, c in ranges]}


def encode_plan(plan: dict) -> str:
    """The op's `plan` string for a plan dict (checked by parsing it back)."""
    text = json.dumps({"path": plan["path"], **({"ranges": [[b, c] for b, c in plan["ranges"]]}
                                                 if plan["path"] == "triton" else {})},
                      sort_keys=True, separators=(",", ":"))
    parse_plan(text)
    return text
