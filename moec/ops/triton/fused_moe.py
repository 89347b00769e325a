"""The routed-experts part of an MoE block from the Triton kernels: align → gate/up → down,
and the plain-PyTorch composition of the existing references to compare with.

Launches, all sized from shapes (no host sync, no data-dependent shapes, so the sequence can be
captured in a CUDA graph and traced with a symbolic token count): 2 for the expert histograms
(above one chunk of assignments only, `align.chunkings`: below, the scatter counts its one chunk
itself; where experts are many, one pair per chunking, gated by T), then per config a scatter
(align; one per chunking, gated alike), the gate/up GEMM (which also zeroes the output) and the
down GEMM (which accumulates into it): 3 to 5 launches run for one config. A few tokens (T = 1, and up to
`direct_tokens`: 16 for Qwen3-30B-A3B, 4 for Mixtral) run the two GEMMs alone, a row
block per assignment with its expert read straight from topk_ids, each expert's rows (one per
token that chose it) computed by the block of its first assignment (DIRECT): 2 launches, none
before the first GEMM. A range that holds such token counts compiles both variants of its GEMMs
in, gated by T <= direct_tokens (and its BLOCK_M) and above.

A tuned plan (`configs.parse_plan`) gives a config per token range. Every config of the plan is
compiled in, and each of its launches has its grid multiplied by a gate: 1 when T is in the
config's range, else 0. With a concrete T the other ranges are simply not launched. With a
symbolic T (export, AOTInductor) the gate is an integer expression of T — floor divisions and
min/max, no branch and so no guard — and a launch whose grid comes to 0 does not happen
(AOTInductor's C++ launcher returns on a zero grid, as Triton's does). One compiled graph thus
runs the decode config at decode and the prefill config at prefill. Each range allocates its own
small align buffers; the [T*K, I] intermediate and the output are shared.
"""

from __future__ import annotations

