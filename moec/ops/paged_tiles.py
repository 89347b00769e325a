"""How the paged-attention kernel maps its programs to query tiles, computable without Triton.

The kernel gives each sequence's query tokens ceil(count / BLOCK_M) tiles and finds a program's
sequence from the cumulative tile ends (`sequence_tiles`). Those few small ops depend only on the
step's `seq_ids`, not on the layer: the compiled step computes them once (`PagedStep`) and every
layer's attention reads the same tensor, where computing them inside each call cost five tiny
kernels a layer (~35 us a decode step of an 8-layer model on an H200).

A compiled step (symbolic T) has two attention launches, each gated to no programs outside its
token range: 64-row tiles below PREFILL_MIN_TOKENS tokens (decode and short chunks) and 128-row
tiles from there on (a long prompt: twice the MMA work per key loaded). Each has its own BLOCK_M,
hence its own row of cumulative tile ends. Measured on an H200 (benchmarks/step_kernels.py,
2026-12-03, Mixtral's 32/8 heads of 128, one causal prompt): 128 rows x 128 keys took 0.525 ms
at 4096 tokens and 1.90 ms at 8192 against 0.551 and 2.14 for the 64-row tiles; at 2048 both
0.18 ms, at 1024 the 64-row tiles 4% faster.
"""

from __future__ import annotations

import torch

# rows of the score tile (query tokens x padded GQA group): the short-step config and the long
# prefill config; moec.ops.triton.paged_attention takes them from here
DYNAMIC_ROWS = 64
PREFILL_ROWS = 128
PREFILL_MIN_TOKENS = 2048  # steps of this many tokens or more run the prefill tiles
MAX_ROWS_LARGE_HEAD = 64  # head_dim > 128: the fp32 accumulator must stay in registers


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def fit_rows(rows: int, head_dim: int) -> int:
    return min(rows, MAX_ROWS_LARGE_HEAD) if head_dim > 128 else rows


def tile_tokens(num_heads: int, kv_heads: int, rows: int = DYNAMIC_ROWS) -> int:
    """BLOCK_M: the query tokens of one tile (its rows hold every head of a GQA group)."""
    return max(1, rows // next_pow2(num_heads // kv_heads))


def step_tile_tokens(num_heads: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """The BLOCK_M of each launch a compiled step makes (short steps, long prefill), distinct."""
    sizes = [tile_tokens(num_heads, kv_heads, fit_rows(r, head_dim)) for r in (DYNAMIC_ROWS, PREFILL_ROWS)]
    return tuple(dict.fromkeys(sizes))


def sequence_tiles(seq_ids: torch.Tensor, num_seqs, *block_ms: int) -> torch.Tensor:
    """[2 + len(block_ms), B] int32: per sequence its first query row, its query count, then for
    each BLOCK_M the cumulative number of tiles up to and including it. No host sync."""
    # counted by comparison, not by index_add_ of ones: Inductor lowers that add into a one-element
    # buffer (one sequence, a static B) as an atomic add whose index folds to a constant, and then
    # on CUDA (torch 2.11) drops its mask, so every lane of the last block counts and T comes out
    # rounded up to the block (under torch.compile(dynamic=True) a prefill of 3, 5 or 11 tokens
    # attended wrongly, rel. error 0.6-1.3: gpu_op_check-h100-2026-12-06T1104), and on CPU (2.13)
    # fails to compile. B x T compares, fused into one reduction
    seqs = torch.arange(num_seqs, dtype=seq_ids.dtype, device=seq_ids.device)
    counts = (seq_ids[None, :] == seqs[:, None]).sum(1, dtype=torch.int32)
    first = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    ends = [torch.cumsum(torch.div(counts + (m - 1), m, rounding_mode="floor"), 0, dtype=torch.int32)
            for m in block_ms]
    return torch.stack([first, counts, *ends])
