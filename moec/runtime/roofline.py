"""The model's roofline: bytes and FLOPs of one engine step, from the artifact's manifest alone.

A step's time cannot beat max(bytes / copy bandwidth, FLOPs / matmul rate), so a benchmark row
can say how far it is from what the hardware allows. What a step of `num_seqs` sequences, each
feeding `new_tokens` tokens and attending to `context` cached tokens, is counted as:

bytes read + written
    every non-expert weight once (attention, norms, routers, dense MLPs, final norm, lm_head),
    the embedding rows of the step's tokens (a gather, not the whole table),
    the weights of the experts touched: with T tokens each routed to top_k of E experts, the
    expected number of distinct experts per MoE layer under *uniform* routing,
    E * (1 - (1 - top_k/E) ** T): top_k at T = 1, tending to E as T grows. Real routing is
    skewed, which hits fewer experts, so a real step may read less than this,
    the KV cache read (num_seqs * context * layers * 2 * kv_heads * head_dim * itemsize)
    and the new tokens' K and V written.
    Activations (hidden states between ops, logits) are not counted: at decode they are a few
    KiB per token against megabytes to gigabytes of weights.
FLOPs
    2 * (matmul weights one token touches: attention projections, router, top_k experts, dense
    MLP) * tokens, + 2 * vocab * hidden for each row of logits (the step computes lm_head only
    for the last token of each sequence), + attention 4 * heads * head_dim per (query, key) pair
    per layer, causal: a new token at position p attends to p keys. Norms, RoPE, softmax and
    the SiLU are not counted.

Decode of B sequences at context C: `decode_step(shape, B, C)`; prefill of T prompt tokens in
one step: `prefill_step(shape, T)`. `bound_s` turns a step into its lower-bound time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class MoeLayerShape:
    num_experts: int
    top_k: int
    intermediate_size: int


@dataclass(frozen=True)
class ModelShape:
    """The sizes the roofline needs: a decoder of `num_layers` layers, some of them MoE."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weight_itemsize: int
    kv_itemsize: int
    moe_layers: tuple[MoeLayerShape, ...]
    dense_intermediate_size: int = 0  # the MLP of each layer that is not MoE
    qk_norm: bool = False  # Qwen3: an RMSNorm of head_dim on q and on k
    attention_bias: bool = False

    @classmethod
    def from_manifest(cls, manifest) -> ModelShape:
        """Read from the manifest: the step spec for layers, heads and vocabulary, the MoE regions
        for the experts, hf_config for the rest. Experts are counted at the model dtype: the
        recipe's quantization is `none` for every artifact today."""
        cfg, step = manifest.hf_config, manifest.step
        num_heads = int(cfg.get("num_attention_heads") or step.num_kv_heads)
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            num_layers=step.num_layers,
            num_heads=num_heads,
            num_kv_heads=step.num_kv_heads,
            head_dim=step.head_dim,
            vocab_size=step.vocab_size,
            weight_itemsize=getattr(torch, manifest.dtype).itemsize,
            kv_itemsize=getattr(torch, step.kv_dtype).itemsize,
            moe_layers=tuple(MoeLayerShape(r.num_experts, r.top_k, r.intermediate_size)
                             for r in manifest.moe_regions),
            dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
            qk_norm=cfg.get("model_type", "").startswith("qwen3"),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )

    @classmethod
    def from_config(cls, cfg: dict, moe_regions: list[dict], dtype: str) -> ModelShape:
        """The same from what the compiler has before a manifest exists: the HF config and the
        MoE regions its passes found (KV cache in the model dtype, as compiled artifacts keep it)."""
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        step = SimpleNamespace(num_layers=int(cfg["num_hidden_layers"]), num_kv_heads=kv_heads, head_dim=head_dim,
                               vocab_size=int(cfg["vocab_size"]), kv_dtype=dtype)
        regions = [SimpleNamespace(**r) for r in moe_regions]
        return cls.from_manifest(SimpleNamespace(hf_config=cfg, step=step, dtype=dtype, moe_regions=regions))

    # --- parameter counts ------------------------------------------------------------------

    @property
    def attention_matmul_params(self) -> int:
        """q, k, v and o projections of one layer (biases included where the model has them)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        bias = (q + 2 * kv) if self.attention_bias else 0
        return h * q + 2 * h * kv + q * h + bias

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    def expert_params(self, layer: MoeLayerShape) -> int:
        """gate, up and down of one expert."""
        return 3 * self.hidden_size * layer.intermediate_size

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layers)

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def non_expert_params(self) -> int:
        """Weights every step reads whole: all but the experts and the embedding table."""
        h = self.hidden_size
        return (
            self.num_layers * (self.attention_matmul_params + self.norm_params_per_layer)
            + sum(h * m.num_experts for m in self.moe_layers)  # routers
            + self.num_dense_layers * self.dense_mlp_params
            + h  # final norm
            + self.vocab_size * h  # lm_head
        )

    @property
    def total_params(self) -> int:
        """Everything stored, the embedding table and all experts included (untied embeddings)."""
        experts = sum(m.num_experts * self.expert_params(m) for m in self.moe_layers)
        return self.non_expert_params + experts + self.vocab_size * self.hidden_size

    def matmul_params_per_token(self) -> int:
        """Weights one token multiplies through, lm_head aside (it runs only on rows of logits)."""
        return (
            self.num_layers * self.attention_matmul_params
            + sum(self.hidden_size * m.num_experts + m.top_k * self.expert_params(m) for m in self.moe_layers)
            + self.num_dense_layers * self.dense_mlp_params
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_itemsize


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts `tokens` tokens hit when each picks `top_k` of
    `num_experts` uniformly at random: each expert is missed by one token with probability
    1 - top_k/E, by all of them with (1 - top_k/E) ** tokens."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class StepCost:
    """Bytes and FLOPs of one step; expert bytes are an expectation, hence floats."""

    num_seqs: int
    tokens: int  # new tokens fed this step
    context: int  # cached tokens each sequence attends to at its last new token
    weight_bytes: float  # non-expert weights + the embedding rows gathered
    expert_bytes: float
    experts_hit_per_layer: float  # mean over MoE layers, under uniform routing
    kv_read_bytes: float
    kv_write_bytes: float
    matmul_flops: float
    attention_flops: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.expert_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    def bound_s(self, copy_bytes_per_s: float, matmul_flops_per_s: float) -> float:
        return bound_s(self.bytes, self.flops, copy_bytes_per_s, matmul_flops_per_s)

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes": self.bytes, "flops": self.flops}


def step_cost(shape: ModelShape, num_seqs: int, new_tokens: int, context: int) -> StepCost:
    """One step of `num_seqs` sequences, each feeding `new_tokens` tokens (the last of which
    attends to `context` tokens, itself included) and producing one row of logits."""
    if not 1 <= new_tokens <= context:
        raise ValueError(f"need 1 <= new_tokens ({new_tokens}) <= context ({context})")
    h, w = shape.hidden_size, shape.weight_itemsize
    tokens = num_seqs * new_tokens
    hits = [expected_distinct_experts(m.num_experts, m.top_k, tokens) for m in shape.moe_layers]
    expert_bytes = sum(n * shape.expert_params(m) * w for n, m in zip(hits, shape.moe_layers))
    # new token i (0-based) of a sequence sits at position context - new_tokens + i + 1 and attends to that many keys
    keys_per_seq = new_tokens * context - new_tokens * (new_tokens - 1) // 2
    attention_flops = 4 * shape.num_heads * shape.head_dim * shape.num_layers * num_seqs * keys_per_seq
    return StepCost(
        num_seqs=num_seqs, tokens=tokens, context=context,
        weight_bytes=(shape.non_expert_params + tokens * h) * w,
        expert_bytes=expert_bytes,
        experts_hit_per_layer=sum(hits) / len(hits) if hits else 0.0,
        kv_read_bytes=num_seqs * context * shape.kv_bytes_per_token,
        kv_write_bytes=tokens * shape.kv_bytes_per_token,
        matmul_flops=2 * (shape.matmul_params_per_token() * tokens + num_seqs * shape.vocab_size * h),
        attention_flops=attention_flops,
    )


def decode_step(shape: ModelShape, batch: int, context: int) -> StepCost:
    """B sequences decoding one token each, every one attending to `context` tokens."""
    return step_cost(shape, batch, 1, context)


def prefill_step(shape: ModelShape, tokens: int) -> StepCost:
    """One prompt of `tokens` tokens prefilled in one step (from an empty cache)."""
    return step_cost(shape, 1, tokens, tokens)


def bound_s(bytes: float, flops: float, copy_bytes_per_s: float, matmul_flops_per_s: float) -> float:
    """The roofline: a step takes at least as long as its memory traffic and its arithmetic."""
    return max(bytes / copy_bytes_per_s, flops / matmul_flops_per_s)
