"""Decode steps replayed as CUDA graphs, one per batch-size bucket, captured at load time.

At small batch a decode step is a few hundred short kernels, and launching them costs as much
as running them. Captured once per bucket, a step is one graph launch. The graph's inputs live
in static buffers: a step of B sequences writes its token ids, positions and block tables into
the first B rows of a (pinned) host table, copies them to the device in one transfer, pads to
the bucket with rows that write their K/V into a scratch block no sequence owns, replays, and
reads the first B rows of the logits. Prefill and mixed steps have no fixed shape; they call
the compiled step directly.

The host table is a numpy view that each step updates row by row, only as far as each
sequence's blocks reach: building it anew from Python lists (B x max_blocks ints through
`torch.tensor`) took 2.4 ms a step at batch 128, while the GPU waited. Entries past a
sequence's last block keep whatever an earlier row held; attention reads keys 0..position only.
"""

from __future__ import annotations

import time

import torch

from moec.errors import CudaGraphError, first_line


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
        # rows of [token, position, block 0, block 1, ...]: filled on the host, sent in one copy
        self.host_rows = torch.full((max_batch, 2 + max_blocks_per_seq), scratch_block, dtype=torch.int64,
                                    pin_memory=device.type == "cuda")
        self._rows = self.host_rows.numpy()
        self._rows[:, :2] = 0
        self._staged = torch.empty_like(self.host_rows, device=device)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
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
                raise CudaGraphError(f"CUDA-graph capture of the decode step failed ({first_line(e)}); load again "
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

    def fits_batch(self, batch: int) -> bool:
        return self.bucket_for(batch) is not None

    def fits(self, chunks) -> bool:
        return self.fits_batch(len(chunks)) and all(len(tokens) == 1 and wants for _, tokens, _, wants in chunks)

    def run(self, chunks, device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """chunks: `(blocks, [token], position, True)` per sequence → logits [B, vocab].
        `device_tokens` [B]: the tokens, still on the device (the previous step's samples); the
        chunks' own tokens are then ignored."""
        batch = len(chunks)
        bucket = self.bucket_for(batch)
        width = self.block_tables.shape[1]
        rows = self._rows
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the pinned rows
        for i, (blocks, tokens, start, _) in enumerate(chunks):
            if len(blocks) > width:
                raise ValueError(f"a sequence holds {len(blocks)} blocks; the decode graphs allow {width}")
            rows[i, 0] = tokens[0]
            rows[i, 1] = start
            rows[i, 2 : 2 + len(blocks)] = blocks
        rows[batch:bucket, :2] = 0  # padding rows: token 0 at position 0, in the scratch block
        rows[batch:bucket, 2] = self.scratch_block
        staged = self._staged[:bucket]
        staged.copy_(self.host_rows[:bucket], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.input_ids[:bucket].copy_(staged[:, 0])
        self.positions[:bucket].copy_(staged[:, 1])
        self.block_tables[:bucket].copy_(staged[:, 2:])
        if device_tokens is not None:
            self.input_ids[:batch].copy_(device_tokens)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits = self.outputs[bucket]
        else:  # not captured (CPU): the same padded call, run directly
            logits = self._call(bucket)
        return logits[:batch]
