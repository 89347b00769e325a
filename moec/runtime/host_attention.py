"""Attention and the KV cache on the CPU: the executor of `moec::external_attention` (placement `cpu`).

MoE-Lightning's observation: in decode, attention reads the whole KV cache once per token and
does little else with it, so a CPU next to the cache does it at host-memory bandwidth, while
moving the cache to the GPU would spend the host link that the expert pages need. Only the
layer's new queries, keys and values come down (one copy) and the output goes back up.

The cache has the GPU cache's layout and block tables, so the scheduler, the allocator and the
prefix of every sequence work unchanged. `cpu_attention` gathers each sequence's blocks once: the
decoding sequences of a step (one token each) go through one `scaled_dot_product_attention` over
their padded contexts, and a prompt chunk through one call of its own with a causal mask offset by
its start. Micro-batches call `run` from several threads at once; they touch disjoint sequences.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F

from moec.ops.paged_attention import write_kv
from moec.runtime.kv_cache import allocate_kv_cache


def _visible(key_pos: torch.Tensor, positions: torch.Tensor, sliding_window: Optional[int]) -> torch.Tensor:
    """[..., L] bool: which key positions each query position sees (causal, within the window)."""
    mask = key_pos <= positions[..., None]
    if sliding_window is not None:
        mask &= key_pos > positions[..., None] - sliding_window
    return mask


def _gathered(plane: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """A layer's keys (or values) at `blocks` ([..., W] block ids), in order and cut to `length`
    positions, as float32 [..., Hkv, length, D]: one row copy per block (`index_select`), then the
    widening, so the attention itself runs in fp32 (a CPU without fast bf16 matmuls ran bf16
    attention 10x slower than fp32 here)."""
    num_blocks, block_size, kv_heads, head_dim = plane.shape
    rows = plane.view(num_blocks, -1).index_select(0, blocks.flatten())
    rows = rows.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, kv_heads, head_dim)[..., :length, :, :]
    return rows.float().transpose(-3, -2)


def cpu_attention(query: torch.Tensor, cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                  seq_ids: torch.Tensor, positions: torch.Tensor, scale: float,
                  sliding_window: Optional[int] = None) -> torch.Tensor:
    """`paged_attention_ref`'s contract ([T, H, D], keys already written), on host tensors, with
    each sequence's tokens contiguous in the flattened step (as `build_step_inputs` makes them).
    Computed in fp32, returned in the query's dtype."""
    num_tokens = query.shape[0]
    block_size = cache.shape[3]
    keys, values = cache[layer, 0], cache[layer, 1]  # [blocks, block_size, Hkv, D]
    out = torch.empty_like(query)
    changes = (torch.nonzero(seq_ids[1:] != seq_ids[:-1]).flatten() + 1).tolist()
    starts = [0, *changes, num_tokens]
    singles = [s for s, e in zip(starts, starts[1:]) if e - s == 1]
    for start, end in zip(starts, starts[1:]):  # prompt chunks: one causal call each
        if end - start == 1:
            continue
        length = int(positions[end - 1]) + 1
        blocks = block_tables[seq_ids[start], : -(-length // block_size)]
        k, v = _gathered(keys, blocks, length), _gathered(values, blocks, length)  # [Hkv, L, D]
        mask = _visible(torch.arange(length), positions[start:end], sliding_window)
        q = query[start:end].float().transpose(0, 1)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                        enable_gqa=True).transpose(0, 1).to(out.dtype)
    if singles:  # decoding sequences: one call over their contexts, padded to the longest
        rows = torch.tensor(singles)
        pos = positions[rows]
        length = int(pos.max()) + 1
        blocks = block_tables[seq_ids[rows], : -(-length // block_size)]  # [B, W]
        k, v = _gathered(keys, blocks, length), _gathered(values, blocks, length)  # [B, Hkv, L, D]
        mask = _visible(torch.arange(length), pos, sliding_window)[:, None, None, :]  # [B, 1, 1, L]
        q = query[rows].float()[:, :, None, :]  # [B, H, 1, D]
        out[rows] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)[:, :, 0].to(out.dtype)
    return out


class HostAttention:
    """The KV cache in host memory and the attention that reads it (`moec::external_attention`)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        self.cache = allocate_kv_cache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, "cpu")
        self.calls = 0
        self.busy_s = 0.0  # CPU seconds in the cache write and the attention (summed over micro-batches)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.cache.numel() * self.cache.element_size()

    def run(self, query, key, value, slots, block_tables, seq_ids, positions, layer: int, scale: float,
            sliding_window: Optional[int] = None) -> torch.Tensor:
        device = query.device
        # two copies down: the step's int inputs, then the layer's q, k, v (the GPU finishes them first)
        ints = torch.cat((positions, seq_ids, slots, block_tables.flatten())).cpu()
        num_tokens = positions.shape[0]
        positions_h, seq_ids_h, slots_h, tables_h = ints.split((num_tokens,) * 3 + (block_tables.numel(),))
        tables_h = tables_h.view(block_tables.shape)
        qkv = torch.cat((query.flatten(), key.flatten(), value.flatten())).cpu()
        q, k, v = qkv.split((query.numel(), key.numel(), value.numel()))
        start = time.perf_counter()
        write_kv(self.cache, layer, k.view(key.shape), v.view(value.shape), slots_h)
        out = cpu_attention(q.view(query.shape), self.cache, layer, tables_h, seq_ids_h, positions_h, scale,
                            sliding_window)
        with self._lock:
            self.busy_s += time.perf_counter() - start
            self.calls += 1
        return out.to(device, non_blocking=True)
