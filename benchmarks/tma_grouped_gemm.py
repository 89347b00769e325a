"""Prototype grouped GEMMs (gate/up and down) on Hopper's TMA, with Triton's warp
specialisation: are they the missing piece at the ridge (issue 3)?

moec's gate/up GEMM (`moec/ops/triton/grouped_gemm.py`) gathers its A rows through the token
index and its interleaved gate/up weight columns through pointers, and one set of warps both
loads and multiplies (software pipelining). CUTLASS's grouped GEMM, which it trails where the
layer is compute-bound, loads through TMA in a producer warp while consumer warpgroups run the
MMAs. Triton 3.6 runs Meta's automatic warp specialisation on sm_90 for loops marked
`warp_specialize=True` whose loads are tensor descriptors (TMA), so this kernel takes its
operands in the layout TMA wants, made by a pass before it that the timing leaves out:
the routed rows gathered into expert-major blocks of BLOCK_M rows (`gather_blocks`), padding
rows zero: [blocks * BLOCK_M, H], contiguous. The weights are w13 as they are ([E, 2I, H], seen
as [E * 2I, H]): a tile loads its gate rows and its up rows as two descriptor tiles and runs two
dots into two accumulators, so the activation is elementwise. (One dot over gate and up rows
interleaved, as moec's kernel does, ends in a split of the accumulator, which Triton 3.6's
Hopper warp specialisation pass fails on; so does a 64-row tile. It applies at num_warps=4 and
then runs 12 warps: a producer warpgroup issuing the TMA loads and two consumer warpgroups of
64 rows each, as CUTLASS's cooperative kernel; at num_warps=8 it silently does nothing. Checked
by compiling for sm_90 on a CPU machine: 168 registers, no spills.)

The gate/up's output is act(gate) * up for every row of every block ([blocks * BLOCK_M, I];
padding rows come out zero), which is the down's A as it is: the down multiplies each row by its
assignment's routing weight (`slot_weights`: zero for padding) and stores it in its slot
([blocks * BLOCK_M, H]); a combine then sums each token's K rows, as in the grouped_mm path.
(An atomic add into token order in the epilogue, as moec's down does, also makes the pass
fail.) `step_kernels.py --parts tma` times both against moec's kernels, CUTLASS's and cuBLAS bmm
on the same rows and checks them against fp32. Requires H and I to be multiples of 8 (16-byte
TMA strides in bf16) and of BLOCK_N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_coords(tile, num_blocks, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each column block's weights in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_m, (tile % in_group) // group_m


@triton.jit
def _tile(a_desc, w_desc, out_ptr, block_expert_ptr, scale_ptr, pid_m, pid_n, N, K, stride_om,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
          WS_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile. GATED: SiLU(a · gate) * (a · up), the gate rows of the
    block's expert at expert * 2N, its up rows N further; else (a · w) * scale[row]."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_row = tl.load(block_expert_ptr + pid_m) * (2 * N if GATED else N) + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS_K):
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            acc = tl.dot(a, w_desc.load([w_row, kb * BLOCK_K]).T, acc)
            acc_up = tl.dot(a, w_desc.load([w_row + N, kb * BLOCK_K]).T, acc_up)
        out = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
    else:
        for kb in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS_K):
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K]), w_desc.load([w_row, kb * BLOCK_K]).T, acc)
        out = acc * tl.load(scale_ptr + rows)[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty))


@triton.jit
def _tma_grouped_kernel(a_ptr, w_ptr, out_ptr, block_expert_ptr, scale_ptr, num_blocks, num_experts, N, K,
                        stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, GATED: tl.constexpr, PERSISTENT: tl.constexpr, WS: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[num_blocks * BLOCK_M, K], strides=[K, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * (2 * N if GATED else N), K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    num_pid_n = N // BLOCK_N
    num_tiles = num_blocks * num_pid_n
    if PERSISTENT:  # warp specialisation of the tile loop: producer and consumers across tiles
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WS):
            pid_m, pid_n = _tile_coords(tile, num_blocks, num_pid_n, GROUP_M)
            _tile(a_desc, w_desc, out_ptr, block_expert_ptr, scale_ptr, pid_m, pid_n, N, K, stride_om,
                  BLOCK_M, BLOCK_N, BLOCK_K, GATED, False)
    else:  # one tile a program, the K loop specialised
        pid_m, pid_n = _tile_coords(tl.program_id(0), num_blocks, num_pid_n, GROUP_M)
        _tile(a_desc, w_desc, out_ptr, block_expert_ptr, scale_ptr, pid_m, pid_n, N, K, stride_om,
              BLOCK_M, BLOCK_N, BLOCK_K, GATED, WS)


def gather_blocks(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple:
    """The routed rows of `x` [T, H] in expert-major blocks of `block_m` rows (zeros pad each
    expert's last block): (a [blocks * block_m, H], block_expert int32 [blocks], slot [T*K]: the
    row of a holding assignment t*K + k)."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = padded.cumsum(0) - padded
    order = flat.argsort(stable=True)
    rank = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[flat[order]]
    slot = torch.empty_like(flat)
    slot[order] = starts[flat[order]] + rank
    a = x.new_zeros(int(padded.sum()), x.shape[1])
    a[slot] = x[torch.arange(flat.numel(), device=x.device) // top_k]
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), padded // block_m)
    return a, block_expert.to(torch.int32), slot


