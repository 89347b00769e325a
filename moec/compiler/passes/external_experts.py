"""Take the expert weights out of the graph: each `fused_moe` becomes `external_moe` of a layer.

A pure function over the exported program. The MoE layers are numbered in graph order (the
order a step runs them), and the result names, per layer, the two weights the runtime now pages
in itself. Their placeholders stay in the program unused; AOTInductor compiles no constant for
an unused input, so the runtime hands the compiled graph only the weights it still reads.
"""

from __future__ import annotations

import copy

import torch

from moec.errors import LoweringError


def externalize_experts(ep: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """(new program, [{"layer", "gate_up_proj", "down_proj"}]): weight FQNs per offloaded MoE layer."""
    gm = copy.deepcopy(ep.graph_module)
    new_ep = ep._update(gm, ep.graph_signature)
    param_of = {**new_ep.graph_signature.inputs_to_parameters, **new_ep.graph_signature.inputs_to_buffers}
    layers = []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.moec.fused_moe.default:
            continue
        hidden, w13, w2, weights, ids, activation, *rest = node.args
        names = [param_of.get(w.name) if isinstance(w, torch.fx.Node) else None for w in (w13, w2)]
        if None in names:
            raise LoweringError(f"offload: {node.name} reads expert weights that are not parameters of the model")
        layer = len(layers)
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.moec.external_moe.default,
                                      (hidden, weights, ids, layer, activation, rest[0] if rest else ""))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        layers.append({"layer": layer, "gate_up_proj": names[0], "down_proj": names[1]})
    if not layers:
        raise LoweringError("offload: the graph has no fused_moe call to offload")
    for entry in layers:
        for key in ("gate_up_proj", "down_proj"):
            node = next(n for n in graph.nodes if n.op == "placeholder" and param_of.get(n.name) == entry[key])
            if node.users:
                raise LoweringError(f"offload: {entry[key]} is still read outside its MoE block; it cannot be paged")
    graph.lint()
    gm.recompile()
    return new_ep, layers
