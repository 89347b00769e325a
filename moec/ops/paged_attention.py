"""Attention over a paged KV cache, for prefill, decode and mixed batches in one call.

Tokens of every sequence in a step are flattened: token t belongs to row `seq_ids[t]` of
`block_tables` and sits at `positions[t]` of its sequence. The new K/V are written into the
cache first, so a prefill chunk attends to itself and to everything cached before it.

Cache layout: [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim].

`moec::paged_attention` is a `triton_op`: export keeps it as one node and Inductor/AOTInductor
trace its body. On CUDA tensors the body launches the Triton kernel of
`moec.ops.triton.paged_attention` through `wrap_triton` (compiled into the `.pt2` as cubin);
elsewhere it is `paged_attention_ref`, plain torch ops that Inductor compiles for CPU. The
reference gathers each token's whole sequence of K/V ([T, W*block_size, Hkv, D]): fine for a
tiny CPU model and as the test oracle, far too large for a long prefill on a GPU.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch.library import triton_op

if importlib.util.find_spec("triton") is not None:
    from moec.ops.triton.kv_write import write_kv as write_kv_triton
    from moec.ops.triton.paged_attention import paged_attention as paged_attention_triton
else:  # CPU-only install: the reference path needs no Triton
    paged_attention_triton = write_kv_triton = None


def slot_mapping(block_tables: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """Each token's slot in a layer's K (or V) plane of the cache, block * block_size + offset:
    computed once per step and shared by every layer's `write_kv`."""
    block = block_tables[seq_ids, torch.div(positions, block_size, rounding_mode="floor")]
    return block * block_size + positions % block_size


@torch.library.custom_op("moec::write_kv", mutates_args=("kv_cache",))
def write_kv(kv_cache: torch.Tensor, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Store each token's key [T, Hkv, D] and value at its slot (`slot_mapping`), in place, in
    the layer's [2, blocks * block_size, Hkv, D] planes. On CUDA one Triton launch writes both
    planes (`moec.ops.triton.kv_write`); elsewhere one `index_copy_` a plane.

    An opaque op that declares its mutation, not plain torch ops: traced, `index_copy_` on the
    cache (a graph input) is functionalised into "copy the whole cache, scatter, copy it back",
    and neither Inductor nor AOTInductor turns that back into an in-place write — every layer of
    every step then moved the entire KV cache (26 ms a decode step for a 38 GB cache on an H200).
    A custom op with `mutates_args` is re-inplaced on the graph input. (A `triton_op` would not
    do: Inductor traces its body and the copy returns.) Compiled graphs call it through the
    dispatcher; decode replays it inside the step's CUDA graph.
    """
    if kv_cache.is_cuda and write_kv_triton is not None:
        write_kv_triton(kv_cache, layer, key, value, slots)
        return
    _, _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    planes = kv_cache[layer].view(2, num_blocks * block_size, kv_heads, head_dim)
    planes[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    planes[1].index_copy_(0, slots, value.to(kv_cache.dtype))


def paged_attention_ref(
    query, kv_cache, layer: int, block_tables, seq_ids, positions, scale: float, sliding_window: int | None = None
):
    """query [T, H, D] → [T, H, D]; keys/values come from the cache (already written)."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, _, block_size, kv_heads, _ = kv_cache.shape
    table = block_tables[seq_ids]  # [T, W]
    keys = kv_cache[layer, 0][table].flatten(1, 2)  # [T, W*block_size, Hkv, D]
    values = kv_cache[layer, 1][table].flatten(1, 2)
    key_pos = torch.arange(keys.shape[1], device=query.device)
    visible = key_pos[None, :] <= positions[:, None]
    if sliding_window is not None:
        visible = visible & (key_pos[None, :] > positions[:, None] - sliding_window)
    q = query.view(num_tokens, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("thgd,tshd->thgs", q, keys.to(q.dtype)).float() * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.einsum("thgs,tshd->thgd", probs, values.to(query.dtype))
    return out.reshape(num_tokens, num_heads, head_dim)


@triton_op("moec::paged_attention", mutates_args=())
def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    seq_info: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`paged_attention_ref`'s contract. The CUDA kernel also needs each sequence's tokens
    contiguous in the flattened batch (chunk order, as `build_step_inputs` makes them).
    `seq_info`: the step's `moec.ops.paged_tiles.sequence_tiles` (for the kernel; the reference
    does not need it), so that every layer shares one computation of it."""
    if query.is_cuda and paged_attention_triton is not None:
        return paged_attention_triton(query, kv_cache, layer, block_tables, seq_ids, positions, scale, sliding_window,
                                      seq_info=seq_info)
    return paged_attention_ref(query, kv_cache, layer, block_tables, seq_ids, positions, scale, sliding_window)