def slot_weights(topk_weights: torch.Tensor, slot: torch.Tensor, rows: int) -> torch.Tensor:
    """Each block row's routing weight, f32 [rows]: assignment a's in slot[a], zero in padding."""
    out = torch.zeros(rows, device=topk_weights.device, dtype=torch.float32)
    out[slot] = topk_weights.flatten().float()
    return out


def _launch(a: torch.Tensor, w: torch.Tensor, block_expert: torch.Tensor, scale: torch.Tensor | None, n: int,
            gated: bool, cfg: dict, num_programs: int | None) -> torch.Tensor:
    rows, k = a.shape
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if rows % bm or n % bn or k % 8:
        raise ValueError(f"tma grouped GEMM: rows {rows} (BLOCK_M {bm}), N {n} (BLOCK_N {bn}), K {k} (8)")
    out = torch.empty(rows, n, device=a.device, dtype=a.dtype)
    tiles = rows // bm * (n // bn)
    if cfg.get("PERSISTENT"):
        programs = num_programs or (torch.cuda.get_device_properties(a.device).multi_processor_count
                                    if a.is_cuda else 4)
        grid = (max(1, min(programs, tiles)),)
    else:
        grid = (tiles,)
    # device-side descriptors are written to global scratch, which Triton asks the allocator for
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=a.device))
    _tma_grouped_kernel[grid](a, w, out, block_expert, block_expert if scale is None else scale, rows // bm,
                              w.shape[0], n, k, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
                              GROUP_M=cfg["GROUP_M"], GATED=gated, PERSISTENT=bool(cfg.get("PERSISTENT")),
                              WS=bool(cfg.get("WS")), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def tma_gate_up(a: torch.Tensor, w13: torch.Tensor, block_expert: torch.Tensor, cfg: dict,
                num_programs: int | None = None) -> torch.Tensor:
    """SiLU(a · gate) * (a · up) per block's expert (w13 [E, 2I, H]): [rows of a, I]. `cfg`:
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, PERSISTENT, WS; `num_programs`
    for a persistent launch (default: the SMs)."""
    return _launch(a, w13, block_expert, None, w13.shape[1] // 2, True, cfg, num_programs)


def tma_down(h: torch.Tensor, w2: torch.Tensor, block_expert: torch.Tensor, weights: torch.Tensor, cfg: dict,
             num_programs: int | None = None) -> torch.Tensor:
    """(h · w2[e]^T) * weights[row] per block's expert (w2 [E, H, I]; `weights` from
    `slot_weights`): [rows of h, H], each assignment's weighted row in its slot."""
    return _launch(h, w2, block_expert, weights, w2.shape[1], False, cfg, num_programs)
