"""Prototype MoE experts on Hopper's TMA, with Triton's warp specialisation: are its grouped
GEMMs the missing piece at the ridge (issue 3)?

moec's gate/up GEMM (`moec/ops/triton/grouped_gemm.py`) gathers its A rows through the token
index and its interleaved gate/up weight columns through pointers, and one set of warps both
loads and multiplies (software pipelining). CUTLASS's grouped GEMM, which it trails where the
layer is compute-bound, loads through TMA in a producer warp while consumer warpgroups run the
MMAs. Triton 3.6 runs Meta's automatic warp specialisation on sm_90 for loops marked
`warp_specialize=True` whose loads are tensor descriptors (TMA), so these kernels take their
operands in the layout TMA wants. From moec's own align (`moe_align_block_size`: sorted_ids,
each row's assignment or the sentinel T*K in padding; expert_ids, each BLOCK_M block's expert;
num_post, the live rows), `gather_routed_rows` copies the routed rows into expert-major blocks,
padding rows zero: [blocks * BLOCK_M, H], contiguous. The weights are w13 as they are
([E, 2I, H], seen as [E * 2I, H]): a tile loads its gate rows and its up rows as two descriptor
tiles and runs two dots into two accumulators, so the activation is elementwise. (One dot over
gate and up rows interleaved, as moec's kernel does, ends in a split of the accumulator, which
Triton 3.6's Hopper warp specialisation pass fails on; so does a 64-row tile. It applies at
num_warps=4 and then runs 12 warps: a producer warpgroup issuing the TMA loads and two consumer
warpgroups of 64 rows each, as CUTLASS's cooperative kernel; at num_warps=8 it silently does
nothing. Checked by compiling for sm_90 on a CPU machine: 168 registers, no spills.)

The gate/up's output is act(gate) * up for every live row ([blocks * BLOCK_M, I]), which is the
down's A as it is. The down multiplies each row by its assignment's routing weight and stores it
in the assignment's row of [T*K, H] (padding rows store nothing), and `tma_moe_experts` sums each
token's K rows. (An atomic add into token order in the epilogue, as moec's down does, makes the
pass fail.) On the H100 (2026-12-07) every warp-specialised down with that scatter-store epilogue
ran wrong or faulted while the gate/ups, which store their tile's rows, ran right; so a ROW_STORE
down stores a · w in its tile's rows as the gate/up does, and moec's combine (`combine_rows`)
weights each token's K rows and sums them, found through the positions the gather wrote. Row-order
outputs leave through a TMA store: compiled for sm_90 on the CPU machine, Triton 3.6 (the GPU
machine's) splits a pointer store's rows between the two consumers with the second's rows at the
tile's row + 64 plus a range from 64, i.e. 64 too far (its rows past the tile, the scatter down's
assignments read from the next block: wrong rows, and past the last block illegal addresses);
Triton 3.9 gets it right, and a TMA store's coordinate is offset once in both
(`tests/test_bench.py`). Tiles past num_post do nothing, so every launch is sized from shapes alone and the
whole layer can be captured in a CUDA graph. `step_kernels.py --parts tma` times the GEMMs against
moec's, CUTLASS's and cuBLAS bmm, and the layer against moec's fused_moe, each checked against
fp32. Requires H and I to be multiples of 8 (16-byte TMA strides in bf16) and of BLOCK_N.
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from moec.ops.triton.align import moe_align_block_size
from moec.ops.triton.moe_permute import combine_rows

GATHER_COLS = 1024  # columns a gather program copies


@triton.jit
def _tile_coords(tile, num_blocks, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each column block's weights in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_m, (tile % in_group) // group_m


@triton.jit
def _tile(a_desc, w_desc, o_desc, out_ptr, expert_ids_ptr, sorted_ptr, weights_ptr, num_assign, pid_m, pid_n, N, K,
          stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
          ROW_STORE: tl.constexpr, WS_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile. GATED: SiLU(a · gate) * (a · up), the gate rows of the
    block's expert at expert * 2N, its up rows N further, stored in the tile's rows; else a · w,
    ROW_STORE: stored in the tile's rows as it is (the combine weights and gathers them), else
    times each row's routing weight, stored in its assignment's row (padding: nowhere)."""
    w_row = tl.load(expert_ids_ptr + pid_m) * (2 * N if GATED else N) + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS_K):
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            acc = tl.dot(a, w_desc.load([w_row, kb * BLOCK_K]).T, acc)
            acc_up = tl.dot(a, w_desc.load([w_row + N, kb * BLOCK_K]).T, acc_up)
        out = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
        o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(out_ptr.dtype.element_ty))
    else:
        for kb in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS_K):
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K]), w_desc.load([w_row, kb * BLOCK_K]).T, acc)
        if ROW_STORE:
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_ptr.dtype.element_ty))
        else:
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            assignment = tl.load(sorted_ptr + rows)
            live = assignment < num_assign
            out = acc * tl.load(weights_ptr + assignment, mask=live, other=0.0)[:, None]
            tl.store(out_ptr + assignment[:, None].to(tl.int64) * stride_om + cols[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=live[:, None])


@triton.jit
def _tma_grouped_kernel(a_ptr, w_ptr, out_ptr, expert_ids_ptr, sorted_ptr, num_post_ptr, weights_ptr, max_blocks,
                        num_assign, num_experts, N, K, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GATED: tl.constexpr,
                        ROW_STORE: tl.constexpr, PERSISTENT: tl.constexpr, WS: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[max_blocks * BLOCK_M, K], strides=[K, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * (2 * N if GATED else N), K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    # row-order outputs (the gate/up's, a ROW_STORE down's) go out through TMA too
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[max_blocks * BLOCK_M, N], strides=[stride_om, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    num_blocks = tl.load(num_post_ptr) // BLOCK_M  # the live ones: past them, padding the align never wrote
    num_pid_n = N // BLOCK_N
    if PERSISTENT:  # warp specialisation of the tile loop: producer and consumers across tiles
        for tile in tl.range(tl.program_id(0), num_blocks * num_pid_n, tl.num_programs(0), warp_specialize=WS):
            pid_m, pid_n = _tile_coords(tile, num_blocks, num_pid_n, GROUP_M)
            _tile(a_desc, w_desc, o_desc, out_ptr, expert_ids_ptr, sorted_ptr, weights_ptr, num_assign, pid_m, pid_n, N,
                  K, stride_om, BLOCK_M, BLOCK_N, BLOCK_K, GATED, ROW_STORE, False)
    else:  # one tile a program over the most blocks there can be, the K loop specialised
        pid_m, pid_n = _tile_coords(tl.program_id(0), max_blocks, num_pid_n, GROUP_M)
        if pid_m < num_blocks:
            _tile(a_desc, w_desc, o_desc, out_ptr, expert_ids_ptr, sorted_ptr, weights_ptr, num_assign, pid_m, pid_n, N,
                  K, stride_om, BLOCK_M, BLOCK_N, BLOCK_K, GATED, ROW_STORE, WS)


@triton.jit
def _gather_kernel(x_ptr, sorted_ptr, num_post_ptr, out_ptr, position_ptr, H, num_assign, top_k, stride_x,
                   stride_out, BLOCK: tl.constexpr, POSITION: tl.constexpr):
    """out[r] = x[sorted[r] // top_k], zero for padding, for the live rows r < num_post; POSITION:
    also position[sorted[r]] = r for the live assignments (where the combine finds each one)."""
    row = tl.program_id(0)
    if row < tl.load(num_post_ptr):
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        assignment = tl.load(sorted_ptr + row)
        live = assignment < num_assign
        src = tl.where(live, assignment // top_k, 0).to(tl.int64)
        vals = tl.load(x_ptr + src * stride_x + cols, mask=cols < tl.where(live, H, 0), other=0.0)  # padding: 0
        tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, vals, mask=cols < H)
        if POSITION:
            tl.store(position_ptr + assignment, row, mask=live & (tl.program_id(1) == 0))


def route(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple:
    """moec's align at `block_m`: (sorted_ids, expert_ids, num_post)."""
    return moe_align_block_size(topk_ids, num_experts, block_m)


def gather_routed_rows(x: torch.Tensor, routing: tuple, top_k: int, block_m: int,
                       position: torch.Tensor | None = None) -> torch.Tensor:
    """The routed rows of `x` [T, H] in expert-major blocks (`route`'s): [blocks * block_m, H],
    padding rows zero, rows past num_post unwritten (no kernel reads them). `position` (int32
    [T*K]), if given, gets each assignment's row, in the same pass."""
    sorted_ids, expert_ids, num_post = routing
    out = torch.empty(expert_ids.shape[0] * block_m, x.shape[1], device=x.device, dtype=x.dtype)
    wrap_triton(_gather_kernel)[(sorted_ids.shape[0], triton.cdiv(x.shape[1], GATHER_COLS))](
        x, sorted_ids, num_post, out, sorted_ids if position is None else position, x.shape[1],
        x.shape[0] * top_k, top_k, x.stride(0), out.stride(0), BLOCK=GATHER_COLS, POSITION=position is not None,
        num_warps=4)
    return out


def _launch(a: torch.Tensor, w: torch.Tensor, routing: tuple, weights: torch.Tensor | None, out: torch.Tensor,
            n: int, num_assign: int, cfg: dict, num_programs: int | None) -> torch.Tensor:
    sorted_ids, expert_ids, num_post = routing
    rows, k = a.shape
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if rows != expert_ids.shape[0] * bm or n % bn or k % 8:
        raise ValueError(f"tma grouped GEMM: rows {rows} (blocks {expert_ids.shape[0]} x BLOCK_M {bm}), "
                         f"N {n} (BLOCK_N {bn}), K {k} (8)")
    max_tiles = rows // bm * (n // bn)
    if cfg.get("PERSISTENT"):
        programs = num_programs or (torch.cuda.get_device_properties(a.device).multi_processor_count
                                    if a.is_cuda else 4)
        grid = (max(1, min(programs, max_tiles)),)
    else:
        grid = (max_tiles,)
    # device-side descriptors are written to global scratch, which Triton asks the allocator for
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=a.device))
    gated = weights is None
    wrap_triton(_tma_grouped_kernel)[grid](a, w, out, expert_ids, sorted_ids, num_post, num_post if gated else weights,
                              rows // bm, num_assign, w.shape[0], n, k, out.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], GATED=gated,
                              ROW_STORE=bool(cfg.get("ROW_STORE")), PERSISTENT=bool(cfg.get("PERSISTENT")), WS=bool(cfg.get("WS")),
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def tma_gate_up(a: torch.Tensor, w13: torch.Tensor, routing: tuple, num_assign: int, cfg: dict,
                num_programs: int | None = None) -> torch.Tensor:
    """SiLU(a · gate) * (a · up) per block's expert (w13 [E, 2I, H]; `a` from gather_routed_rows):
    [rows of a, I], the live rows written. `cfg`: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages, PERSISTENT, WS; `num_programs` for a persistent launch (default: the SMs)."""
    out = torch.empty(a.shape[0], w13.shape[1] // 2, device=a.device, dtype=a.dtype)
    return _launch(a, w13, routing, None, out, w13.shape[1] // 2, num_assign, cfg, num_programs)


def tma_down(h: torch.Tensor, w2: torch.Tensor, routing: tuple, topk_weights: torch.Tensor, cfg: dict,
             num_programs: int | None = None) -> torch.Tensor:
    """(h · w2[e]^T) * the routing weight, per assignment (w2 [E, H, I]; `h` from tma_gate_up):
    [T*K, H] in assignment order, each row weighted; with cfg's ROW_STORE, h · w2[e]^T as it is
    in h's rows ([rows of h, H], the live rows written: no epilogue but a plain store, as the
    gate/up's, which Triton 3.6's warp-specialised downs got wrong with the scatter)."""
    weights = topk_weights.flatten().float().contiguous()
    rows = h.shape[0] if cfg.get("ROW_STORE") else weights.shape[0]
    out = torch.empty(rows, w2.shape[1], device=h.device, dtype=h.dtype)
    return _launch(h, w2, routing, weights, out, w2.shape[1], weights.shape[0], cfg, num_programs)


def tma_moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, gate_up_cfg: dict, down_cfg: dict) -> torch.Tensor:
    """The routed experts of an MoE layer on these kernels: align, gather, gate/up, down, and
    each token's K weighted rows summed (in fp32): [T, H]; a ROW_STORE down's rows weighted and
    gathered by moec's combine (`moe_permute.combine_rows`, through the positions the gather
    wrote). One BLOCK_M for both GEMMs (the gate/up's rows are the down's)."""
    bm = gate_up_cfg["BLOCK_M"]
    if down_cfg["BLOCK_M"] != bm:
        raise ValueError(f"tma_moe_experts: one BLOCK_M for both GEMMs, got {bm} and {down_cfg['BLOCK_M']}")
    num_tokens, top_k = topk_ids.shape
    routing = route(topk_ids, w13.shape[0], bm)
    position = torch.empty(num_tokens * top_k, dtype=torch.int32, device=x.device) if down_cfg.get("ROW_STORE") else None
    a = gather_routed_rows(x, routing, top_k, bm, position)
    h = tma_gate_up(a, w13, routing, num_tokens * top_k, gate_up_cfg)
    rows = tma_down(h, w2, routing, topk_weights, down_cfg)
    if position is not None:
        return combine_rows(rows, position, topk_weights.float())
    return rows.view(num_tokens, top_k, -1).float().sum(1).to(x.dtype)


@triton_op("moec_bench::tma_moe_experts", mutates_args=())
def tma_moe_experts_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, configs: str) -> torch.Tensor:
    """`tma_moe_experts` as one op (`configs`: the JSON [gate_up_cfg, down_cfg]), the way moec's
    `fused_moe` is one: export keeps it a node, AOTInductor traces its launches (`wrap_triton`)
    and compiles the kernels into the `.pt2`, their descriptors' global scratch its own to give."""
    gate_up_cfg, down_cfg = json.loads(configs)
    return tma_moe_experts(x, w13, w2, topk_weights, topk_ids, gate_up_cfg, down_cfg)


class TmaExperts(torch.nn.Module):
    """The routed experts on the prototype's kernels, the weights held: what `step_kernels.py
    --parts tma_aoti` exports with the token count dynamic and compiles with AOTInductor."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, gate_up_cfg: dict, down_cfg: dict):
        super().__init__()
        self.register_buffer("w13", w13)
        self.register_buffer("w2", w2)
        self.configs = json.dumps([gate_up_cfg, down_cfg])

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.moec_bench.tma_moe_experts(x, self.w13, self.w2, topk_weights, topk_ids, self.configs)


def export_experts(module: TmaExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   max_tokens: int = 16384) -> torch.export.ExportedProgram:
    """`module` exported with the token count symbolic (1 to max_tokens)."""
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    return torch.export.export(module, (x, topk_weights, topk_ids),
                               dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}), strict=False)


def assignment_rows(routing: tuple, num_assign: int) -> torch.Tensor:
    """Each assignment's row in the blocks (for checks: the gate/up's output is by row)."""
    sorted_ids, _, num_post = routing
    live = sorted_ids[: int(num_post)].long()
    rows = torch.arange(live.shape[0], device=live.device)
    where = torch.empty(num_assign, dtype=torch.long, device=live.device)
    where[live[live < num_assign]] = rows[live < num_assign]
    return where
