"""Expert parallelism: the routed experts of one MoE layer split across ranks, tokens moved by all-to-all.

Each rank holds a contiguous block of E / world experts (`expert_placement`) and its own tokens.
`ep_moe` sends every (token, choice) assignment to the rank owning its expert (dispatch), runs
the local experts on what arrived, sends the results back (combine), and sums them per token
with the routing weights at the token's home rank: what `fused_moe` computes with all experts
on one device.

Both exchanges are `torch.distributed.all_to_all_single` (NCCL on GPUs; gloo on CPU has it,
while the list form `all_to_all` it may not). With exact split sizes each rank must learn how
many rows it receives, a small all-to-all of counts read on the host: one sync per layer.
`capacity` avoids it: every rank sends exactly `capacity` rows to every other (padding rows
carry expert -1 and are skipped), so the sizes are known up front, at the cost of the padding's
bytes — the shape for decode steps and CUDA graphs.

Overlap: `chunks` > 1 splits the tokens; chunk i+1's dispatch and chunk i-1's combine are in
flight (async collectives, on NCCL's own stream on a GPU) while chunk i's experts compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import moec.ops  # noqa: F401  registers moec::fused_moe
from moec.ops.moe_combine import moe_combine_ref


def expert_placement(num_experts: int, world_size: int) -> list[list[int]]:
    """Rank r owns experts [r*E/W, (r+1)*E/W): contiguous, so an id's owner is id // (E/W)."""
    if world_size < 1 or num_experts % world_size:
        raise ValueError(f"expert parallelism needs the {num_experts} experts to split evenly over "
                         f"{world_size} ranks; choose ep among the divisors of {num_experts}")
    per = num_experts // world_size
    return [list(range(r * per, (r + 1) * per)) for r in range(world_size)]


def _local_experts(rows: torch.Tensor, local_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   activation: str) -> torch.Tensor:
    """Each row through its (local) expert, as `fused_moe` with top-1 and weight 1 (the Triton
    kernels on a GPU); padding rows (id -1) go to expert 0 with weight 0 and come back as zeros."""
    if rows.shape[0] == 0:
        return rows.clone()
    pad = local_ids < 0
    ids = local_ids.masked_fill(pad, 0).unsqueeze(1)
    weights = (~pad).to(torch.float32).unsqueeze(1)
    return torch.ops.moec.fused_moe(rows, w13, w2, weights, ids, activation)


class _Exchange:
    """One chunk's dispatch → compute → combine, as steps the overlap loop interleaves."""

    def __init__(self, hidden, topk_ids, per_rank: int, world: int, group, capacity: int | None):
        self.num_tokens, self.top_k = topk_ids.shape
        self.hidden_size = hidden.shape[1]
        flat = topk_ids.reshape(-1)
        dest = torch.div(flat, per_rank, rounding_mode="floor")
        self.order = torch.argsort(dest, stable=True)  # assignments grouped by destination rank
        counts = torch.bincount(dest, minlength=world)
        rows = hidden.index_select(0, self.order // self.top_k)
        ids = (flat - dest * per_rank).index_select(0, self.order)
        self.group, self.world, self.capacity = group, world, capacity
        if capacity is None:
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts, group=group)  # tiny; its sizes are read on the host
            self.send_splits, self.recv_splits = counts.tolist(), recv.tolist()
        else:
            if int(counts.max()) > capacity:
                raise ValueError(f"ep_moe: {int(counts.max())} assignments for one rank exceed capacity {capacity}")
            rows, ids = self._pad(rows, ids, counts, capacity)
            self.counts = counts
            self.send_splits = self.recv_splits = [capacity] * world
        total = sum(self.recv_splits)
        self.recv_rows = rows.new_empty(total, self.hidden_size)
        self.recv_ids = ids.new_empty(total)
        self.works = [dist.all_to_all_single(self.recv_rows, rows.contiguous(), self.recv_splits, self.send_splits,
                                             group=group, async_op=True),
                      dist.all_to_all_single(self.recv_ids, ids.contiguous(), self.recv_splits, self.send_splits,
                                             group=group, async_op=True)]

    @staticmethod
    def _pad(rows, ids, counts, capacity):
        """`capacity` rows per destination, real rows first; padding has expert id -1."""
        world = counts.numel()
        starts = torch.cumsum(counts, 0) - counts
        dest = torch.repeat_interleave(torch.arange(world, device=rows.device), counts)
        slot = dest * capacity + (torch.arange(rows.shape[0], device=rows.device) - starts[dest])
        padded_rows = rows.new_zeros(world * capacity, rows.shape[1]).index_copy(0, slot, rows)
        padded_ids = ids.new_full((world * capacity,), -1).index_copy(0, slot, ids)
        return padded_rows, padded_ids

    def compute_and_return(self, w13, w2, activation):
        for work in self.works:
            work.wait()
        out = _local_experts(self.recv_rows, self.recv_ids, w13, w2, activation)
        self.back = torch.empty(sum(self.send_splits), self.hidden_size, dtype=out.dtype, device=out.device)
        self.works = [dist.all_to_all_single(self.back, out, self.send_splits, self.recv_splits, group=self.group,
                                             async_op=True)]

    def finish(self, topk_weights):
        self.works[0].wait()
        back = self.back
        if self.capacity is not None:  # drop the padding: real rows lead each destination's block
            keep = torch.cat([torch.arange(int(c), device=back.device) + r * self.capacity
                              for r, c in enumerate(self.counts.tolist())])
            back = back.index_select(0, keep)
        rows = back.new_empty(back.shape).index_copy(0, self.order, back)  # assignment order again
        return moe_combine_ref(rows.view(self.num_tokens, self.top_k, self.hidden_size), topk_weights)


def ep_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
           w2: torch.Tensor, num_experts: int, activation: str = "silu", group=None, chunks: int = 1,
           capacity: int | None = None) -> torch.Tensor:
    """hidden [T, H] (this rank's tokens), topk_* [T, K] over all `num_experts`; w13/w2: this
    rank's block of experts (see `expert_placement`) → [T, H], as `fused_moe` with every expert.
    `capacity`: rows sent to each rank per chunk (padded; None = exact sizes, one host sync)."""
    world = dist.get_world_size(group)
    per_rank = num_experts // world
    if w13.shape[0] != per_rank:
        raise ValueError(f"ep_moe: this rank holds {w13.shape[0]} experts; {num_experts} over {world} ranks is {per_rank}")
    num_tokens = hidden.shape[0]
    bounds = [num_tokens * i // max(chunks, 1) for i in range(max(chunks, 1) + 1)]
    parts = list(zip(bounds[:-1], bounds[1:]))
    # dispatch runs one chunk ahead of compute; each combine completes one chunk behind
    pending = _Exchange(hidden[parts[0][0]:parts[0][1]], topk_ids[parts[0][0]:parts[0][1]], per_rank, world,
                        group, capacity)
    outputs, in_flight = [], None
    for i, (lo, hi) in enumerate(parts):
        current = pending
        if i + 1 < len(parts):
            nlo, nhi = parts[i + 1]
            pending = _Exchange(hidden[nlo:nhi], topk_ids[nlo:nhi], per_rank, world, group, capacity)
        current.compute_and_return(w13, w2, activation)
        if in_flight is not None:
            outputs.append(in_flight[0].finish(topk_weights[in_flight[1]:in_flight[2]]))
        in_flight = (current, lo, hi)
    outputs.append(in_flight[0].finish(topk_weights[in_flight[1]:in_flight[2]]))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