import copy

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moec.ops.moe_combine import moe_combine_ref
from moec.ops.moe_experts import moe_experts_ref
from moec.ops.triton.align import align_scatter, expert_histograms
from moec.ops.triton.configs import DYNAMIC_CONFIG, default_config, split_config
from moec.ops.triton.grouped_gemm import ACTIVATION_CODES, unit_last_stride, down_grouped, gate_up_grouped
from moec.ops.triton.token_gate import never, token_range_gate

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def direct_tokens(num_experts: int, top_k: int) -> int:
    """Token counts up to this run DIRECT (no align launch; a row block per assignment): while
    T*K <= E, i.e. no more assignments than experts (and T <= BLOCK_M, which `fused_moe` adds).
    At least 1. On an H100 (step_kernels-h100-2026-12-06T1429), with DIRECT reading each expert
    once: Qwen3-30B-A3B's experts (E=128, K=8) at 4, 8 and 16 tokens took 110, 176 and 263 us
    DIRECT against 116, 185 and 275 aligned; Mixtral's (E=8, K=2) at 2 and 4 tokens 477 and 588
    against 480 and 592, and at 8 tokens (past the rule) 947 against 949, or 933 persistent."""
    return max(1, num_experts // top_k)


def select_config(num_tokens, num_experts: int, top_k: int) -> dict:
    """The default table's config for a concrete token count; DYNAMIC_CONFIG for a symbolic one
    (choosing by a symbolic size would guard on it and specialise the compiled graph)."""
    if isinstance(num_tokens, int):
        return default_config(num_tokens, num_experts, top_k)
    return copy.deepcopy(DYNAMIC_CONFIG)


def check_shapes(hidden, w13, w2, topk_weights, topk_ids, activation: str) -> None:
    """Raise ValueError naming the problem for inputs the kernels do not support."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"fused_moe: unknown activation {activation!r}; one of {sorted(ACTIVATION_CODES)}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"fused_moe: want hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
            f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    num_experts, two_i, hidden_size = w13.shape
    if two_i % 2 or tuple(w2.shape) != (num_experts, hidden_size, two_i // 2) or hidden.shape[1] != hidden_size:
        raise ValueError(
            f"fused_moe: inconsistent shapes hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    if topk_ids.dim() != 2 or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must be [T, K]"
        )
    if not 1 <= topk_ids.shape[1] <= num_experts:
        raise ValueError(f"fused_moe: top_k={topk_ids.shape[1]} with {num_experts} experts")
    if hidden.dtype not in SUPPORTED_DTYPES or w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(
            f"fused_moe: hidden/w13/w2 must share one of bf16/fp16/fp32; got {hidden.dtype}, {w13.dtype}, {w2.dtype}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    config: dict | None = None,
    plan: dict | None = None,
) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights
    [T, K] (f32); topk_ids [T, K] → [T, H] = sum_k w[t,k] * expert_{id[t,k]}(hidden[t]).

    `config`: one config for every T (see `moec.ops.triton.configs`). `plan`: a parsed triton
    plan, a config per token range. Neither: the default for this token count.
    """
    check_shapes(hidden, w13, w2, topk_weights, topk_ids, activation)
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if config is not None:
        ranges = [(None, config)]
    elif plan is not None:
        if plan["path"] != "triton":
            raise ValueError(f"fused_moe (Triton): plan path {plan['path']!r} is not a Triton plan")
        ranges = plan["ranges"]
    else:
        ranges = [(None, select_config(num_tokens, num_experts, top_k))]
    launches = [(hi, *split_config(cfg)) for hi, cfg in ranges]  # validated before anything runs
    if statically_known_true(num_tokens == 0):
        return hidden.new_empty(0, hidden_size)

    hidden, w13, w2 = unit_last_stride(hidden), unit_last_stride(w13), unit_last_stride(w2)
    out = torch.empty(num_tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    inter = torch.empty(num_tokens * top_k, two_i // 2, dtype=hidden.dtype, device=hidden.device)
    # DIRECT (no histograms, no scatter: each assignment its own row block) runs in every range
    # for its T up to direct_tokens and its config's BLOCK_M (a row block holds one row per
    # token), the aligned path for the rest of the range: the config the tuner timed at a T runs
    # there the way it was timed
    cap = direct_tokens(num_experts, top_k)
    spans, lo = [], 0  # (direct gate, aligned gate, configs) per range
    for hi, gate_up_cfg, down_cfg in launches:
        direct_hi = max(lo, min(cap, gate_up_cfg["BLOCK_M"], cap if hi is None else hi))  # lo: no DIRECT
        direct = token_range_gate(num_tokens, lo, direct_hi) if direct_hi > lo else 0
        aligned = token_range_gate(num_tokens, direct_hi, hi) if hi is None or hi > direct_hi else 0
        spans.append((direct, aligned, gate_up_cfg, down_cfg))
        lo = hi
    hist = expert_histograms(topk_ids, num_experts, 1 - sum(direct for direct, *_ in spans))
    zero_out = out if top_k > 1 else None
    for direct, aligned, gate_up_cfg, down_cfg in spans:
        if not never(aligned):
            align = align_scatter(hist, gate_up_cfg["BLOCK_M"], aligned)
            gate_up_grouped(hidden, w13, *align, top_k, gate_up_cfg, activation, out=inter, zero_out=zero_out,
                            gate=aligned)
            down_grouped(inter, w2, topk_weights, *align, down_cfg, out=out, gate=aligned)
        if not never(direct):
            # the same two GEMMs, each assignment its own row block, its expert read from topk_ids
            gate_up_grouped(hidden, w13, None, None, None, top_k, gate_up_cfg, activation, out=inter,
                            zero_out=zero_out, gate=direct, direct_ids=topk_ids)
            down_grouped(inter, w2, topk_weights, None, None, None, down_cfg, out=out, gate=direct,
                         direct_ids=topk_ids)
    return out


def fused_moe_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The existing references composed (moe_experts_ref, then moe_combine_ref): the oracle."""
    return moe_combine_ref(moe_experts_ref(hidden, w13, w2, topk_ids, activation), topk_weights)
