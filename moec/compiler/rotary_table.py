"""RoPE's cos/sin looked up per position instead of recomputed in every layer's kernels.

A Hugging Face model computes `cos(position * inv_freq)` and `sin(...)` once per forward, but
Inductor fuses that cheap pointwise work into every consumer: each layer's Q and K rotation
then evaluated cos and sin per element (every head again), with the precise libdevice routines
whose argument reduction is slow for the large angles of late positions. On an H200 the two
fused rotation kernels took 120 us a layer for a 4096-token prompt, several times their bytes.
Reading the values from a table (as vLLM's `cos_sin_cache` does) leaves a gather per element.

The table is filled with the model's own formula, on the model's device, in float32 and rounded
to the model's dtype as the model's module rounds its output, so the values are the same.
Only RoPE types whose frequencies do not depend on the sequence length are replaced.
"""

from __future__ import annotations

import torch
from torch import nn

# transformers rescales inv_freq with the sequence length for these (`dynamic_rope_update`)
LENGTH_DEPENDENT = ("dynamic", "longrope")


class RotaryTable(nn.Module):
    """Drop-in for a `*RotaryEmbedding` module: forward(x, position_ids) -> (cos, sin) in x's dtype."""

    def __init__(self, rotary: nn.Module, max_positions: int):
        super().__init__()
        positions = torch.arange(max_positions, device=rotary.inv_freq.device, dtype=torch.float)
        freqs = positions[:, None] * rotary.inv_freq.to(torch.float)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = getattr(rotary, "attention_scaling", 1.0)
        self.register_buffer("cos_table", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin_table", emb.sin() * scaling, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.cos_table[position_ids].to(x.dtype), self.sin_table[position_ids].to(x.dtype)


def static_rotary(model: nn.Module) -> nn.Module | None:
    """The decoder's RoPE module when a table can replace it, else None."""
    rotary = getattr(model, "rotary_emb", None)
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rotary is None or not hasattr(rotary, "inv_freq") or any(t in rope_type for t in LENGTH_DEPENDENT):
        return None
    return rotary


def use_rotary_table(model: nn.Module, max_positions: int) -> bool:
    """Swap `model.rotary_emb` (the decoder, `causal_lm.model`) for a table of `max_positions` rows."""
    rotary = static_rotary(model)
    if rotary is None:
        return False
    model.rotary_emb = RotaryTable(rotary, max_positions)
    return True
