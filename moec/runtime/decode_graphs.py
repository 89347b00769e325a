"""Decode steps replayed as CUDA graphs, one per batch-size bucket, captured at load time.

At small batch a decode step is a few hundred short kernels, and launching them costs as much
as running them. Captured once per bucket, a step is one graph launch. The graph's inputs live
in static buffers: a step of B sequences copies its token ids, positions and block tables into
the first B rows (one host-to-device copy), pads to the bucket with rows that write their K/V
into a scratch block no sequence owns, replays, and reads the first B rows of the logits.
Prefill and mixed steps have no fixed shape; they call the compiled step directly.
"""

from __future__ import annotations

import time

import torch

from moec.errors import CudaGraphError


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: few graphs, little padding at large batch."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max(max_batch, 80) + 1, 16))
    return sorted({b for b in sizes if b < max_batch} | {max_batch})


class DecodeGraphs:
    """`run(chunks)` for steps where every chunk is one token that wants logits."""

    def __init__(self, step_fn, kv_cache: torch.Tensor, max_batch: int, max_blocks_per_seq: int,
                 scratch_block: int, capture: bool = True):
        self.step_fn, self.kv_cache, self.scratch_block = step_fn, kv_cache, scratch_block
        device = kv_cache.device
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.seq_ids = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_batch, max_blocks_per_seq), scratch_block, dtype=torch.int64,
                                       device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        if capture:
            try:
                self._capture()
            except (RuntimeError, AssertionError) as e:
                # A failed capture leaves the process's CUDA state unusable (the RNG stays in
                # capture mode; work queued in the broken capture never ran): going on without
                # graphs would fail or go wrong later, so stop here and say how to go on.
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise CudaGraphError(f"CUDA-graph capture of the decode step failed ({first}); load again "
                                     "without graphs (--no-cuda-graphs, or Engine.load(..., cuda_graphs=False))") from e

    def _call(self, b: int) -> torch.Tensor:
        return self.step_fn(self.input_ids[:b], self.positions[:b], self.seq_ids[:b], self.block_tables[:b],
                            self.kv_cache, self.logits_indices[:b])

    def _capture(self) -> None:
        start = time.perf_counter()
        # warm up on a side stream (lazy kernel loading, allocator growth), then capture the
        # largest bucket first so the smaller graphs fit in the memory pool it leaves behind
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                self._call(b)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._call(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def fits(self, chunks) -> bool:
        return (self.bucket_for(len(chunks)) is not None
                and all(len(tokens) == 1 and wants for _, tokens, _, wants in chunks))

    def run(self, chunks) -> torch.Tensor:
        """chunks: `(blocks, [token], position, True)` per sequence → logits [B, vocab]."""
        batch = len(chunks)
        bucket = self.bucket_for(batch)
        width = self.block_tables.shape[1]
        rows = []
        for blocks, tokens, start, _ in chunks:
            if len(blocks) > width:
                raise ValueError(f"a sequence holds {len(blocks)} blocks; the decode graphs allow {width}")
            rows.append([tokens[0], start, *blocks] + [self.scratch_block] * (width - len(blocks)))
        rows += [[0, 0] + [self.scratch_block] * width] * (bucket - batch)
        staged = torch.tensor(rows, dtype=torch.int64).to(self.input_ids.device, non_blocking=True)
        self.input_ids[:bucket].copy_(staged[:, 0])
        self.positions[:bucket].copy_(staged[:, 1])
        self.block_tables[:bucket].copy_(staged[:, 2:])
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits = self.outputs[bucket]
        else:  # not captured (CPU): the same padded call, run directly
            logits = self._call(bucket)
        return logits[:batch]
