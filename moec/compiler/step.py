"""The function an artifact exports: one step of a Hugging Face causal LM over a paged KV cache.

    step(input_ids[T], positions[T], seq_ids[T], block_tables[B, W], kv_cache, logits_indices[N])
        -> logits f32[N, vocab]            (kv_cache updated in place)

Tokens of all sequences are flattened, so one graph serves prefill, decode and mixed batches.
The model's own modules run unchanged; only its attention function is swapped, through the
`AttentionInterface` transformers provides for exactly this, for one that reads and writes the
paged cache (`moec.ops.paged_attention`). The paged-cache tensors reach it as forward kwargs.
"""

from __future__ import annotations

import torch
from torch import nn

from moec.ops.paged_attention import paged_attention, slot_mapping, write_kv
from moec.compiler.rotary_table import use_rotary_table
from moec.ops.paged_tiles import sequence_tiles, step_tile_tokens

ATTN_IMPLEMENTATION = "moec_paged"
STEP_INPUTS = ("input_ids", "positions", "seq_ids", "block_tables", "kv_cache", "logits_indices")


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] → [1, T, H, D]."""
    kv_cache = kwargs["moec_kv_cache"]
    block_tables, seq_ids, positions = kwargs["moec_block_tables"], kwargs["moec_seq_ids"], kwargs["moec_positions"]
    layer = module.layer_idx
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    write_kv(kv_cache, layer, k, v, kwargs["moec_slots"])
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(q, kv_cache, layer, block_tables, seq_ids, positions, scale, kwargs.get("sliding_window"),
                          kwargs.get("moec_seq_info"))
    return out.unsqueeze(0), None


def head_dim(config) -> int:
    """A config's attention head size: its own field where it has one (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class PagedStep(nn.Module):
    """Wraps a `*ForCausalLM`; parameter names stay those of the HF checkpoint. RoPE's cos/sin
    come from a table of `max_positions` rows (`moec.compiler.rotary_table`; default: the
    config's max_position_embeddings), so positions must stay below it."""

    def __init__(self, causal_lm: nn.Module, max_positions: int | None = None):
        super().__init__()
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.config = causal_lm.config
        heads = self.config.num_attention_heads
        self.tile_tokens = step_tile_tokens(heads, getattr(self.config, "num_key_value_heads", None) or heads,
                                            head_dim(self.config))
        use_rotary_table(self.model, max_positions or self.config.max_position_embeddings)

    def forward(self, input_ids, positions, seq_ids, block_tables, kv_cache, logits_indices):
        out = self.model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            moec_kv_cache=kv_cache,
            moec_block_tables=block_tables,
            moec_seq_ids=seq_ids,
            moec_positions=positions,
            moec_slots=slot_mapping(block_tables, seq_ids, positions, kv_cache.shape[3]),
            # the attention kernel's tiles of this step, shared by every layer
            moec_seq_info=sequence_tiles(seq_ids, block_tables.shape[0], *self.tile_tokens),
        )
        hidden = out.last_hidden_state[0].index_select(0, logits_indices)
        return self.lm_head(hidden).float()
