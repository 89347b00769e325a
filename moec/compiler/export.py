"""Stage 2, export: `torch.export` of the paged step with dynamic token, batch and block dims."""

from __future__ import annotations

import torch
from torch.export import Dim

from moec.compiler.step import PagedStep, head_dim


def example_inputs(config, dtype: torch.dtype, block_size: int, device: str = "cpu") -> tuple:
    """Small valid inputs whose dynamic dims are all distinct and ≥ 2 (so none specialises)."""
    num_tokens, batch, width, num_blocks = 5, 2, 3, 7
    kv_cache = torch.zeros(
        config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, head_dim(config), dtype=dtype
    )
    # sequence 0: prefill of 3 tokens; sequence 1: 2 tokens continuing at position 4
    seq_ids = torch.tensor([0, 0, 0, 1, 1])
    positions = torch.tensor([0, 1, 2, 4, 5])
    block_tables = torch.tensor([[1, 2, 0], [3, 4, 5]])
    input_ids = torch.randint(0, config.vocab_size, (num_tokens,))
    logits_indices = torch.tensor([2, 4, 0, 1])
    args = (input_ids, positions, seq_ids, block_tables, kv_cache, logits_indices)
    return tuple(a.to(device) for a in args)


def dynamic_shapes(max_tokens: int, max_batch: int, max_blocks_per_seq: int) -> dict:
    tokens = Dim("tokens", min=1, max=max_tokens)
    batch = Dim("batch", min=1, max=max_batch)
    width = Dim("blocks_per_seq", min=1, max=max_blocks_per_seq)
    blocks = Dim("num_blocks", min=1, max=2**31 - 1)
    logits = Dim("logits", min=1, max=max_tokens)
    return {
        "input_ids": {0: tokens},
        "positions": {0: tokens},
        "seq_ids": {0: tokens},
        "block_tables": {0: batch, 1: width},
        "kv_cache": {2: blocks},
        "logits_indices": {0: logits},
    }


def export_step(step: PagedStep, dtype: torch.dtype, block_size: int, max_tokens: int, max_batch: int,
                max_seq_len: int, device: str = "cpu", fake_mode=None) -> torch.export.ExportedProgram:
    """`fake_mode`: the mode of fake parameters in `step` (`host_experts.keep_on_host`); the
    example inputs are made fake in it too, so that export traces in that mode."""
    args = example_inputs(step.config, dtype, block_size, device)
    if fake_mode is not None:
        args = tuple(fake_mode.from_tensor(a) for a in args)
    shapes = dynamic_shapes(max_tokens, max_batch, -(-max_seq_len // block_size))
    with torch.no_grad():
        return torch.export.export(step, args, dynamic_shapes=shapes, strict=False)
