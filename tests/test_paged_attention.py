"""`moec::paged_attention`: the Triton kernel against `paged_attention_ref`, and the op around it.

The kernel tests (`interpreted`) run under `TRITON_INTERPRET=1` in a subprocess started by
`test_kernel_under_interpreter`, through test_triton_kernels.py's runner (see that file and
tests/conftest.py for why): fp32 and fp16 (the interpreter has no bf16), outputs poisoned with
NaN so a token the kernel skips fails. Small shapes and small tiles (the interpreter runs one
program at a time), so that tiles straddle cache blocks, sequences and the causal diagonal.

In this process: the op on CPU is the reference, it exports as one node with symbolic T and B,
the Triton launch code traces with symbolic sizes, and the kernel compiles for H100.
"""

from __future__ import annotations

import pytest
import torch

from moec.ops.paged_tiles import PREFILL_MIN_TOKENS
from test_triton_kernels import (
    H100_SMEM, close, compile_for_sm90, interp_only, outer_only, poisoned_empty, run_interpreted,
)

SMALL = {"ROWS": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}  # several key steps per tile
WIDE_KEYS = {"ROWS": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}  # a key step spans blocks
PREFILL = {"ROWS": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}  # the built-in prefill tiles


def paged_case(chunks, kv_heads: int, group: int, head_dim: int, block_size: int, dtype, seed: int = 0,
               index_dtype=torch.int64):
    """A step over `chunks` = [(start, num_tokens)], one per sequence, in chunk order: each
    sequence owns shuffled physical blocks covering positions 0..start+num_tokens-1 (short rows
    padded with block 0); the whole cache, unused blocks too, holds random values."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-(start + n) // block_size) for start, n in chunks]
    num_blocks = sum(needed) + 3
    physical = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = max(needed)
    tables, positions, seq_ids = [], [], []
    for row, ((start, n), k) in enumerate(zip(chunks, needed)):
        tables.append(physical[:k] + [0] * (width - k))
        physical = physical[k:]
        positions += range(start, start + n)
        seq_ids += [row] * n
    kv_cache = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    query = torch.randn(len(positions), kv_heads * group, head_dim, generator=g).to(dtype)
    return {
        "query": query,
        "kv_cache": kv_cache,
        "layer": 1,
        "block_tables": torch.tensor(tables, dtype=index_dtype),
        "seq_ids": torch.tensor(seq_ids, dtype=index_dtype),
        "positions": torch.tensor(positions, dtype=index_dtype),
        "scale": head_dim**-0.5,
    }


def reference(case: dict, sliding_window=None, dtype=None) -> torch.Tensor:
    from moec.ops.paged_attention import paged_attention_ref

    q, cache = case["query"], case["kv_cache"]
    if dtype is not None:
        q, cache = q.to(dtype), cache.to(dtype)
    return paged_attention_ref(q, cache, case["layer"], case["block_tables"], case["seq_ids"].long(),
                               case["positions"].long(), case["scale"], sliding_window)


def args(case: dict) -> tuple:
    return tuple(case[k] for k in ("query", "kv_cache", "layer", "block_tables", "seq_ids", "positions", "scale"))


# ---------------------------------------------------------------------------------------------
# In the parent process
# ---------------------------------------------------------------------------------------------


@outer_only
def test_kernel_under_interpreter():
    run_interpreted(__file__)


@outer_only
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_op_cpu_matches_reference(sliding_window):
    import moec.ops  # noqa: F401  (registers the ops)

    case = paged_case([(7, 1), (0, 9), (3, 1)], kv_heads=2, group=2, head_dim=16, block_size=4, dtype=torch.float32)
    got = torch.ops.moec.paged_attention(*args(case), sliding_window)
    torch.testing.assert_close(got, reference(case, sliding_window), atol=0, rtol=0)


class _Attend(torch.nn.Module):
    def __init__(self, fn, scale: float, sliding_window=None):
        super().__init__()
        self.fn, self.scale, self.sliding_window = fn, scale, sliding_window

    def forward(self, query, kv_cache, block_tables, seq_ids, positions):
        return self.fn(query, kv_cache, 1, block_tables, seq_ids, positions, self.scale, self.sliding_window)


def _dynamic_shapes():
    tokens = torch.export.Dim("tokens", min=1, max=16384)
    seqs = torch.export.Dim("seqs", min=1, max=512)
    width = torch.export.Dim("width", min=1, max=1024)
    return ({0: tokens}, None, {0: seqs, 1: width}, {0: tokens}, {0: tokens})


@outer_only
def test_op_exports_as_one_node():
    import moec.ops  # noqa: F401

    case = paged_case([(5, 1), (0, 6)], kv_heads=2, group=2, head_dim=16, block_size=4, dtype=torch.float32)
    model = _Attend(torch.ops.moec.paged_attention, case["scale"], 3)
    inputs = tuple(case[k] for k in ("query", "kv_cache", "block_tables", "seq_ids", "positions"))
    ep = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(), strict=False)
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.moec.paged_attention.default], calls
    other = paged_case([(0, 1), (12, 3), (2, 1)], kv_heads=2, group=2, head_dim=16, block_size=4,
                       dtype=torch.float32, seed=1)
    other["kv_cache"] = other["kv_cache"][:, :, : case["kv_cache"].shape[2]]  # the cache is static
    other["block_tables"] = other["block_tables"] % case["kv_cache"].shape[2]
    got = ep.module()(*(other[k] for k in ("query", "kv_cache", "block_tables", "seq_ids", "positions")))
    torch.testing.assert_close(got, reference(other, 3))


@outer_only
@pytest.mark.parametrize("sliding_window", [None, 64])
def test_triton_path_traces_with_symbolic_sizes(sliding_window):
    """The CUDA body (launch code, not the kernel) under export with dynamic T, B and W: no guard
    may specialise them, and the launches are three wrap_triton nodes (short-step attention,
    prefill attention, split merge), each gated by T to no programs outside its range."""
    from moec.ops.triton.paged_attention import paged_attention

    case = paged_case([(20, 1), (0, 6)], kv_heads=2, group=4, head_dim=64, block_size=16, dtype=torch.float32)
    model = _Attend(paged_attention, case["scale"], sliding_window)
    inputs = tuple(case[k] for k in ("query", "kv_cache", "block_tables", "seq_ids", "positions"))
    ep = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(), strict=False)
    ranges = sorted((vr.lower, vr.upper) for vr in ep.range_constraints.values())
    assert ranges == [(1, 512), (1, 1024), (1, 16384)], ranges
    launches = [n for n in ep.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 3

    class GridsOnly(torch.fx.Interpreter):
        """Runs the graph's size arithmetic, records each launch's grid, launches nothing."""

        def call_function(self, target, args, kwargs):
            if "triton_kernel_wrapper" in str(target):
                self.grids.append(tuple(kwargs["grid"][0]))
                return None
            return super().call_function(target, args, kwargs)

    gm = ep.module()
    for chunks, splits in (([(20, 1)], 16), ([(5, 1)] * 3, 6), ([(9, 1)] * 15, 2), ([(9, 1)] * 16, 1), ([(0, 40)], 1),
                           ([(0, 2047)], 1), ([(0, 2048)], 1), ([(3, 1), (0, 2500)], 1)):
        other = paged_case(chunks, kv_heads=2, group=4, head_dim=64, block_size=16, dtype=torch.float32)
        other["kv_cache"] = case["kv_cache"]  # the cache is static; nothing is read here
        other["block_tables"] = other["block_tables"] % case["kv_cache"].shape[2]
        run = GridsOnly(gm)
        run.grids = []
        run.run(*(other[k] for k in ("query", "kv_cache", "block_tables", "seq_ids", "positions")))
        (short, prefill, merge) = run.grids
        num_tokens, num_seqs = sum(n for _, n in chunks), len(chunks)
        long_step = num_tokens >= PREFILL_MIN_TOKENS
        # BLOCK_M: 64 rows / 4 heads = 16 tokens and 128 / 4 = 32; each grid covers every tile
        assert short[0] == (0 if long_step else -(-num_tokens // 16) + num_seqs)
        assert prefill[0] == (-(-num_tokens // 32) + num_seqs if long_step else 0)
        assert short[2] == prefill[2] == splits  # cdiv(16, T) programs per tile
        assert merge[0] == (15 if splits > 1 else 0)  # the merge only for a split step


@outer_only
def test_kernel_compiles_for_h100():
    """bf16, head_dim 64..256, GQA groups 1..8, every built-in config, with and without a window:
    compiles for sm_90 and fits in its shared memory (what the interpreter cannot check). fp32
    (IEEE dots, ~30 s to compile a tile) is left to the GPU machine. The scale arrives as fp32 from
    Triton's own launcher but as fp64 from Inductor/AOTInductor (torch >= 2.11): both must compile
    (fp64 once turned the accumulator fp64 and tl.dot refused it, on the GPU machine only)."""
    from moec.ops.triton import paged_attention as pa

    dynamic = [pa.DYNAMIC_CONFIG]
    for head_dim, group_pad, use_window, configs in (
        (128, 4, False, [pa.DECODE_CONFIG, pa.DYNAMIC_CONFIG, pa.PREFILL_CONFIG]),
        (128, 8, True, dynamic),
        (64, 1, False, dynamic),
        (256, 4, False, dynamic),
    ):
        for i, cfg in enumerate(configs):
            cfg = pa.fit_to_head_dim(cfg, head_dim)
            scale_type = "fp32" if head_dim == 128 and i == 0 else "fp64"
            ptrs = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16", "table_ptr": "*i64",
                    "positions_ptr": "*i64", "seq_info_ptr": "*i32", "part_ml_ptr": "*fp32",
                    "part_acc_ptr": "*fp32"}
            consts = {
                "HEAD_DIM": head_dim, "BLOCK_M": max(1, cfg["ROWS"] // group_pad), "GROUP_PAD": group_pad,
                "BLOCK_N": cfg["BLOCK_N"], "SEARCH_BLOCK": pa.SEARCH_BLOCK, "USE_WINDOW": use_window, "IEEE": False,
                "PART_ROWS": pa.PART_ROWS, "TILE_ROW": 2 + i % 2,
            }
            compiled = compile_for_sm90(pa._paged_attention_kernel, ptrs, consts, cfg["num_warps"],
                                        cfg["num_stages"], scalars={"qk_scale": scale_type})
            assert compiled.metadata.shared <= H100_SMEM, (head_dim, cfg, compiled.metadata.shared)
        merge = compile_for_sm90(
            pa._combine_splits_kernel, {"part_ml_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": "*bf16"},
            {"HEAD_DIM": head_dim, "BLOCK_H": pa.COMBINE_HEADS, "NUM_SPLITS": pa.NUM_SPLITS,
             "PART_ROWS": pa.PART_ROWS}, 4, 1)
        assert merge.metadata.shared <= H100_SMEM


@outer_only
def test_write_kv_kernel_compiles_for_h100():
    """The K/V write for Mixtral's 8 KV heads of 128 and a masked 3 x 48, bf16 into bf16."""
    from moec.ops.triton import kv_write

    ptrs = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*bf16", "slots_ptr": "*i64"}
    for block_h, block_d in ((8, 128), (4, 64)):
        compiled = compile_for_sm90(kv_write._write_kv_kernel, ptrs, {"BLOCK_H": block_h, "BLOCK_D": block_d}, 4, 1)
        assert "st.global" in compiled.asm["ptx"]


