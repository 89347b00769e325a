"""moec's custom ops. Importing this package registers them with `torch.library`, which the
runtime must do before it loads a compiled graph that calls them."""

import logging

# triton_op warns on every registration when Triton is absent (CPU machines); the CPU path needs none.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

from moec.ops.fused_moe import fused_moe  # noqa: E402
from moec.ops.moe_combine import moe_combine, moe_combine_ref  # noqa: E402
from moec.ops.moe_experts import ACTIVATIONS, moe_experts, moe_experts_ref  # noqa: E402
from moec.ops.moe_router import moe_router, moe_router_ref  # noqa: E402
from moec.ops.external_moe import external_moe, set_expert_executor  # noqa: E402
from moec.ops.external_attention import external_attention, set_attention_executor  # noqa: E402
from moec.ops.paged_attention import paged_attention_ref, write_kv  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "fused_moe",
    "moe_combine",
    "moe_combine_ref",
    "moe_experts",
    "moe_experts_ref",
    "moe_router",
    "moe_router_ref",
    "external_attention",
    "external_moe",
    "paged_attention_ref",
    "set_attention_executor",
    "set_expert_executor",
    "write_kv",
]
