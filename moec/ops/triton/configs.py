"""Launch configs for the grouped GEMMs, and the default table used until a tuned one exists.

A config is a plain dict, one per `fused_moe` call:

    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
     "down": {"BLOCK_N": 64, "BLOCK_K": 128, ...}}   # optional overrides for the down GEMM

BLOCK_M is shared by both GEMMs (the sort/align step pads every expert to a multiple of it).
In the gate/up GEMM, BLOCK_N is the width of *each* half: a program computes BLOCK_N gate
columns and the matching BLOCK_N up columns, so its tile is effectively BLOCK_M x 2*BLOCK_N.

The default table is keyed by a token-count bucket: the average number of rows each expert's
GEMM sees, ceil(T * top_k / E), which is what sets the GEMM shape (T tokens on Mixtral's 8
experts/top-2 give each expert 4x more rows than on Qwen3's 128 experts/top-8). The values are
untuned starting points for H100 in the spirit of vLLM's defaults; the compile-time tuner
replaces them per MoE shape and per token bucket, and records its choice in the manifest.
"""

from __future__ import annotations

import copy

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 32768)

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

# rows-per-expert bucket (upper bound) -> config
DEFAULT_CONFIGS: dict[int, dict] = {
    1: _SMALL, 4: _SMALL, 16: _SMALL,
    64: _MEDIUM,
    256: _LARGE,
    1024: _HUGE, 4096: _HUGE, 16384: _HUGE, 32768: _HUGE,
}

# Used when the token count is symbolic (an exported graph with a dynamic token dimension):
# kernels are compiled once, so one config must serve every T. BLOCK_M=64 costs little at decode
# (the weights are streamed once either way; only MMA work on padding rows grows) and is within
# ~2x of the best tile at prefill. The tuner's per-bucket choice replaces this.
DYNAMIC_CONFIG = _LARGE

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
    unknown = set(config) - set(_KEYS) - {"down"}
    if unknown:
        raise ValueError(f"MoE config: unknown keys {sorted(unknown)}")
    gate_up = {k: config[k] for k in _KEYS}
    down = dict(gate_up)
    extra = config.get("down") or {}
    bad = set(extra) - (set(_KEYS) - {"BLOCK_M"})
    if bad:
        raise ValueError(f"MoE config: down may override {sorted(set(_KEYS) - {'BLOCK_M'})}, not {sorted(bad)}")
    down.update(extra)
    for cfg in (gate_up, down):
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            _check_pow2(k, cfg[k], 16)  # tl.dot needs every tile side >= 16
        _check_pow2("num_warps", cfg["num_warps"], 1)
        if not isinstance(cfg["GROUP_M"], int) or cfg["GROUP_M"] < 1:
            raise ValueError(f"MoE config: GROUP_M must be a positive int, got {cfg['GROUP_M']!r}")
        if not isinstance(cfg["num_stages"], int) or cfg["num_stages"] < 1:
            raise ValueError(f"MoE config: num_stages must be a positive int, got {cfg['num_stages']!r}")
    return gate_up, down
