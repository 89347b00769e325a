"""How the paged-attention kernel maps its programs to query tiles, computable without Triton.

The kernel gives each sequence's query tokens ceil(count / BLOCK_M) tiles and finds a program's
sequence from the cumulative tile ends (`sequence_tiles`). Those few small ops depend only on the
step's `seq_ids`, not on the layer: the compiled step computes them once (`PagedStep`) and every
layer's attention reads the same [3, B] tensor, where computing them inside each call cost five
tiny kernels a layer (~35 us a decode step of an 8-layer model on an H200).
"""

from __future__ import annotations

import torch

# rows of the score tile in the one config a compiled step (symbolic T) runs: tokens x padded
# GQA group; moec.ops.triton.paged_attention.DYNAMIC_CONFIG takes it from here
DYNAMIC_ROWS = 64


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def tile_tokens(num_heads: int, kv_heads: int, rows: int = DYNAMIC_ROWS) -> int:
    """BLOCK_M: the query tokens of one tile (its rows hold every head of a GQA group)."""
    return max(1, rows // next_pow2(num_heads // kv_heads))


def sequence_tiles(seq_ids: torch.Tensor, num_seqs, block_m: int) -> torch.Tensor:
    """[3, B] int32: per sequence its first query row, its query count and the cumulative number
    of BLOCK_M-token tiles up to and including it. Static shapes, no host sync."""
    ones = torch.ones_like(seq_ids, dtype=torch.int32)
    counts = torch.zeros(num_seqs, dtype=torch.int32, device=seq_ids.device).index_add_(0, seq_ids, ones)
    first = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    tile_end = torch.cumsum(torch.div(counts + (block_m - 1), block_m, rounding_mode="floor"), 0, dtype=torch.int32)
    return torch.stack([first, counts, tile_end])
