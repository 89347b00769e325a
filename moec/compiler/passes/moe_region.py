"""Find the MoE regions of an exported graph by the module scope export records.

Each node carries `nn_module_stack` (module path → class). A region is every node traced inside
one MoE block (`model.layers.3.mlp`, a `MixtralSparseMoeBlock`): its parameters, its one
activation input and its one output. Model source is never edited; a new architecture needs
only a `MoeBlockSpec` row saying where its router and expert weights live.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from moec.errors import LoweringError


@dataclass(frozen=True)
class MoeBlockSpec:
    """Where a block keeps its weights (relative to the block) and how it routes."""

    router_weight: str
    gate_up_proj: str  # [E, 2I, H], gate rows first
    down_proj: str  # [E, H, I]
    renormalize: Callable[[object], bool]


MOE_BLOCKS: dict[str, MoeBlockSpec] = {
    "MixtralSparseMoeBlock": MoeBlockSpec(
        "gate.weight", "experts.gate_up_proj", "experts.down_proj", renormalize=lambda cfg: True
    ),
    "Qwen3MoeSparseMoeBlock": MoeBlockSpec(
        "gate.weight", "experts.gate_up_proj", "experts.down_proj",
        renormalize=lambda cfg: bool(getattr(cfg, "norm_topk_prob", False)),
    ),
}


@dataclass
class MoeRegion:
    path: str
    block_class: str
    spec: MoeBlockSpec
    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    weights: dict[str, fx.Node]  # role → placeholder: router_weight, gate_up_proj, down_proj
    num_experts: int = 0
    top_k: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    renormalize: bool = True
    activation: str = "silu"
    extra: dict = field(default_factory=dict)

    @property
    def layer(self) -> int:
        m = re.search(r"layers\.(\d+)\.", self.path + ".")
        return int(m.group(1)) if m else -1

    def describe(self) -> dict:
        return {
            "layer": self.layer,
            "path": self.path,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "renormalize": self.renormalize,
            "activation": self.activation,
        }


def _block_scope(node: fx.Node) -> tuple[str, str] | None:
    """The outermost MoE block this node was traced in, as (path, class name)."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
        if name in MOE_BLOCKS:
            return path, name
    return None


def find_moe_regions(ep: torch.export.ExportedProgram, config) -> list[MoeRegion]:
    graph = ep.graph_module.graph
    param_of = {**ep.graph_signature.inputs_to_parameters, **ep.graph_signature.inputs_to_buffers}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    scoped: dict[str, list[fx.Node]] = {}
    classes: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        scope = _block_scope(node)
        if scope:
            scoped.setdefault(scope[0], []).append(node)
            classes[scope[0]] = scope[1]

    regions = []
    for path, nodes in scoped.items():
        members = set(nodes)
        spec = MOE_BLOCKS[classes[path]]
        by_fqn = {param_of[n.name]: n for n in placeholders.values() if n.name in param_of}
        weights = {}
        for role in ("router_weight", "gate_up_proj", "down_proj"):
            fqn = f"{path}.{getattr(spec, role)}"
            if fqn not in by_fqn:
                raise LoweringError(f"MoE block {path}: parameter {fqn} not found in the exported graph")
            weights[role] = by_fqn[fqn]
        inputs = {
            a for n in nodes for a in n.all_input_nodes
            if a not in members and a not in weights.values() and isinstance(a.meta.get("val"), torch.Tensor)
        }
        # symbolic sizes computed inside a block may be shared with later code: not outputs
        outputs = [
            n for n in nodes
            if isinstance(n.meta.get("val"), torch.Tensor) and any(u not in members for u in n.users)
        ]
        if len(inputs) != 1 or len(outputs) != 1:
            raise LoweringError(
                f"MoE block {path}: expected one activation input and one output, found "
                f"{len(inputs)} and {len(outputs)}; this block's forward is not a plain MoE layer"
            )
        w13 = weights["gate_up_proj"].meta["val"]
        region = MoeRegion(path, classes[path], spec, nodes, inputs.pop(), outputs[0], weights)
        region.num_experts = int(w13.shape[0])
        region.intermediate_size = int(w13.shape[1]) // 2
        region.hidden_size = int(w13.shape[2])
        region.top_k = int(config.num_experts_per_tok)
        region.renormalize = spec.renormalize(config)
        region.activation = getattr(config, "hidden_act", "silu")
        regions.append(region)
    return regions
