"""The step's K/V written into the paged cache: one Triton launch for both planes.

`moec::write_kv` on CUDA. The torch version needs K and V stacked first (a copy) for one
`index_copy_`, or two `index_copy_` launches; at decode either costs a launch per layer more
than this, and at a 4096-token prefill `index_copy_` moved its 8 MB a plane at ~1 TB/s on an
H200. Here program (t, h) copies token t's K and V rows of BLOCK_H KV heads to its slot, reading
the (strided) projections where they lie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # elements of one program's K (or V) tile: heads x padded head_dim


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,  # the whole kv_cache [L, 2, NB, BS, Hkv, D]; layer_offset picks the layer
    slots_ptr,
    layer_offset,
    kv_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_plane,
    stride_slot,
    stride_head,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (heads < kv_heads)[:, None] & (offs_d < head_dim)[None, :]
    heads = heads.to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = cache_ptr + layer_offset + slot * stride_slot + heads[:, None] * stride_head + offs_d[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_plane, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """`moec.ops.paged_attention.write_kv`'s contract: key/value [T, Hkv, D] (any strides but a
    unit last one), each token's at its slot of layer `layer`'s K and V planes, in place."""
    num_tokens, kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if kv_cache.stride(-1) != 1 or kv_cache.stride(2) != kv_cache.shape[3] * kv_cache.stride(3):
        raise ValueError("write_kv: kv_cache must be contiguous along head_dim and across blocks (slot * its stride)")
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(kv_heads), max(1, MAX_TILE // block_d))
    grid = (num_tokens, triton.cdiv(kv_heads, block_h))
    _write_kv_kernel[grid](
        key, value, kv_cache, slots, layer * kv_cache.stride(0), kv_heads, head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(1), kv_cache.stride(3), kv_cache.stride(4),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
