"""The paged KV cache: one tensor of fixed-size blocks, a free list, and per-sequence block tables.

Cache layout: [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]. A sequence owns a
list of physical block ids; its position p lives in block `blocks[p // block_size]` at slot
`p % block_size`. Blocks are handed out and returned whole, so memory never fragments and a
finished sequence's blocks are reusable at once.

`build_step_inputs` flattens one step's work (prefill chunks and decode tokens of many
sequences) into the tensors the compiled step takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from moec.errors import RequestError


class OutOfBlocks(RequestError):
    """Not enough free KV blocks. The scheduler catches it (wait or preempt); uncaught, it is a one-line error."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Free list of physical block ids. Lowest ids go out first, so a light load touches little memory."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        return len(self._used) / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n block ids, or OutOfBlocks with nothing allocated."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(
                f"KV cache full: need {n} blocks, {len(self._free)} of {self.num_blocks} free; "
                "run fewer or shorter requests at once, or give the engine more num_blocks"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks. All or nothing: a block that is not allocated (or twice in the list) is a ValueError."""
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks) or not self._used.issuperset(blocks):
            bad = sorted({b for b in blocks if b not in self._used or blocks.count(b) > 1})
            raise ValueError(f"freeing blocks that are not allocated (double free?): {bad}")
        self._used.difference_update(blocks)
        self._free.extend(sorted(blocks, reverse=True))


@dataclass
class SequenceBlocks:
    """The physical blocks one sequence owns, in position order (its row of the block table)."""

    blocks: list[int] = field(default_factory=list)

    def capacity(self, block_size: int) -> int:
        return len(self.blocks) * block_size

    def ensure_capacity(self, allocator: BlockAllocator, num_tokens: int, block_size: int) -> list[int]:
        """Grow to hold positions 0..num_tokens-1; return the newly allocated ids (OutOfBlocks: none added)."""
        missing = blocks_needed(num_tokens, block_size) - len(self.blocks)
        if missing <= 0:
            return []
        new = allocator.allocate(missing)
        self.blocks.extend(new)
        return new

    def release(self, allocator: BlockAllocator) -> None:
        allocator.free(self.blocks)
        self.blocks = []


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device | str,
) -> torch.Tensor:
    """Zeros, so padded block-table entries (block 0) read finite values that attention then masks."""
    return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


class StepChunk(NamedTuple):
    """One sequence's part of a step: plain tuples `(blocks, token_ids, start, wants_logits)` work too."""

    blocks: Sequence[int]  # the sequence's physical blocks, covering start + len(token_ids) positions
    token_ids: Sequence[int]  # tokens to feed this step
    start: int  # position of token_ids[0] in the sequence
    wants_logits: bool  # logits for the last token of this chunk (to sample the next one)


def build_step_inputs(
    chunks: Sequence[StepChunk | tuple], device: torch.device | str = "cpu", all_logits: bool = False,
    block_size: int | None = None, score: dict[int, Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """The step's int64 inputs: input_ids, positions, seq_ids [T]; block_tables [B, W]; logits_indices [N].

    Chunk b becomes row b of block_tables; W is the longest block list, shorter rows padded with 0.
    logits_indices: the last token of each chunk that wants logits, in chunk order, or every token
    when `all_logits`. `score` {chunk b: positions}: logits at those positions of chunk b too, just
    before its last token's; then "sample_rows" [chunks that want logits] gives the rows of
    logits_indices that are those last tokens. Given `block_size`, checks each chunk's blocks cover
    its positions (a short table would silently write K/V into padding block 0, another sequence's
    memory).
    """
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    input_ids: list[int] = []
    positions: list[int] = []
    seq_ids: list[int] = []
    logits_indices: list[int] = []
    sample_rows: list[int] = []
    width = max(1, max(len(c[0]) for c in chunks))
    table: list[list[int]] = []
    for row, (blocks, token_ids, start, wants_logits) in enumerate(chunks):
        n = len(token_ids)
        if n == 0:
            raise ValueError(f"chunk {row} has no tokens")
        if start < 0:
            raise ValueError(f"chunk {row} starts at negative position {start}")
        if block_size is not None and len(blocks) * block_size < start + n:
            raise ValueError(
                f"chunk {row}: {len(blocks)} blocks of {block_size} cannot hold positions up to {start + n - 1}"
            )
        if score and row in score:  # position p of the chunk is token len(input_ids) + p - start of the step
            logits_indices.extend(len(input_ids) + p - start for p in score[row])
        input_ids.extend(token_ids)
        positions.extend(range(start, start + n))
        seq_ids.extend([row] * n)
        if wants_logits and not all_logits:
            sample_rows.append(len(logits_indices))
            logits_indices.append(len(input_ids) - 1)
        table.append(list(blocks) + [0] * (width - len(blocks)))
    if all_logits:
        logits_indices = list(range(len(input_ids)))

    def i64(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device)

    return {
        "input_ids": i64(input_ids),
        "positions": i64(positions),
        "seq_ids": i64(seq_ids),
        "block_tables": i64(table),
        "logits_indices": i64(logits_indices),
        **({"sample_rows": i64(sample_rows)} if score else {}),
    }
