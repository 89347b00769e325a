"""Attention over the paged KV cache: one Triton kernel for prefill, decode and mixed batches.

Same contract as `moec.ops.paged_attention.paged_attention_ref` (the oracle): query [T, H, D],
kv_cache [L, 2, NB, BS, Hkv, D] already holding this step's K/V, token t of row seq_ids[t] of
block_tables [B, W] at positions[t] attends causally to its sequence's keys 0..positions[t]
(and, with a sliding window w, only to keys > positions[t] - w). Softmax in fp32; output in
query's dtype.

Work split (flash-attention style, with the paging of vLLM): one program owns up to BLOCK_M
consecutive query tokens of ONE sequence and one KV head, with all H/Hkv query heads of that
head's group in the same tile, so each K/V element is read once per tile, not once per query
head. The tile's rows are (token, head-in-group) pairs, so a decode token (1 query token) still
gives tl.dot an M dimension of BLOCK_M * GROUP_PAD >= 16. The program walks its sequence's keys
BLOCK_N at a time, looking up each key's physical block in block_tables, keeps a running max and
sum (online softmax, in base 2), and stops after the tile's last position (causal). The keys
every row of the tile sees (below its lowest position, rounded down to BLOCK_N) are walked without
the causal mask; only the steps on the diagonal build it (`_attend_keys`'s MASK). The whole cache
is passed with the layer's offset as an integer.

Tile sizes: a step of known size picks DECODE, DYNAMIC or PREFILL_CONFIG (`select_config`); a
compiled step (symbolic T) makes both the DYNAMIC and the PREFILL launch, each with its grid
gated to zero programs outside its token range (`launch_plan`), so a long prompt gets 128-row
tiles and a decode step 64-row ones from the same graph.

Small steps (decode) split the keys too (flash-decoding): a step of T < NUM_SPLITS tokens runs
cdiv(NUM_SPLITS, T) programs per tile (the grid's third axis, a function of the symbolic T), each
over a share of the keys, writing its running max, sum and unnormalised output to a small
workspace; `_combine_splits_kernel` merges them. At batch 1 that is 16x the programs; from T =
NUM_SPLITS on there is one split, the attention kernel writes the output and the merge is not
launched (its grid is gated to 0 by T, `token_gate`). An empty program still costs ~2 ns of a
launch on an H200, so none are made per tile: a fixed 16 splits per tile cost large batches 2x
the time.

Mapping programs to tiles without a host sync (the step runs inside a CUDA graph and is compiled
ahead of time with a symbolic token count): a few torch ops count each sequence's query tokens
and the running totals of tokens and tiles; the grid has the static upper bound
cdiv(T, BLOCK_M) + B programs on the tile axis (each sequence wastes less than one tile), each
program finds its sequence by counting the cumulative tile ends below its index, and programs
past the last real tile return at once.

Relies on chunk order: each sequence's tokens are contiguous in the flattened batch (seq_ids
non-decreasing), which `moec.runtime.kv_cache.build_step_inputs` guarantees. Positions within a
sequence need not be consecutive: every row masks by its own position. Keys come from real cache
slots only (padded table entries point at block 0); masked keys get probability 0, so the cache
must hold finite values everywhere (it is allocated zeroed), as for the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import wrap_triton

from moec.ops.paged_tiles import (DYNAMIC_ROWS, PREFILL_MIN_TOKENS, PREFILL_ROWS, fit_rows, next_pow2,
                                   sequence_tiles, step_tile_tokens)
from moec.ops.triton.token_gate import token_range_gate

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SEARCH_BLOCK = 128  # cumulative tile ends compared per step of the sequence search
# Split-K for small steps (flash-decoding): a decode step at batch 1 has one tile per KV head, 8
# programs on 132 SMs each walking the whole context. A step of T tokens gives each tile
# cdiv(NUM_SPLITS, T) programs, each over a share of the keys (~NUM_SPLITS x KV heads programs in
# all, one wave), and a second kernel merges their partial softmax results.
NUM_SPLITS = 16  # a power of two >= 2
PART_ROWS = 2 * NUM_SPLITS  # workspace rows (split, token): splits x T < NUM_SPLITS + T <= 2 NUM_SPLITS
# query heads per program of the merge: 2 gives a batch-1 step's merge 16 programs where 8 gave it
# 4 (decode attention at batch 1 and 512 cached tokens 14.4 us against 17.4 on an H200, the same
# from batch 8 on: step_kernels-h200-2026-12-03T1012); 8 splits were faster still at batch 1
# (13.7) but slower at batch 8 (28.1 against 23.6), so NUM_SPLITS stays 16
COMBINE_HEADS = 2
LOG2E = 1.4426950408889634

# A config: rows of the score tile (query tokens x padded GQA group; BLOCK_M = ROWS // GROUP_PAD
# tokens), keys per inner step, and the launch parameters. PREFILL_CONFIG is the fastest of 9 timed
# on an H200 for long prompts (moec.ops.paged_tiles says by how much); the others are untuned.
DECODE_CONFIG = {"ROWS": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
PREFILL_CONFIG = {"ROWS": PREFILL_ROWS, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
# Used when the token count is symbolic (the exported step): one kernel serves decode and
# prefill. 64 rows is one Hopper warpgroup MMA; decode pays MMA work on padding rows, which is
# cheap next to streaming the keys.
DYNAMIC_CONFIG = {"ROWS": DYNAMIC_ROWS, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
_CONFIG_KEYS = ("ROWS", "BLOCK_N", "num_warps", "num_stages")


def fit_to_head_dim(cfg: dict, head_dim: int) -> dict:
    """A copy of `cfg` for this head_dim: above 128, at most 64 rows and 32 keys per step, so the
    fp32 accumulator stays in registers and the K/V tiles in shared memory."""
    cfg = dict(cfg)
    cfg["ROWS"] = fit_rows(cfg["ROWS"], head_dim)
    if head_dim > 128:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
    return cfg


def select_config(num_tokens, num_seqs, head_dim: int) -> dict:
    """DECODE_CONFIG when every sequence has one token, PREFILL_CONFIG from PREFILL_MIN_TOKENS
    tokens on, else (and whenever a size is symbolic: choosing by it would guard on it)
    DYNAMIC_CONFIG."""
    cfg = DYNAMIC_CONFIG
    if isinstance(num_tokens, int) and isinstance(num_seqs, int):
        if num_tokens <= num_seqs:
            cfg = DECODE_CONFIG
        elif num_tokens >= PREFILL_MIN_TOKENS:
            cfg = PREFILL_CONFIG
    return fit_to_head_dim(cfg, head_dim)


def launch_plan(num_tokens, num_seqs, head_dim: int, config: dict | None = None) -> list[tuple[dict, object]]:
    """(config, grid gate) per attention launch: the given config, or `select_config`'s for
    known sizes (gate 1); for a symbolic T the DYNAMIC launch gated to T < PREFILL_MIN_TOKENS and
    the PREFILL launch gated to the rest, so the graph branches on T without a guard."""
    if config is not None:
        return [(dict(config), 1)]
    if isinstance(num_tokens, int) and isinstance(num_seqs, int):
        return [(select_config(num_tokens, num_seqs, head_dim), 1)]
    return [(fit_to_head_dim(DYNAMIC_CONFIG, head_dim), token_range_gate(num_tokens, 0, PREFILL_MIN_TOKENS - 1)),
            (fit_to_head_dim(PREFILL_CONFIG, head_dim), token_range_gate(num_tokens, PREFILL_MIN_TOKENS - 1, None))]


def _check_config(cfg: dict) -> None:
    if set(cfg) != set(_CONFIG_KEYS):
        raise ValueError(f"paged_attention config: want keys {sorted(_CONFIG_KEYS)}, got {sorted(cfg)}")
    for key in ("ROWS", "BLOCK_N"):
        value = cfg[key]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"paged_attention config: {key} must be a power of two >= 16 (tl.dot), got {value!r}")


def check_inputs(query, kv_cache, layer: int, block_tables, seq_ids, positions) -> None:
    """Raise ValueError naming the problem for inputs the kernel does not support."""
    if query.dim() != 3 or kv_cache.dim() != 6:
        raise ValueError(
            f"paged_attention: want query [T, H, D] and kv_cache [L, 2, NB, BS, Hkv, D]; got "
            f"{tuple(query.shape)}, {tuple(kv_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_layers, two, _, _, kv_heads, cache_dim = kv_cache.shape
    if two != 2 or cache_dim != head_dim or num_heads % kv_heads:
        raise ValueError(
            f"paged_attention: query {tuple(query.shape)} does not fit kv_cache {tuple(kv_cache.shape)} "
            "(need the same head_dim and H a multiple of Hkv)"
        )
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"paged_attention: head_dim must be a power of two in [16, 256], got {head_dim}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"paged_attention: layer {layer} out of range for {num_layers} layers")
    if query.dtype not in SUPPORTED_DTYPES or kv_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paged_attention: query/kv_cache must be bf16/fp16/fp32; got {query.dtype}, {kv_cache.dtype}")
    if block_tables.dim() != 2 or seq_ids.dim() != 1 or positions.dim() != 1:
        raise ValueError(
            f"paged_attention: want block_tables [B, W], seq_ids [T], positions [T]; got "
            f"{tuple(block_tables.shape)}, {tuple(seq_ids.shape)}, {tuple(positions.shape)}"
        )
    for name, t in (("block_tables", block_tables), ("seq_ids", seq_ids), ("positions", positions)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"paged_attention: {name} must be int32 or int64, got {t.dtype}")


@triton.jit
def _attend_keys(q, row_pos, m_i, l_i, acc, start_key, end_key, table_row_ptr, layer_cache_ptr, block_size,
                 ctx_len, window, scale_f32, stride_kind, stride_block, stride_slot, offs_d,
                 BLOCK_N: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over keys start_key..end_key-1 (BLOCK_N at a time). MASK: apply the causal
    mask, the window and the table's end; without it every row sees every key of the range."""
    for start in range(start_key, end_key, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        # columns past the table read its first entry (a real block); their scores are masked
        block = tl.load(table_row_ptr + keys // block_size, mask=keys < ctx_len, other=0).to(tl.int64)
        slot = block * stride_block + (keys % block_size).to(tl.int64) * stride_slot
        k = tl.load(layer_cache_ptr + slot[None, :] + offs_d[:, None]).to(q.dtype)  # [D, BLOCK_N]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale_f32  # log2 domain
        if MASK:
            visible = (keys[None, :] <= row_pos[:, None]) & (keys < ctx_len)[None, :]
            if USE_WINDOW:
                visible = visible & (keys[None, :] > row_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite: no -inf - -inf
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(layer_cache_ptr + stride_kind + slot[:, None] + offs_d[None, :]).to(q.dtype)  # [BLOCK_N, D]
        if IEEE:
            acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    cache_ptr,  # the whole kv_cache [L, 2, NB, BS, Hkv, D]; layer_offset picks the layer
    out_ptr,
    table_ptr,
    positions_ptr,
    seq_info_ptr,  # [2 + n, B] int32: first query row, query count, cumulative tile ends per BLOCK_M
    part_ml_ptr,  # [2, PART_ROWS, H] fp32: each (split, token)'s running max and sum
    part_acc_ptr,  # [PART_ROWS, H, D] fp32: each (split, token)'s unnormalised output
    num_tokens,
    num_heads,
    num_seqs,
    table_width,
    block_size,
    group,
    qk_scale,
    window,
    layer_offset,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_kind,
    stride_block,
    stride_slot,
    stride_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    PART_ROWS: tl.constexpr,
    TILE_ROW: tl.constexpr,  # the row of seq_info holding this BLOCK_M's cumulative tile ends
):
    # Highest tile index first: a long prefill's last tiles carry the most keys, start them early.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # > 1 only for a small step: each split takes a share of the keys

    # sequence = number of sequences whose tiles all come before this one
    seq = tl.program_id(0) * 0  # an i32 scalar from the start: the loop keeps its type
    for c in range(0, tl.cdiv(num_seqs, SEARCH_BLOCK)):
        idx = c * SEARCH_BLOCK + tl.arange(0, SEARCH_BLOCK)
        ends = tl.load(seq_info_ptr + TILE_ROW * num_seqs + idx, mask=idx < num_seqs, other=2147483647)
        seq += tl.sum((ends <= tile).to(tl.int32), 0)
    if seq >= num_seqs:
        return  # past the last real tile
    q_first = tl.load(seq_info_ptr + seq)
    q_count = tl.load(seq_info_ptr + num_seqs + seq)
    tile_end = tl.load(seq_info_ptr + TILE_ROW * num_seqs + seq)
    tile_in_seq = tile - (tile_end - tl.cdiv(q_count, BLOCK_M))

    # rows: (token, head in group) pairs, token-major
    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    rows = tl.arange(0, ROWS)
    tok_in_seq = tile_in_seq * BLOCK_M + rows // GROUP_PAD
    head = kv_head * group + rows % GROUP_PAD
    row_ok = (tok_in_seq < q_count) & (rows % GROUP_PAD < group)
    token = (q_first + tok_in_seq).to(tl.int64)
    row_pos = tl.load(positions_ptr + token, mask=row_ok, other=0).to(tl.int32)
    pos_lo = tl.min(tl.where(row_ok, row_pos, 2147483647), 0)
    pos_hi = tl.max(tl.where(row_ok, row_pos, -1), 0)

    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = token * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    table_row_ptr = table_ptr + seq.to(tl.int64) * stride_table
    head_cache_ptr = cache_ptr + kv_head.to(tl.int64) * stride_head
    ctx_len = table_width * block_size  # keys the table can address; the reference sees no more

    # keys lo..hi-1: every key some row of the tile may see (causal, and the window)
    hi = tl.minimum(pos_hi + 1, ctx_len)
    if USE_WINDOW:
        lo = (tl.maximum(pos_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    layer_cache_ptr = head_cache_ptr + layer_offset
    # Inductor may pass a Python float as fp64 (torch 2.11 does); fp64 here would turn the scores,
    # the running max and the accumulator fp64, which tl.dot's fp32 accumulator rejects
    scale_f32 = tl.cast(qk_scale, tl.float32)

    # this split's share of lo..hi-1 in whole BLOCK_N steps (empty past the end); all of it when
    # the step is not split
    steps = tl.cdiv(hi - lo, BLOCK_N)
    steps_per_split = tl.cdiv(steps, num_splits)
    lo = lo + split * steps_per_split * BLOCK_N
    hi = tl.minimum(hi, lo + steps_per_split * BLOCK_N)

    # keys below `full` are visible to every row (each sees up to its own position): no mask there
    if USE_WINDOW:
        full = lo
    else:
        full = tl.minimum(tl.maximum((pos_lo + 1) // BLOCK_N * BLOCK_N, lo), hi)

    m_i = tl.full((ROWS,), -1.0e30, tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _attend_keys(q, row_pos, m_i, l_i, acc, lo, full, table_row_ptr, layer_cache_ptr, block_size,
                                 ctx_len, window, scale_f32, stride_kind, stride_block, stride_slot, offs_d,
                                 BLOCK_N=BLOCK_N, MASK=False, USE_WINDOW=USE_WINDOW, IEEE=IEEE)
    m_i, l_i, acc = _attend_keys(q, row_pos, m_i, l_i, acc, full, hi, table_row_ptr, layer_cache_ptr, block_size,
                                 ctx_len, window, scale_f32, stride_kind, stride_block, stride_slot, offs_d,
                                 BLOCK_N=BLOCK_N, MASK=True, USE_WINDOW=USE_WINDOW, IEEE=IEEE)

    if num_splits > 1:  # partial results; `_combine_splits_kernel` merges them
        part = (split * num_tokens + token) * num_heads + head.to(tl.int64)
        tl.store(part_ml_ptr + part, m_i, mask=row_ok)
        tl.store(part_ml_ptr + PART_ROWS * num_heads + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_ok[:, None] & (l_i > 0.0)[:, None])
    else:
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows only: every real row sees its own position
        out = acc / l_i[:, None]
        o_rows = token * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _combine_splits_kernel(
    part_ml_ptr,
    part_acc_ptr,
    out_ptr,
    num_tokens,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PART_ROWS: tl.constexpr,
):
    """out[t, h] = sum_s acc_s * 2^(m_s - M) / sum_s l_s * 2^(m_s - M), M = max_s m_s, over the
    splits that saw a key (l_s > 0; the others wrote no acc). Returns at once for a step that
    was not split."""
    token = tl.program_id(0)
    num_splits = (NUM_SPLITS + num_tokens - 1) // num_tokens  # as the attention kernel's grid
    if num_splits == 1 or token >= num_tokens:
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    plane = PART_ROWS * num_heads
    # one pass, rescaling what is summed so far whenever a split brings a larger max
    m_max = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    total = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part = (s * num_tokens + token) * num_heads + heads
        used = head_ok & (heads * 0 + s < num_splits)
        l_s = tl.load(part_ml_ptr + plane + part, mask=used, other=0.0)
        m_s = tl.load(part_ml_ptr + part, mask=used, other=-1.0e30)
        seen = used & (l_s > 0.0)
        m_new = tl.maximum(m_max, tl.where(seen, m_s, -1.0e30))
        rescale = tl.exp2(m_max - m_new)
        weight = tl.where(seen, tl.exp2(m_s - m_new), 0.0)
        total = total * rescale + weight * l_s
        a = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=seen[:, None], other=0.0)
        acc = acc * rescale[:, None] + weight[:, None] * a
        m_max = m_new
    total = tl.where(total > 0.0, total, 1.0)
    o_rows = token.to(tl.int64) * stride_ot + heads.to(tl.int64) * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], (acc / total[:, None]).to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None])


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    config: dict | None = None,
    seq_info: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [T, H, D] → [T, H, D] in query's dtype, from the (already written) paged cache.

    `config`: {"ROWS", "BLOCK_N", "num_warps", "num_stages"}; None picks by `launch_plan`.
    `seq_info`: the step's `sequence_tiles` for `step_tile_tokens`' BLOCK_Ms, computed once per
    step by the caller; a launch whose BLOCK_M it lacks computes its own.
    """
    check_inputs(query, kv_cache, layer, block_tables, seq_ids, positions)
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = kv_cache.shape[4]
    num_seqs, table_width = block_tables.shape
    group = num_heads // kv_heads
    group_pad = next_pow2(group)
    plan = launch_plan(num_tokens, num_seqs, head_dim, config)
    for cfg, _ in plan:
        _check_config(cfg)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if statically_known_true(num_tokens == 0):
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    cache = kv_cache[layer]  # for its strides; the kernel gets the whole cache and the layer's offset
    if cache.stride(-1) != 1:
        raise ValueError("paged_attention: kv_cache must have unit stride along head_dim")
    use_window = sliding_window is not None
    if use_window and sliding_window < 1:
        raise ValueError(f"paged_attention: sliding_window must be >= 1, got {sliding_window}")
    # the step's tile rows: which BLOCK_M each row of seq_info was computed for
    step_ms = list(step_tile_tokens(num_heads, kv_heads, head_dim))
    if seq_info is not None and seq_info.dim() == 2 and seq_info.shape[0] != 2 + len(step_ms):
        seq_info = None  # not this step's layout
    # splits per tile: cdiv(NUM_SPLITS, T), an expression of the symbolic T in the compiled graph
    # (1 from T = NUM_SPLITS on); the merge has a program per token of a split step (T < NUM_SPLITS)
    num_splits = (NUM_SPLITS + num_tokens - 1) // num_tokens
    # the partials' workspace has a fixed size: split steps have T < NUM_SPLITS
    part_ml = torch.empty(2, PART_ROWS, num_heads, dtype=torch.float32, device=query.device)
    part_acc = torch.empty(PART_ROWS, num_heads, head_dim, dtype=torch.float32, device=query.device)
    for cfg, gate in plan:
        block_m = max(1, cfg["ROWS"] // group_pad)
        if seq_info is not None and block_m in step_ms:
            tiles, tile_row = seq_info, 2 + step_ms.index(block_m)
        else:
            tiles, tile_row = sequence_tiles(seq_ids, num_seqs, block_m), 2
        grid = ((triton.cdiv(num_tokens, block_m) + num_seqs) * gate, kv_heads, num_splits)
        wrap_triton(_paged_attention_kernel)[grid](
            query,
            kv_cache,
            out,
            block_tables,
            positions,
            tiles,
            part_ml,
            part_acc,
            num_tokens,
            num_heads,
            num_seqs,
            table_width,
            cache.shape[2],
            group,
            float(scale) * LOG2E,
            int(sliding_window) if use_window else 0,
            layer * kv_cache.stride(0),
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            block_tables.stride(0),
            cache.stride(0),
            cache.stride(1),
            cache.stride(2),
            cache.stride(3),
            HEAD_DIM=head_dim,
            BLOCK_M=block_m,
            GROUP_PAD=group_pad,
            BLOCK_N=cfg["BLOCK_N"],
            SEARCH_BLOCK=SEARCH_BLOCK,
            USE_WINDOW=use_window,
            IEEE=query.dtype == torch.float32,
            PART_ROWS=PART_ROWS,
            TILE_ROW=tile_row,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    # the merge only for a split step (T < NUM_SPLITS): gated to no launch (no graph node) otherwise
    merge_gate = token_range_gate(num_tokens, 0, NUM_SPLITS - 1)
    wrap_triton(_combine_splits_kernel)[((NUM_SPLITS - 1) * merge_gate, triton.cdiv(num_heads, COMBINE_HEADS))](
        part_ml,
        part_acc,
        out,
        num_tokens,
        num_heads,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_H=COMBINE_HEADS,
        NUM_SPLITS=NUM_SPLITS,
        PART_ROWS=PART_ROWS,
        num_warps=4,
    )
    return out
