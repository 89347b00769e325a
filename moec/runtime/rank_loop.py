"""Serving an expert-parallel artifact: rank 0 takes the requests, every rank decodes its share.

Rank 0 runs the HTTP server and `EngineLoop`; the other ranks run `FollowerLoop`. Every
iteration, all ranks together:
  1. receive rank 0's orders (`broadcast_object_list`): new requests, each assigned to the rank
     with the fewest live sequences, and aborts; or the order to stop;
  2. take one `Engine.lockstep_step` (a rank without work steps on its scratch block, so every
     MoE layer's all-to-all finds all ranks);
  3. send what they emitted to rank 0 (`gather_object`), which streams it to the clients.
Every `LOAD_EVERY_S` the orders also ask all ranks to sum their expert load (for `/metrics`).
When nothing is running rank 0 still sends (empty) orders every `HEARTBEAT_S`, so an idle group
never trips the collective timeout, while a dead or hung rank does: then every rank raises
`RankError` and exits non-zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.distributed as dist

from moec.runtime.engine import Engine
from moec.runtime.launch import group_failed
from moec.runtime.sampler import SamplingParams, TokenLogprob
from moec.runtime.sequence import Sequence

HEARTBEAT_S = 0.5
LOAD_EVERY_S = 2.0  # how often rank 0 collects the expert load for /metrics


@dataclass
class Orders:
    adds: list[tuple[str, list[int], dict, int]] = field(default_factory=list)  # (request id, prompt ids, params, rank)
    aborts: list[str] = field(default_factory=list)
    stop: bool = False
    report_load: bool = False  # all ranks sum their expert load now (for /metrics)


@dataclass
class Emitted:
    request_id: str
    text: str
    token: int
    finish_reason: str | None
    logprob: TokenLogprob | None = None  # where the request asked


def exchange_orders(orders: Orders | None, rank: int, world: int) -> Orders:
    """Rank 0's orders on every rank."""
    box = [orders]
    try:
        dist.broadcast_object_list(box, src=0)
    except (RuntimeError, dist.DistError) as e:
        raise group_failed(rank, world, e) from e
    return box[0]


def gather_emitted(mine: list[Emitted], rank: int, world: int) -> list[Emitted]:
    """Every rank's emissions on rank 0 (an empty list elsewhere)."""
    boxes = [None] * world if rank == 0 else None
    try:
        dist.gather_object(mine, boxes, dst=0)
    except (RuntimeError, dist.DistError) as e:
        raise group_failed(rank, world, e) from e
    return [e for box in boxes for e in box] if rank == 0 else []


def params_dict(params: SamplingParams) -> dict:
    return asdict(params)


class RankSequences:
    """This rank's share: applies orders to the engine, reports what its sequences emitted."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.by_id: dict[str, Sequence] = {}

    def apply(self, orders: Orders, local: dict[str, Sequence] | None = None) -> None:
        """`local`: sequences rank 0 already made for its own requests (their streams hold them)."""
        for request_id, prompt_ids, params, rank in orders.adds:
            if rank != self.engine.rank:
                continue
            seq = (local or {}).get(request_id) or self.engine.new_sequence(
                prompt_ids, SamplingParams(**params), request_id=request_id)
            self.by_id[request_id] = seq
            self.engine.scheduler.add(seq)
        for request_id in orders.aborts:
            seq = self.by_id.pop(request_id, None)
            if seq is not None:
                self.engine.abort(seq)

    def step(self) -> tuple[bool, list[Emitted]]:
        busy, emitted = self.engine.lockstep_step()
        out = []
        for seq, text in emitted:
            logprob = seq.output_logprobs[-1] if seq.output_logprobs else None
            out.append(Emitted(seq.request_id, text, seq.output_ids[-1], seq.finish_reason, logprob))
            if seq.finished:
                self.by_id.pop(seq.request_id, None)
        return busy, out


class FollowerLoop:
    """Ranks 1..N-1: follow rank 0's orders until it says stop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.share = RankSequences(engine)

    def run(self) -> int:
        rank, world = self.engine.rank, self.engine.world
        while True:
            orders = exchange_orders(None, rank, world)
            if orders.stop:
                return 0
            if orders.report_load:
                self.engine.expert_load()
            self.share.apply(orders)
            busy, emitted = self.share.step()
            if busy:
                gather_emitted(emitted, rank, world)
