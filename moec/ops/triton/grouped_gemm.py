"""Grouped GEMMs over expert-major blocks (see `align`): gate/up and down.

Both kernels take the sort/align output: block b covers sorted_ids[b*BLOCK_M : (b+1)*BLOCK_M],
all assignments of expert expert_ids[b]; padding entries (== T*K) are masked rows. The grid is
sized for the worst case (EM rows) and programs past the live tiles (num_post rows) return at
once, so nothing is read back to the host. A PERSISTENT config launches as many programs as the
SMs hold at once instead (`resident_programs`), each looping over tiles.

gate/up: inter[a, n] = act(x[a // K] · w13[e, n]) * (x[a // K] · w13[e, I + n]). One program
owns BLOCK_N gate columns *and* the matching BLOCK_N up columns, read as one weight tile with
the two interleaved (one dot, one accumulator whose adjacent columns are a gate/up pair), so
the activation and the product happen in registers: the [T*K, 2I] pre-activation never exists.
As one dot of width 2*BLOCK_N it was 6-13% faster than two dots of BLOCK_N on an H100 at
1024+ tokens (step_kernels-h100-2026-12-06T0757: one m64n256 wgmma a step instead of two
m64n128 that each read the A tile from shared memory). The result is written in assignment
order ([T*K, I]), not sorted order, so the buffer has no padding rows; the down GEMM gathers
its A rows through sorted_ids (rows stay contiguous).

down: out[t, :] += topk_weight[a] * (inter[a] · w2[e]^T) for every assignment a = t*K + k. The
weight scales the fp32 accumulator and the tile is added straight into the token-order output
[T, H] with an atomic add in the output's dtype (bf16/fp16/fp32 atomics are native on sm_90:
for this tile Triton 3.6 emits `atom.global.gpu.relaxed.add.noftz.v8.bf16`, 16 bytes per
instruction, no compare-and-swap loop): the scatter back to token order and the K-way sum are
the store itself. No [T, K, H] buffer is written and read back by a sum pass: for
Qwen3-30B-A3B (K=8) at 16k tokens that pass alone moved ~1.1 GB, ~0.37 ms against a ~1.6 ms
roofline. With K == 1 a row has one contribution and is stored, not added.

Zero-init is part of the op: atomics need out[T, H] to start at zero, and the gate/up kernel
writes those zeros (ZERO_OUT) — the block holding assignment t*K + 0 zeroes row t, its columns
split across that block's column programs — so it costs no launch and no pass of its own. The
down kernel runs after gate/up on the same stream, so every zero lands before the first add.
`down_grouped` documents that `out` must be zero where it accumulates.

Numerics and determinism: each contribution is rounded to the output dtype, then each add
rounds again — K roundings of the sum instead of one (Hugging Face's eager Mixtral block sums
with `index_add_` in the activation dtype: the same). For K <= 2 the result is bitwise
reproducible (0 + a is exact and a + b == b + a); for K >= 3 the order of the adds follows the
order in which blocks finish, so runs may differ in the last bit. The alternatives cost passes:
fp32 atomics need an fp32 buffer, a cast pass and twice the bytes, and are no more
deterministic; per-assignment rows plus an ordered sum are deterministic but move the bytes
above.

Types: x/w bf16, fp16 or fp32 (fp32 dots use IEEE precision, not TF32); accumulation fp32.
Any H, I (K and N tails are masked; one expert's 2*I*H below 2^31: int32 offsets), E up to
`configs.MAX_EXPERTS` (align), any K. Rows may be strided; the last dim of every
operand is taken as contiguous (the launchers copy if it is not). Each launcher takes `gate`
(0 or 1, an int or a symbolic int) that multiplies its grid: a launch gated to 0 does nothing,
which is how `fused_moe` picks a config per token range inside one compiled graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# activation code (a constexpr) per `moec.ops.moe_experts.ACTIVATIONS` name
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        # tanh(z) = 2*sigmoid(2z) - 1 (tl has no tanh in every Triton release we support)
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * z)  # = 0.5 * x * (1 + tanh(z))
    return y


@triton.jit
def _block_coords(pid, em, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each column block's weights in L2."""
    num_pid_m = tl.cdiv(em, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _token_ids_tile(num_assign, top_k, BLOCK_M: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Offsets into the flat topk_ids of tokens 0..BLOCK_M-1 as a [BLOCK_M, TOPK_PAD] tile (each
    entry's assignment number t*K + k), and the mask of those that exist (rows below T, columns
    below K)."""
    tok, k = tl.arange(0, BLOCK_M), tl.arange(0, TOPK_PAD)
    return tok[:, None] * top_k + k[None, :], (tok < num_assign // top_k)[:, None] & (k < top_k)[None, :]


@triton.jit
def _direct_rows(pid_m, expert, ids, offs, num_assign, k_steps):
    """DIRECT over several tokens (no align launch before the GEMM): program m starts from
    assignment m and its expert, read from topk_ids; row r of its block is token r's assignment
    to that expert (a token chooses an expert at most once), padding (num_assign) where token r
    did not choose it. Only the block of the expert's first assignment keeps its rows; the others
    get none and no K steps, so an expert two tokens chose is read once, not once per assignment.
    One token needs none of this (its K experts are distinct: row 0 is the assignment, and its
    first weight loads wait on nothing). `ids` and `offs`: the topk_ids of tokens 0..BLOCK_M-1 (-1
    past T and K) and their assignment numbers, `_token_ids_tile`'s tile, which needs T <= BLOCK_M.
    -> (assign [BLOCK_M] int64, k_steps). (No pointers pass into helpers: Inductor's mutation
    analysis would take them as written.)"""
    row = tl.min(tl.where(ids.to(tl.int32) == expert.to(tl.int32), offs, num_assign), axis=1)
    mine = tl.min(row, axis=0) == pid_m
    return tl.where(mine, row, num_assign).to(tl.int64), tl.where(mine, k_steps, 0)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_ptr,
    ids_ptr,
    num_assign,
    top_k,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    zero_ptr,
    zero_cols,
    stride_zm,
    rows_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    ZERO_OUT: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    ZERO_STEPS: tl.constexpr,
    DIRECT: tl.constexpr,
    PERSISTENT: tl.constexpr,
    OUT_ROWS: tl.constexpr,
    TOPK_PAD: tl.constexpr,
):
    # tiles of live row blocks only (dead ones, past num_post, are skipped): one per program, or
    # (PERSISTENT: a grid of the programs the SMs hold at once) strided over the programs in a
    # loop that Triton flattens, so one tile's epilogue overlaps the next one's first loads. One
    # tile is a loop of one iteration known at compile time, which folds away: straight-line code.
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if DIRECT:  # one row block per assignment: none is dead
        live_rows = num_assign * BLOCK_M
    else:
        live_rows = tl.load(num_post_ptr)
    num_tiles = tl.cdiv(live_rows, BLOCK_M) * num_pid_n
    if PERSISTENT:
        my_tiles = tl.cdiv(num_tiles - tl.program_id(0), tl.num_programs(0))
    else:
        if tl.program_id(0) >= num_tiles:
            return
        my_tiles = 1
    for i in tl.range(0, my_tiles, flatten=PERSISTENT):
        tile = tl.program_id(0) + i * tl.num_programs(0)
        k_steps = tl.cdiv(K, BLOCK_K)
        if DIRECT:
            pid_m, pid_n = tile // num_pid_n, tile % num_pid_n
            expert = tl.load(ids_ptr + pid_m).to(tl.int64)
            assign = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_assign).to(tl.int64)  # one token's
            if num_assign > top_k:  # several: an expert may be shared (`_direct_rows`)
                offs, ok = _token_ids_tile(num_assign, top_k, BLOCK_M, TOPK_PAD)
                ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
                assign, k_steps = _direct_rows(pid_m, expert, ids, offs, num_assign, k_steps)
        else:
            pid_m, pid_n = _block_coords(tile, live_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
            assign = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        row_ok = assign < num_assign
        token = assign // top_k

        if ZERO_OUT:  # the down GEMM's accumulator: row t zeroed by the block holding assignment t*K + 0
            first = row_ok & (assign % top_k == 0)
            step = tl.cdiv(N, BLOCK_N) * BLOCK_Z
            zeros = tl.zeros((BLOCK_M, BLOCK_Z), dtype=zero_ptr.dtype.element_ty)
            # unrolled (ZERO_STEPS from the shapes): a loop here would be a second inner loop,
            # which keeps Triton from flattening the tile loop of a persistent launch
            for zi in tl.static_range(ZERO_STEPS):
                offs_z = pid_n * BLOCK_Z + zi * step + tl.arange(0, BLOCK_Z)
                z_ptrs = zero_ptr + token[:, None] * stride_zm + offs_z[None, :]
                tl.store(z_ptrs, zeros, mask=first[:, None] & (offs_z < zero_cols)[None, :])

        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
        # tile column 2j is gate column j, 2j+1 is up column j
        offs_c = tl.arange(0, 2 * BLOCK_N)
        pair = pid_n * BLOCK_N + offs_c // 2  # the gate/up column pair of each tile column
        w_ptrs = w_ptr + expert * stride_we + (pair + (offs_c % 2) * N)[None, :] * stride_wn + offs_k[:, None]
        w_col_ok = pair < N
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for kb in range(0, k_steps):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & w_col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # pairs of registers

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        h = _activation(acc_g, ACT) * acc_u
        if OUT_ROWS:  # assignment a's row goes to out[rows[a]] (the grouped_mm path's sorted order)
            out_row = tl.load(rows_ptr + assign, mask=row_ok, other=0).to(tl.int64)
        else:
            out_row = assign
        o_ptrs = out_ptr + out_row[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    topk_weights_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_ptr,
    ids_ptr,
    num_assign,
    top_k,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,
    PERSISTENT: tl.constexpr,
    TOPK_PAD: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)  # the tile loop as in _gate_up_kernel
    if DIRECT:
        live_rows = num_assign * BLOCK_M
    else:
        live_rows = tl.load(num_post_ptr)
    num_tiles = tl.cdiv(live_rows, BLOCK_M) * num_pid_n
    if PERSISTENT:
        my_tiles = tl.cdiv(num_tiles - tl.program_id(0), tl.num_programs(0))
    else:
        if tl.program_id(0) >= num_tiles:
            return
        my_tiles = 1
    for i in tl.range(0, my_tiles, flatten=PERSISTENT):
        tile = tl.program_id(0) + i * tl.num_programs(0)
        k_steps = tl.cdiv(K, BLOCK_K)
        if DIRECT:
            pid_m, pid_n = tile // num_pid_n, tile % num_pid_n
            expert = tl.load(ids_ptr + pid_m).to(tl.int64)
            assign = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_assign).to(tl.int64)  # one token's
            if num_assign > top_k:  # several: an expert may be shared (`_direct_rows`)
                offs, ok = _token_ids_tile(num_assign, top_k, BLOCK_M, TOPK_PAD)
                ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
                assign, k_steps = _direct_rows(pid_m, expert, ids, offs, num_assign, k_steps)
        else:
            pid_m, pid_n = _block_coords(tile, live_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
            assign = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        row_ok = assign < num_assign

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + assign[:, None] * stride_am + offs_k[None, :]
        b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, k_steps):
            k_left = K - kb * BLOCK_K
            k_ok = offs_k < k_left
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        if MUL_WEIGHT:
            w = tl.load(topk_weights_ptr + assign, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
        token = assign // top_k
        o_ptrs = out_ptr + token[:, None] * stride_om + offs_n[None, :]
        o_ok = row_ok[:, None] & col_ok[None, :]
        if ACCUMULATE:
            tl.atomic_add(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok, sem="relaxed")
        else:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume unit stride along the reduction/column dim (no stride argument):
    then Triton knows the loads are contiguous and vectorises/pipelines them, whether or not
    the compiler that launches the kernel specialises stride-1 arguments."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def _sm_count(device: torch.device) -> int:
    """SMs a persistent launch spreads over; 4 off CUDA (the interpreter), so tiles still stride."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# what bounds the programs an SM holds at once, per the CUDA occupancy rules: 64K registers
# (a program's own count is only known after Triton compiles it, so at most 255 a thread is
# assumed: 2 programs of 4 warps, 1 of 8) and the shared memory of an SM (sm_90: 228 KiB, 1 KiB
# of it reserved per program)
SM_REGISTERS, MAX_REGS_PER_THREAD, SMEM_RESERVED_PER_PROGRAM = 65536, 255, 1024


def resident_programs(cfg: dict, n_width: int, elem_bytes: int, smem_per_sm: int) -> int:
    """Programs of `cfg`'s tile that fit on one SM at once (at least 1): the pipeline's shared
    memory (num_stages copies of the [BLOCK_M, BLOCK_K] and [BLOCK_K, n_width] operand tiles)
    against the SM's, and registers at the most a thread may take. A persistent launch of small
    tiles (64 rows, 4 warps: 96 KiB) then keeps two programs an SM loading, as one launch per
    tile would; compute-bound tiles (128 x 256, 8 warps) stay at one."""
    by_regs = SM_REGISTERS // (cfg["num_warps"] * 32 * MAX_REGS_PER_THREAD)
    tile_bytes = cfg["num_stages"] * (cfg["BLOCK_M"] + n_width) * cfg["BLOCK_K"] * elem_bytes
    return max(1, min(by_regs, smem_per_sm // (tile_bytes + SMEM_RESERVED_PER_PROGRAM)))


def _grid_m_n(em, n_cols: int, cfg: dict, gate=1, direct: bool = False, persistent: bool = False,
              device=None, n_width: int | None = None, elem_bytes: int = 2) -> tuple:
    """Row blocks x column blocks (`direct`: em is the assignment count, one block each); with
    `persistent`, at most as many programs as the SMs hold at once (`resident_programs` of a tile
    n_width columns wide, BLOCK_N if not given; one a "SM" off CUDA), each looping over tiles."""
    row_blocks = em if direct else triton.cdiv(em, cfg["BLOCK_M"])
    tiles = row_blocks * triton.cdiv(n_cols, cfg["BLOCK_N"])
    if persistent:
        programs = _sm_count(device)
        if device.type == "cuda":
            smem = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor
            programs *= resident_programs(cfg, n_width or cfg["BLOCK_N"], elem_bytes, smem)
        tiles = min(tiles, programs) if isinstance(tiles, int) else torch.sym_min(tiles, programs)
    return (tiles * gate,)


def _align_args(sorted_ids, expert_ids, num_post, direct_ids, num_assign) -> tuple[tuple, object, bool]:
    """(the kernels' four routing pointers, em, direct): the align buffers and their length, or
    (direct) the flat topk_ids alone and one row block per assignment."""
    if direct_ids is None:
        if sorted_ids is None or expert_ids is None or num_post is None:
            raise ValueError("grouped GEMM: give the align buffers (sorted_ids, expert_ids, num_post) or direct_ids")
        return (sorted_ids, expert_ids, num_post, sorted_ids), sorted_ids.shape[0], False
    flat = direct_ids.reshape(-1)
    return (flat, flat, flat, flat), num_assign, True  # only ids_ptr is read under DIRECT


def _check_direct_tokens(num_tokens, block_m: int, who: str) -> None:
    """DIRECT's row blocks hold one row per token (`_direct_rows`): at most BLOCK_M tokens. A
    symbolic count is the caller's to bound (`fused_moe` gates DIRECT to T <= BLOCK_M)."""
    if isinstance(num_tokens, int) and num_tokens > block_m:
        raise ValueError(f"{who}: direct_ids take at most BLOCK_M = {block_m} tokens (a row block's rows are "
                         f"the tokens), got {num_tokens}; pass the align buffers for more")


def _zero_block(hidden_size: int, inter_size: int, block_n: int) -> tuple[int, int]:
    """(BLOCK_Z, ZERO_STEPS): columns of the output each gate/up program zeroes per step — the
    row's H columns spread over the block's cdiv(I, BLOCK_N) column programs, a power of two in
    [16, 256] — and the steps that take to cover H."""
    programs = -(-inter_size // block_n)
    per_program = -(-hidden_size // programs)
    block_z = min(256, max(16, 1 << (per_program - 1).bit_length()))
    return block_z, -(-hidden_size // (programs * block_z))


def gate_up_grouped(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    sorted_ids: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    num_post: torch.Tensor | None,
    top_k: int,
    cfg: dict,
    activation: str = "silu",
    out: torch.Tensor | None = None,
    zero_out: torch.Tensor | None = None,
    gate=1,
    direct_ids: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H] → act(gate)·up per assignment, [T*K, I] in assignment order
    (into `out` if given: contiguous [T*K, I]), or with `out_rows` (int32 [T*K], a permutation)
    assignment a at row out_rows[a]. `zero_out` [T, H] (unit column stride), if given, is zeroed
    on the way: the down GEMM's accumulator. `direct_ids` (topk_ids, contiguous; at most BLOCK_M
    tokens) replaces the align buffers: a row block per assignment, each expert computed by the
    block of its first assignment for every token that chose it (`_direct_rows`)."""
    hidden, w13 = unit_last_stride(hidden), unit_last_stride(w13)
    num_tokens, hidden_size = hidden.shape
    inter = w13.shape[1] // 2
    num_assign = num_tokens * top_k
    if out is None:
        out = torch.empty(num_assign, inter, dtype=hidden.dtype, device=hidden.device)
    if zero_out is not None and zero_out.stride(1) != 1:
        raise ValueError("gate_up_grouped: zero_out must have unit column stride")
    # unused by the kernel when ZERO_OUT is off: a read-only input stands in (a written tensor
    # passed twice would alias two kernel arguments)
    zeroed = hidden if zero_out is None else zero_out
    routing, em, direct = _align_args(sorted_ids, expert_ids, num_post, direct_ids, num_assign)
    if direct:
        _check_direct_tokens(num_tokens, cfg["BLOCK_M"], "gate_up_grouped")
    zero_block, zero_steps = _zero_block(hidden_size, inter, cfg["BLOCK_N"])
    persistent = bool(cfg.get("PERSISTENT")) and not direct  # DIRECT's few tiles: one program each
    grid = _grid_m_n(em, inter, cfg, gate, direct, persistent, hidden.device, 2 * cfg["BLOCK_N"], hidden.element_size())
    wrap_triton(_gate_up_kernel)[grid](
        hidden,
        w13,
        out,
        *routing,
        num_assign,
        top_k,
        inter,
        hidden_size,
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        out.stride(0),
        zeroed,
        0 if zero_out is None else zero_out.shape[1],
        zeroed.stride(0),
        routing[0] if out_rows is None else out_rows,  # unused without OUT_ROWS: a read-only stand-in
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        ACT=ACTIVATION_CODES[activation],
        IEEE=_dot_ieee(hidden.dtype),
        ZERO_OUT=zero_out is not None,
        BLOCK_Z=zero_block,
        ZERO_STEPS=zero_steps if zero_out is not None else 0,
        DIRECT=direct,
        PERSISTENT=persistent,
        OUT_ROWS=out_rows is not None,
        TOPK_PAD=triton.next_power_of_2(top_k),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def down_grouped(
    inter: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_ids: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    num_post: torch.Tensor | None,
    cfg: dict,
    out: torch.Tensor | None = None,
    mul_weight: bool = True,
    gate=1,
    direct_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """inter [T*K, I], w2 [E, H, I], topk_weights [T, K] → out [T, H], out[t] = sum over k of
    token t's k-th expert output, times its routing weight when `mul_weight`.

    With K > 1 the rows are atomically added into `out`, which must hold zeros (gate/up's
    `zero_out` writes them; without `out`, a zeroed one is allocated). With K == 1 they are
    stored: `out` may hold anything. `out`: [T, H] with unit column stride. `direct_ids` as in
    `gate_up_grouped`.
    """
    inter, w2 = unit_last_stride(inter), unit_last_stride(w2)
    num_assign, inter_size = inter.shape
    num_tokens, top_k = topk_weights.shape
    hidden_size = w2.shape[1]
    if out is None:
        alloc = torch.empty if top_k == 1 else torch.zeros
        out = alloc(num_tokens, hidden_size, dtype=inter.dtype, device=inter.device)
    if out.stride(1) != 1:
        raise ValueError("down_grouped: out must have unit column stride")
    weights = topk_weights.reshape(-1)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    routing, em, direct = _align_args(sorted_ids, expert_ids, num_post, direct_ids, num_assign)
    if direct:
        _check_direct_tokens(num_tokens, cfg["BLOCK_M"], "down_grouped")
    persistent = bool(cfg.get("PERSISTENT")) and not direct
    grid = _grid_m_n(em, hidden_size, cfg, gate, direct, persistent, inter.device, elem_bytes=inter.element_size())
    wrap_triton(_down_kernel)[grid](
        inter,
        w2,
        out,
        weights,
        *routing,
        num_assign,
        top_k,
        hidden_size,
        inter_size,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        MUL_WEIGHT=bool(mul_weight),
        ACCUMULATE=top_k > 1,
        IEEE=_dot_ieee(inter.dtype),
        DIRECT=direct,
        PERSISTENT=persistent,
        TOPK_PAD=triton.next_power_of_2(top_k),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
