"""moec's custom ops. Importing this package registers them with `torch.library`, which the
runtime must do before it loads a compiled graph that calls them."""

from moec.ops.moe_combine import moe_combine, moe_combine_ref
from moec.ops.moe_experts import ACTIVATIONS, moe_experts, moe_experts_ref
from moec.ops.moe_router import moe_router, moe_router_ref
from moec.ops.paged_attention import paged_attention_ref, write_kv

__all__ = [
    "ACTIVATIONS",
    "moe_combine",
    "moe_combine_ref",
    "moe_experts",
    "moe_experts_ref",
    "moe_router",
    "moe_router_ref",
    "paged_attention_ref",
    "write_kv",
]