@outer_only
def test_sequence_tiles_under_compile_with_one_sequence():
    """The tiles' query counts under torch.compile(dynamic=True), one sequence (a static B of 1)
    and several: as eager for every T. Counted with index_add_ into the one-element buffer they
    were T rounded up to Inductor's block on CUDA (its atomic add lost its mask), and on CPU the
    graph did not compile."""
    from moec.ops.paged_tiles import sequence_tiles

    one = torch.compile(lambda s: sequence_tiles(s, 1, 16, 32), dynamic=True, fullgraph=True)
    for t in (4, 11, 3, 37):
        ids = torch.zeros(t, dtype=torch.int64)
        assert one(ids).tolist() == sequence_tiles(ids, 1, 16, 32).tolist() == [[0], [t], [-(-t // 16)], [-(-t // 32)]]
    many = torch.compile(lambda s, b: sequence_tiles(s, b.shape[0], 16), dynamic=True, fullgraph=True)
    for t, b in ((11, 2), (40, 3), (5, 5)):
        ids = torch.sort(torch.randint(0, b, (t,), generator=torch.Generator().manual_seed(t))).values
        counts = torch.bincount(ids, minlength=b)
        want = [(counts.cumsum(0) - counts).tolist(), counts.tolist(), (-(-counts // 16)).cumsum(0).tolist()]
        assert many(ids, torch.empty(b, 1)).tolist() == sequence_tiles(ids, b, 16).tolist() == want


@outer_only
def test_rejects_unsupported_inputs():
    from moec.ops.triton.paged_attention import paged_attention

    case = paged_case([(0, 2)], kv_heads=1, group=1, head_dim=48, block_size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(*args(case))
    case = paged_case([(0, 2)], kv_heads=3, group=1, head_dim=16, block_size=4, dtype=torch.float32)
    case["query"] = case["query"][:, :2]
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_attention(*args(case))


# ---------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (subprocess)
# ---------------------------------------------------------------------------------------------

DECODE = [(0, 1), (4, 1), (15, 1), (16, 1), (38, 1)]  # contexts 1, 5, 16, 17, 39: one token each


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "name,chunks,kv_heads,group,head_dim,block_size,window,cfg",
    [
        ("decode", DECODE, 2, 1, 32, 8, None, SMALL),
        ("decode_gqa4", DECODE, 2, 4, 32, 8, None, SMALL),
        ("decode_gqa3", DECODE, 1, 3, 16, 8, None, WIDE_KEYS),  # group padded to 4
        ("prefill_from_0", [(0, 37)], 2, 4, 32, 8, None, SMALL),
        ("later_chunk_mid_block", [(13, 20)], 2, 1, 32, 8, None, SMALL),
        ("mixed", [(8, 1), (0, 1), (5, 19), (29, 1)], 2, 4, 32, 8, None, SMALL),
        ("mixed_two_chunks", [(3, 1), (0, 22), (11, 9), (40, 1)], 1, 1, 16, 8, None, WIDE_KEYS),
        ("window", [(8, 1), (0, 1), (5, 19), (29, 1)], 2, 4, 32, 8, 7, SMALL),
        ("window_wide", [(30, 1), (2, 33)], 2, 1, 32, 8, 20, SMALL),
        ("head_dim_64_small_blocks", [(8, 1), (0, 1), (5, 30), (29, 1)], 1, 2, 64, 4, None, SMALL),
        ("built_in_config", [(8, 1), (5, 30), (29, 1)], 1, 2, 64, 4, None, None),
        # from NUM_SPLITS (16) tokens on a step is not split: one program per tile and KV head
        ("unsplit_prefill", [(40, 1), (0, 70), (3, 1)], 1, 2, 16, 8, None, SMALL),
        ("unsplit_window", [(0, 16), (90, 1)], 1, 2, 16, 8, 21, WIDE_KEYS),
        # split steps (16, 6, 2 and 3 splits) whose keys leave splits empty, and long contexts
        ("split_one_token", [(300, 1)], 2, 2, 16, 8, None, SMALL),
        ("split_long_context", [(0, 1), (300, 1), (2, 1)], 2, 2, 16, 8, None, SMALL),
        ("split_long_window", [(300, 1), (120, 4)], 1, 4, 16, 8, 50, SMALL),
        ("split_mixed_15", [(7, 1), (0, 9), (200, 1), (40, 4)], 2, 2, 16, 8, None, SMALL),
        # long-prompt tiles (32 tokens x 4 heads): several unmasked key steps below each diagonal
        ("prefill_tiles", [(0, 150), (70, 45), (200, 1)], 2, 4, 32, 8, None, PREFILL),
        ("prefill_tiles_window", [(0, 150), (70, 45)], 1, 4, 32, 8, 90, PREFILL),
    ],
)
def test_interp_paged_attention(dtype, name, chunks, kv_heads, group, head_dim, block_size, window, cfg):
    from moec.ops.triton.paged_attention import paged_attention

    case = paged_case(chunks, kv_heads, group, head_dim, block_size, dtype)
    with poisoned_empty():
        got = paged_attention(*args(case), window, config=cfg)
    assert got.shape == case["query"].shape and got.dtype == dtype
    close(got, reference(case, window, dtype=torch.float32), dtype)
    if dtype == torch.float32:  # and the reference in the op's own dtype
        torch.testing.assert_close(got, reference(case, window), atol=1e-5, rtol=1e-4)


@interp_only
@pytest.mark.parametrize("tokens,kv_heads,head_dim,dtype", [(1, 8, 128, torch.float16), (37, 3, 48, torch.float32),
                                                            (300, 2, 16, torch.float16)])
def test_interp_write_kv(tokens, kv_heads, head_dim, dtype):
    """The Triton K/V write: each token's key and value (strided, as the step hands them; another
    dtype than the cache's) at its slot of the layer's planes, a non-power-of-two head count and
    head size masked, every other element of the cache untouched (poisoned)."""
    from moec.ops.triton.kv_write import write_kv

    g = torch.Generator().manual_seed(tokens)
    layers, blocks, block_size = 3, -(-tokens // 4) + 2, 4
    cache = torch.full((layers, 2, blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    key = torch.randn(kv_heads, tokens, head_dim, generator=g).transpose(0, 1)  # [T, Hkv, D], strided
    value = torch.randn(tokens, 2 * kv_heads, head_dim, generator=g)[:, ::2]
    write_kv(cache, 1, key, value, slots)
    planes = cache[1].view(2, blocks * block_size, kv_heads, head_dim)
    assert torch.equal(planes[0, slots], key.to(dtype)) and torch.equal(planes[1, slots], value.to(dtype))
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[1].view(2, blocks * block_size, kv_heads, head_dim)[:, slots] = True
    assert cache[~written].isnan().all()


@interp_only
def test_interp_strided_query_int32_indices():
    """The step hands a transposed query ([H, T, D] storage); int32 tables and ids work too."""
    from moec.ops.triton.paged_attention import paged_attention

    case = paged_case([(6, 1), (2, 11)], 2, 2, 32, 8, torch.float32, seed=3, index_dtype=torch.int32)
    case["query"] = case["query"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not case["query"].is_contiguous()
    with poisoned_empty():
        got = paged_attention(*args(case), None, config=SMALL)
    close(got, reference(case), torch.float32)


@interp_only
def test_interp_empty_sequence_rows():
    """A block-table row with no tokens (a padded batch) owns no tile and shifts nothing."""
    from moec.ops.triton.paged_attention import paged_attention

    case = paged_case([(4, 1), (0, 1), (9, 5)], 1, 2, 16, 4, torch.float32, seed=4)
    keep = case["seq_ids"] != 1  # drop sequence 1's only token; its table row stays
    for k in ("query", "seq_ids", "positions"):
        case[k] = case[k][keep]
    with poisoned_empty():
        got = paged_attention(*args(case), None, config=SMALL)
    close(got, reference(case), torch.float32)


@outer_only
def test_step_computes_the_tiles_once_for_every_layer(hf_model_dir):
    """The exported step computes `sequence_tiles` once; every layer's attention reads that node."""
    from moec.compiler.export import export_step
    from moec.compiler.load import load_model
    from moec.compiler.step import PagedStep

    model = load_model(hf_model_dir, torch.float32)
    ep = export_step(PagedStep(model), torch.float32, 16, 64, 4, 128)
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.moec.paged_attention.default]
    assert len(calls) == model.config.num_hidden_layers
    shared = {n.args[8] if len(n.args) > 8 else n.kwargs.get("seq_info") for n in calls}
    assert len(shared) == 1 and None not in shared
    step_level = [n for n in ep.graph.nodes if n.target is torch.ops.aten.cumsum.default
                  and not any(".layers." in path for path, _ in (n.meta.get("nn_module_stack") or {}).values())]
    # first rows and the tile ends of both launches' BLOCK_M, once (the experts' own histograms aside)
    assert len(step_level) == 3


@interp_only
def test_interp_given_tiles_equal_computed():
    """Tiles computed by the caller for the step's two BLOCK_Ms give the same output, from either
    row (the dynamic and the prefill config); a config with another BLOCK_M, or tiles of another
    layout, compute their own (a mismatched table is never used)."""
    from moec.ops.paged_tiles import sequence_tiles, step_tile_tokens, tile_tokens
    from moec.ops.triton.paged_attention import DYNAMIC_CONFIG, PREFILL_CONFIG, paged_attention

    case = paged_case([(8, 1), (0, 1), (5, 19), (29, 1)], 2, 4, 32, 8, torch.float32)
    want = reference(case)
    num_seqs = case["block_tables"].shape[0]
    tiles = sequence_tiles(case["seq_ids"], num_seqs, *step_tile_tokens(8, 2, 32))
    assert tiles.shape == (4, num_seqs)
    old_layout = sequence_tiles(case["seq_ids"], num_seqs, tile_tokens(8, 2))
    for cfg, given in ((DYNAMIC_CONFIG, tiles), (PREFILL_CONFIG, tiles), (SMALL, tiles), (DYNAMIC_CONFIG, old_layout)):
        with poisoned_empty():
            got = paged_attention(*args(case), None, config=cfg, seq_info=given)
        close(got, want, torch.float32)
