"""Replace each MoE region with moec ops: `moe_router` → `fused_moe` (experts + weighted combine).

The replacement is built as a small graph of its own, checked numerically against the block it
replaces (the module export traced it from) on random inputs, and only then inlined. A
mismatch beyond the dtype's tolerance stops the compile: no artifact is written.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode

import moec.ops  # noqa: F401  (registers torch.ops.moec.*)
from moec.compiler.passes.moe_region import MoeRegion, find_moe_regions
from moec.errors import LoweringError

aten = torch.ops.aten
moec_ops = torch.ops.moec

# (rtol, atol) per dtype, against the block's own output magnitude
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def replacement_graph(region: MoeRegion, out_shape: list[int]) -> fx.Graph:
    """hidden, router_weight, gate_up_proj, down_proj → the block's output."""
    g = fx.Graph()
    hidden, router_w, w13, w2 = (g.placeholder(n) for n in ("hidden", "router_weight", "gate_up_proj", "down_proj"))
    flat = g.call_function(aten.reshape.default, (hidden, [-1, region.hidden_size]))
    routed = g.call_function(moec_ops.moe_router.default, (flat, router_w, region.top_k, region.renormalize))
    weights = g.call_function(operator.getitem, (routed, 0))
    ids = g.call_function(operator.getitem, (routed, 1))
    combined = g.call_function(moec_ops.fused_moe.default, (flat, w13, w2, weights, ids, region.activation))
    g.output(g.call_function(aten.reshape.default, (combined, out_shape)))
    return g


def _out_shape(region: MoeRegion) -> list[int]:
    shape = region.input.meta["val"].shape
    dynamic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    if len(dynamic) > 1:
        raise LoweringError(f"MoE block {region.path}: input has {len(dynamic)} dynamic dims; expected one (tokens)")
    return [-1 if i in dynamic else int(s) for i, s in enumerate(shape)]


def check_region(region: MoeRegion, graph: fx.Graph, model: torch.nn.Module, seed: int = 0) -> float:
    """Run the block and its replacement on random inputs; return the worst relative error."""
    block = model.get_submodule(region.path)
    params = dict(model.named_parameters())
    weights = [
        params[f"{region.path}.{getattr(region.spec, role)}"]
        for role in ("router_weight", "gate_up_proj", "down_proj")
    ]
    dtype = weights[1].dtype
    rtol, atol = TOLERANCE.get(dtype, (1e-2, 1e-2))
    replacement = fx.GraphModule(torch.nn.Module(), graph)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for tokens in (1, 7, 64):
            x = torch.randn(1, tokens, region.hidden_size, generator=gen).to(device=weights[1].device, dtype=dtype)
            want = block(x)
            got = replacement(x, *weights)
            err = (got.float() - want.float()).abs().max().item()
            bound = atol + rtol * want.float().abs().max().item()
            if not err <= bound:
                raise LoweringError(
                    f"MoE lowering of {region.path} differs from the block it replaces: max abs error {err:.3g} "
                    f"> {bound:.3g} at {tokens} tokens ({dtype}); refusing to write an artifact"
                )
            worst = max(worst, err / max(bound, 1e-30))
    return worst


def _inline(graph: fx.Graph, sub: fx.Graph, region: MoeRegion) -> fx.Node:
    """Copy `sub` into `graph` before the region's output, wired to the region's inputs."""
    fake_mode = detect_fake_mode([region.input.meta["val"]])
    env: dict[fx.Node, fx.Node] = {}
    bindings = iter([region.input, *(region.weights[r] for r in ("router_weight", "gate_up_proj", "down_proj"))])
    scope = region.output.meta.get("nn_module_stack")
    result = None
    with graph.inserting_before(region.output):
        for node in sub.nodes:
            if node.op == "placeholder":
                env[node] = next(bindings)
            elif node.op == "output":
                result = env[node.args[0]]
            else:
                new = graph.node_copy(node, lambda n: env[n])
                args = torch.fx.node.map_arg(new.args, lambda n: n.meta["val"])
                with fake_mode:
                    new.meta["val"] = new.target(*args)
                new.meta["nn_module_stack"] = scope
                env[node] = new
    return result


def lower_moe(ep: torch.export.ExportedProgram, model: torch.nn.Module, config,
              build=replacement_graph) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """A new program with every MoE region lowered to moec ops, and the regions described."""
    gm = copy.deepcopy(ep.graph_module)
    new_ep = ep._update(gm, ep.graph_signature)
    regions = find_moe_regions(new_ep, config)
    if not regions:
        raise LoweringError("no MoE block found in the exported graph: nothing for moec to compile")
    graph = gm.graph
    described = []
    for region in regions:
        sub = build(region, _out_shape(region))
        worst = check_region(region, sub, model)
        out = _inline(graph, sub, region)
        region.output.replace_all_uses_with(out)
        for node in reversed(region.nodes):
            if not node.users:  # symbolic sizes still used after the block stay
                graph.erase_node(node)
        described.append({**region.describe(), "check_error_ratio": round(worst, 6)})
    leftover = sorted({str(n.target) for n in graph.nodes if str(n.target).startswith("transformers.")})
    if leftover:
        raise LoweringError(f"the lowered graph still calls {', '.join(leftover)}, which the runtime cannot run")
    graph.lint()
    gm.recompile()
    return new_ep, described
