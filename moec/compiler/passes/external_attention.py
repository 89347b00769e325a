"""Take attention and its KV cache out of the graph: each layer's `write_kv` + `paged_attention`
becomes one `external_attention` call (offload placement `cpu`).

A pure function over the exported program. The layer's new keys and values, its queries, the
step's slots and block tables go to the op; the runtime's host-side executor owns the cache.
The graph's `kv_cache` input is then unused (the runtime passes a one-block placeholder), and so
is the step's tile table for the GPU kernel, which dead-code elimination drops.
"""

from __future__ import annotations

import copy

import torch

from moec.errors import LoweringError


def externalize_attention(ep: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, int]:
    """(new program, number of attention layers moved out)."""
    gm = copy.deepcopy(ep.graph_module)
    new_ep = ep._update(gm, ep.graph_signature)
    graph = gm.graph
    writes = {node.args[1]: node for node in graph.nodes if node.target is torch.ops.moec.write_kv.default}
    moved = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.moec.paged_attention.default:
            continue
        query, kv_cache, layer, block_tables, seq_ids, positions, scale, *rest = node.args
        write = writes.pop(layer, None)
        if write is None or write.args[0] is not kv_cache:
            raise LoweringError(f"offload placement cpu: attention layer {layer} has no write_kv into its cache; "
                                "this model's attention cannot move to the CPU")
        _, _, key, value, slots = write.args
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.moec.external_attention.default,
                                      (query, key, value, slots, block_tables, seq_ids, positions, layer, scale,
                                       rest[0] if rest else None))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(write)
        moved += 1
    if not moved or writes:
        raise LoweringError("offload placement cpu: the graph's KV-cache writes and attention calls do not pair up "
                            f"({moved} attention calls, {len(writes)} writes left); use placement gpu")
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return new_ep, moved
