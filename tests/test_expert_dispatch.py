"""Expert-parallel dispatch/combine (`moec.ops.expert_dispatch`) on 2 gloo ranks: every rank's
output equals what `fused_moe`'s reference gives its tokens with all experts on one device."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_server import free_port

E, H, I, K = 4, 16, 32, 2

# (name, tokens per rank, how to route, kwargs): routes pick experts for each token
CASES = [
    ("exact", (7, 5), "random", {}),
    ("padded capacity", (7, 5), "random", {"capacity": 14}),
    ("three chunks", (9, 6), "random", {"chunks": 3}),
    ("three chunks, padded", (9, 6), "random", {"chunks": 3, "capacity": 6}),
    ("rank 1's experts get nothing", (6, 4), "rank0-only", {}),
    ("rank 1 has no tokens", (5, 0), "random", {"chunks": 2}),
]


def _routes(kind: str, tokens: int, g: torch.Generator) -> torch.Tensor:
    if kind == "rank0-only":  # experts 0 and 1 only: rank 1 (experts 2, 3) receives no rows at all
        return torch.stack([torch.zeros(tokens, dtype=torch.long), torch.ones(tokens, dtype=torch.long)], 1)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]) if tokens else \
        torch.empty(0, K, dtype=torch.long)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from moec.ops.expert_dispatch import ep_moe, expert_placement
    from moec.ops.moe_combine import moe_combine_ref
    from moec.ops.moe_experts import moe_experts_ref

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.2
    w2 = torch.randn(E, H, I, generator=g) * 0.2
    mine = expert_placement(E, world)[rank]
    errors = {}
    for name, tokens, kind, kwargs in CASES:
        t = tokens[rank]
        gr = torch.Generator().manual_seed(100 + rank)
        hidden = torch.randn(t, H, generator=gr)
        ids = _routes(kind, t, gr)
        weights = torch.softmax(torch.randn(t, K, generator=gr), -1)
        got = ep_moe(hidden, weights, ids, w13[mine], w2[mine], E, "silu", **kwargs)
        want = moe_combine_ref(moe_experts_ref(hidden, w13, w2, ids, "silu"), weights) if t else hidden.new_zeros(0, H)
        errors[name] = (tuple(got.shape) == tuple(want.shape),
                        (got - want).abs().max().item() if t else 0.0)
    torch.save(errors, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_match_one_device(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (shape_ok, err) in errors.items():
            assert shape_ok and err <= 1e-5, (rank, name, err)


def test_placement_splits_evenly_or_says_how():
    from moec.ops.expert_dispatch import expert_placement

    assert expert_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="divisors of 8"):
        expert_placement(8, 3)
