"""Fuse linear projections that read the same input into one matmul (Q, K and V of each layer).

A pure function over the exported program. At decode a projection is a matrix-vector product
bound by reading its weight; three of them (Q 4096x4096, K and V 1024x4096 for Mixtral) are three
launches, three split-K reductions and three partly idle GPUs' worth of tails, where one
[6144, 4096] matmul streams the same bytes in one go (gpt-fast's `wqkv`). The group's weights are
concatenated along the output dimension into one new parameter, named after its parts
(`model.layers.0.self_attn.q_proj__k_proj__v_proj.weight`), and each old output becomes a slice of
the fused one. Only bias-free `aten.linear` calls on parameters that nothing else reads are fused
(a tied weight stays where it is).
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from moec.errors import LoweringError

LINEAR = torch.ops.aten.linear.default
CHECK_TOKENS = 3


def _fused_name(names: list[str]) -> str:
    """'a.b.q_proj.weight', 'a.b.k_proj.weight' → 'a.b.q_proj__k_proj.weight'."""
    modules = [n.removesuffix(".weight").rsplit(".", 1) for n in names]
    prefix = modules[0][0] if len(modules[0]) == 2 else ""
    if any((m[0] if len(m) == 2 else "") != prefix for m in modules):
        return "__".join(n.removesuffix(".weight").replace(".", "_") for n in names) + ".weight"
    return (f"{prefix}." if prefix else "") + "__".join(m[-1] for m in modules) + ".weight"


def _groups(graph: fx.Graph, param_of: dict[str, str]) -> list[list[fx.Node]]:
    """Linear calls grouped by their input, in graph order; groups of two or more."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.target is not LINEAR or (len(node.args) > 2 and node.args[2] is not None):
            continue
        x, w = node.args[0], node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "placeholder" and w.name in param_of and len(w.users) == 1):
            continue
        by_input.setdefault(x, []).append(node)
    groups = []
    for linears in by_input.values():
        weights = [n.args[1].meta["val"] for n in linears]
        if len(linears) >= 2 and len({(w.dtype, w.device, w.shape[1:]) for w in weights}) == 1:
            groups.append(linears)
    return groups


def fuse_projections(ep: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """(new program, [{"fused": name, "parts": [names]}]): every group of linears on one input
    as one linear on a concatenated weight, checked against the separate ones on random input."""
    gm = copy.deepcopy(ep.graph_module)
    graph = gm.graph
    param_of = dict(ep.graph_signature.inputs_to_parameters)
    state = dict(ep.state_dict)
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}  # by placeholder name
    fused = []
    for linears in _groups(graph, param_of):
        placeholders = [n.args[1] for n in linears]
        names = [param_of[p.name] for p in placeholders]
        name = _fused_name(names)
        parts = [state[n] for n in names]
        weight = torch.nn.Parameter(torch.cat(parts, 0).detach(), requires_grad=False)
        _check(parts, weight, name)
        fake = placeholders[0].meta["val"]
        with graph.inserting_before(placeholders[0]):
            new_weight = graph.placeholder("p_" + name.replace(".", "_"))
        with fake.fake_mode:
            new_weight.meta["val"] = torch.empty(weight.shape, dtype=fake.dtype, device=fake.device)
        first = linears[0]  # `_groups` lists them in graph order
        # node values are fake tensors with symbolic sizes: compute new ones inside their mode,
        # with composite ops (linear) decomposed the SymInt-aware way, as export traced them
        with graph.inserting_before(first), fake.fake_mode, enable_python_dispatcher():
            out = graph.call_function(LINEAR, (first.args[0], new_weight))
            out.meta = {**first.meta, "val": LINEAR(first.args[0].meta["val"], new_weight.meta["val"])}
            start = 0
            for linear, w in zip(linears, placeholders):
                rows = w.meta["val"].shape[0]
                part = graph.call_function(torch.ops.aten.slice.Tensor, (out, -1, start, start + rows))
                part.meta = {**linear.meta, "val": torch.ops.aten.slice.Tensor(out.meta["val"], -1, start, start + rows)}
                start += rows
                linear.replace_all_uses_with(part)
        for linear, w in zip(linears, placeholders):
            graph.erase_node(linear)
            graph.erase_node(w)
            specs.pop(w.name)
        for n in names:
            del state[n]
        state[name] = weight
        specs[new_weight.name] = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=new_weight.name),
                                           target=name, persistent=None)
        fused.append({"fused": name, "parts": names})
    if not fused:
        return ep, []
    graph.lint()
    gm.recompile()
    signature = copy.copy(ep.graph_signature)
    signature.input_specs = [specs[n.name] for n in graph.nodes if n.op == "placeholder"]
    return ep._update(gm, signature, state_dict=state), fused


def _check(weights: list[torch.Tensor], fused: torch.Tensor, name: str) -> None:
    """The fused matmul against the separate ones on random rows of the input's width."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(CHECK_TOKENS, fused.shape[1], generator=g).to(device=fused.device, dtype=fused.dtype)
    want = torch.cat([torch.nn.functional.linear(x, w) for w in weights], -1).float()
    got = torch.nn.functional.linear(x, fused).float()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    tol = 1e-5 if fused.dtype == torch.float32 else 2e-2
    if err > tol:
        raise LoweringError(f"fuse_projections: {name} differs from its parts by {err:.2e} (tolerance {tol:.0e})")
