"""What `moe-runtime inspect` prints: an artifact at a glance, as text or as JSON."""

from __future__ import annotations

from moec.artifact.manifest import Manifest
from moec.artifact.reader import Artifact

_MAX_FILES = 20  # a sharded artifact may hold hundreds of files; the JSON lists them all


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _blocks(paths: list[str]) -> str:
    if len(paths) <= 2:
        return ", ".join(paths)
    return f"{len(paths)} blocks, {paths[0]} … {paths[-1]}"


def _ms(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def moe_kernel_lines(table: dict) -> list[str]:
    """The compile-time MoE tuning table (manifest kernels["moe"]): per shape, what the compiled
    op runs for each token-count bucket, its time, and the fastest candidate where that differs."""
    shapes = table.get("shapes") or {}
    if table.get("path") == "reference":
        lines = [f"MoE: PyTorch reference on {table.get('device', '?')} (nothing to tune, nothing timed)"]
        lines += [f"  {key}: reference  ({_blocks(entry.get('layers', []))})" for key, entry in shapes.items()]
        return lines
    lines = [f"MoE: tuned on {table.get('device', '?')} at compile time; {table.get('timer', '')}"]
    if table.get("switch_failed"):
        lines.append(f"  one path per block: AOTInductor failed on the Triton/grouped_mm branches "
                     f"({table['switch_failed']})")
    if table.get("grouped_mm_failed"):
        lines.append(f"  Triton kernels only: AOTInductor failed on the grouped_mm path ({table['grouped_mm_failed']})")
    for key, entry in shapes.items():
        ranges = entry.get("ranges") or []
        switch = entry.get("grouped_mm_above")
        if entry.get("path") == "triton" and ranges:
            bounds, parts = 0, []
            for r in ranges:
                hi = r.get("max_tokens") if r.get("max_tokens") is not None else switch
                parts.append(f"T≤{hi} {r.get('config')}" if hi is not None else f"T>{bounds} {r.get('config')}")
                bounds = hi if hi is not None else bounds
            if switch is not None:
                parts.append(f"T>{switch} grouped_mm (a branch in the graph)")
            how = "triton, " + ", ".join(parts) if len(parts) > 1 else f"triton {ranges[0].get('config')}, every T"
        else:
            how = str(entry.get("path"))
        lines.append(f"  {key}  ({_blocks(entry.get('layers', []))}): {how}")
        buckets = entry.get("buckets") or {}
        if buckets:
            width = max(len(str(row.get("runs", ""))) for row in buckets.values())
            lines.append(f"    {'tokens':>7}  {'runs':<{width}}  {'ms':>9}  fastest, where another")
            for tokens, row in buckets.items():
                runs = str(row.get("runs"))
                other = "" if row.get("fastest") == runs else f"{row.get('fastest')} {_ms(row.get('fastest_ms'))}"
                lines.append(f"    {tokens:>7}  {runs:<{width}}  {_ms(row.get('ms')):>9}  {other}".rstrip())
    return lines


def _manifest(obj: Artifact | Manifest) -> Manifest:
    return obj.manifest if isinstance(obj, Artifact) else obj


def render_summary(artifact_or_manifest: Artifact | Manifest) -> str:
    """A short plain-text description of an artifact for people."""
    m = _manifest(artifact_or_manifest)
    cfg, step = m.hf_config, m.step
    first = m.moe_regions[0] if m.moe_regions else None
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or (first.num_experts if first else "?")
    top_k = cfg.get("num_experts_per_tok") or (first.top_k if first else "?")
    device = m.device + (f" (compute capability {m.compute_capability})" if m.compute_capability else "")
    lines = [
        f"{m.name}  (moec artifact, format {m.format_version})",
        f"  built       {m.created_at} with moec {m.moec_version}, torch {m.torch_version}"
        + (f", triton {m.triton_version}" if m.triton_version else "") + f", python {m.python_version}",
        f"  device      {device}, dtype {m.dtype}",
        f"  model       {m.architecture}: {step.num_layers} layer{'' if step.num_layers == 1 else 's'}, "
        f"hidden {cfg.get('hidden_size', '?')}, {experts} experts, top-{top_k}, vocab {step.vocab_size}",
        f"  step        max batch {step.max_batch}, max seq len {step.max_seq_len}, "
        f"max tokens/step {step.max_tokens_per_step}, KV block size {step.kv_block_size} ({step.kv_dtype})",
        f"  MoE regions {len(m.moe_regions)}",
    ]
    for r in m.moe_regions:
        lines.append(f"    layer {r.layer:>3}  {r.num_experts} experts, top-{r.top_k}, "
                     f"{r.hidden_size}×{r.intermediate_size}, {r.activation}  ({r.path})")
    if m.kernels:
        lines.append("  kernels")
        for key, choice in m.kernels.items():
            if key == "moe" and isinstance(choice, dict):
                lines.extend("    " + line for line in moe_kernel_lines(choice))
            else:
                lines.append(f"    {key}: {choice}")
    if m.parallel:
        owners = " | ".join(f"rank {r}: {e[0]}-{e[-1]}" for r, e in enumerate(m.parallel.get("placement", [])))
        lines.append(f"  parallel    expert parallel over {m.parallel.get('ep')} ranks ({owners}), "
                     f"{m.parallel.get('chunks', 1)} token chunks per MoE layer")
    if m.offload:
        lines.extend(offload_lines(m.offload))
    lines.append(f"  files       {len(m.files)}, {human_bytes(m.total_bytes)} in all")
    for rel, entry in sorted(m.files.items(), key=lambda kv: -kv[1].size)[:_MAX_FILES]:
        lines.append(f"    {human_bytes(entry.size):>10}  {rel}")
    if len(m.files) > _MAX_FILES:
        lines.append(f"    … and {len(m.files) - _MAX_FILES} more (see --json)")
    if m.contains_native_code:
        lines.append("  warning     this artifact contains native code that runs when it is loaded: "
                     "only run artifacts you trust")
    return "\n".join(lines)


def offload_lines(offload: dict) -> list[str]:
    """The offload plan as inspect shows it: the policy, its prediction and the budgets."""
    pol, pred = offload.get("policy", {}), offload.get("prediction", {})
    lines = [f"  offload     batch {pol.get('batch')} in {pol.get('micro_batches')} micro-batches, attention/KV "
             f"{pol.get('placement')}, experts of {pol.get('resident_expert_layers')} of "
             f"{len(offload.get('experts', []))} MoE layers resident, the rest streamed"
             + (f", prefill steps of up to {pol['prefill_step_tokens']} tokens" if pol.get("prefill_step_tokens") else "")]
    if pred:
        lines.append(f"              predicted {pred['tokens_per_s']:.1f} tokens/s, bound by the {pred['bottleneck']} "
                     f"(hardware: {offload.get('hardware', {}).get('name')})")
    if "gpu_memory" in offload:
        lines.append(f"              budgets: GPU {human_bytes(offload['gpu_memory'])}, "
                     f"host {human_bytes(offload.get('host_memory', 0))}")
    return lines


def summary_dict(artifact_or_manifest: Artifact | Manifest) -> dict:
    """The manifest as JSON-ready data, plus `total_bytes`, for `inspect --json`."""
    m = _manifest(artifact_or_manifest)
    return {**m.model_dump(mode="json"), "total_bytes": m.total_bytes}
