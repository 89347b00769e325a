"""Replace each MoE region with moec ops: `moe_router` → `fused_moe` (experts + weighted combine).

Before anything is lowered, every block is checked against what the kernels for the target
device handle (`unsupported`): a shape or dtype they cannot run stops the compile with one line
naming the block, so it never reaches serving. `check_moe_blocks` runs the same check on the
loaded model before export (a block that export itself would choke on, like top_k > experts,
gets the same message); `lower_moe` runs it on each region found in the graph.

The replacement is built as a small graph of its own, checked numerically against the block it
replaces (the module export traced it from) on random inputs, and only then inlined. A
mismatch beyond the dtype's tolerance stops the compile: no artifact is written.
"""

from __future__ import annotations

import contextlib
import copy
import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode

import moec.ops  # noqa: F401  (registers torch.ops.moec.*)
from moec.compiler.passes.moe_region import MOE_BLOCKS, MoeRegion, find_moe_regions
from moec.errors import LoweringError
from moec.ops.moe_experts import ACTIVATIONS
from moec.ops.triton.configs import CUDA_DTYPES, INT32_LIMIT, MAX_BLOCK_M, MAX_EXPERTS

aten = torch.ops.aten
moec_ops = torch.ops.moec

# (rtol, atol) per dtype, against the block's own output magnitude
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


# Hugging Face `hidden_act` names that compute exactly one of the kernels' activations
ACTIVATION_ALIASES = {
    "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
}


def kernel_activation(hf_name: str) -> str:
    return ACTIVATION_ALIASES.get(hf_name, hf_name)


def unsupported(num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str,
                dtype: torch.dtype, device: str, max_tokens: int | None = None) -> str | None:
    """Why moec's MoE kernels for `device` cannot run a block of this shape, and what would work;
    None if they can. CPU runs the PyTorch reference; CUDA runs the Triton kernels, whose limits
    are stated in `moec.ops.triton.configs`."""
    if activation not in ACTIVATIONS:
        return (f"activation {activation!r} is not supported by the MoE kernels; "
                f"supported: {', '.join(sorted(ACTIVATIONS))} "
                f"(HF names {', '.join(sorted(ACTIVATION_ALIASES))} map to them)")
    if not 1 <= top_k <= num_experts:
        return f"top_k {top_k} with {num_experts} experts; top_k must be between 1 and {num_experts}"
    dtype_name = str(dtype).removeprefix("torch.")
    if device != "cuda":
        if not dtype.is_floating_point:
            return f"expert weights are {dtype_name}; the reference MoE op takes floating-point weights"
        return None
    if dtype_name not in CUDA_DTYPES:
        return (f"expert weights are {dtype_name}; the CUDA MoE kernels take {', '.join(CUDA_DTYPES)} "
                f"(set the recipe's dtype)")
    if num_experts > MAX_EXPERTS:
        return (f"{num_experts} experts; the CUDA kernels handle at most {MAX_EXPERTS} experts per block "
                f"(device: cpu runs any count)")
    w13_elems = 2 * intermediate_size * hidden_size
    if w13_elems >= INT32_LIMIT:
        return (f"hidden {hidden_size} x intermediate {intermediate_size}: one expert's gate/up weights "
                f"({w13_elems} elements) exceed the CUDA kernels' 32-bit offsets; 2 x intermediate x hidden "
                f"must be below {INT32_LIMIT}")
    if max_tokens is not None:
        slots = max_tokens * top_k + min(max_tokens * top_k, num_experts) * (MAX_BLOCK_M - 1)
        if slots >= INT32_LIMIT:
            fits = (INT32_LIMIT - 1 - num_experts * (MAX_BLOCK_M - 1)) // top_k
            return (f"{max_tokens} tokens per step x top_k {top_k} overflow the CUDA kernels' 32-bit row "
                    f"indices; set max_tokens_per_step to at most {fits}")
    return None


def check_supported(path: str, desc: dict, dtype: torch.dtype, device: str, max_tokens: int | None = None) -> None:
    """Raise LoweringError naming the block if the kernels for `device` cannot run it."""
    problem = unsupported(desc["num_experts"], desc["top_k"], desc["hidden_size"], desc["intermediate_size"],
                          desc["activation"], dtype, device, max_tokens)
    if problem:
        raise LoweringError(f"MoE block {path}: {problem}")


def check_moe_blocks(model: torch.nn.Module, config, device: str, max_tokens: int | None = None) -> list[dict]:
    """`unsupported` on every MoE block of the loaded model, before export; returns each block's
    shape (num_experts, top_k, hidden_size, intermediate_size, activation), as the regions the
    passes find will have it."""
    blocks = []
    for path, block in model.named_modules():
        spec = MOE_BLOCKS.get(type(block).__name__)
        if spec is None:
            continue
        w13 = block.get_parameter(spec.gate_up_proj)
        desc = {
            "num_experts": int(w13.shape[0]),
            "top_k": int(config.num_experts_per_tok),
            "hidden_size": int(w13.shape[2]),
            "intermediate_size": int(w13.shape[1]) // 2,
            "activation": kernel_activation(getattr(config, "hidden_act", "silu")),
        }
        check_supported(path, desc, w13.dtype, device, max_tokens)
        blocks.append(desc)
    return blocks


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
              build=replacement_graph, device: str | None = None,
              max_tokens: int | None = None, block_on_device=None) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """A new program with every MoE region lowered to moec ops, and the regions described.

    `device`: the target whose kernels must run the regions (default: where the weights are);
    `max_tokens`: the most tokens one step may hold (bounds the kernels' index arithmetic);
    `block_on_device(path)`: a context in which the block at `path` holds its real weights, where
    the model holds stand-ins for them (`host_experts`); each block is checked inside its own."""
    gm = copy.deepcopy(ep.graph_module)
    new_ep = ep._update(gm, ep.graph_signature)
    regions = find_moe_regions(new_ep, config)
    if not regions:
        raise LoweringError("no MoE block found in the exported graph: nothing for moec to compile")
    for region in regions:  # all checked before any is lowered: the first problem stops the compile
        region.activation = kernel_activation(region.activation)
        w13 = region.weights["gate_up_proj"].meta["val"]
        check_supported(region.path, region.describe(), w13.dtype, device or w13.device.type, max_tokens)
    graph = gm.graph
    described = []
    for region in regions:
        sub = build(region, _out_shape(region))
        with block_on_device(region.path) if block_on_device else contextlib.nullcontext():
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
