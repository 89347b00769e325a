"""The compiler: recipe → load → export → passes → lower → package, each stage timed and shown."""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from moec.artifact import ArtifactWriter
from moec.artifact.manifest import environment_fields
from moec.artifact.summary import moe_kernel_lines
from moec.compiler.export import export_step
from moec.compiler.host_experts import keep_on_host
from moec.compiler.load import (check_fits_device, check_free_disk, copy_off_files, device_bytes, fits_device,
                               load_model, read_hf_config)
from moec.compiler.offload_policy import plan_offload
from moec.compiler.lower import compile_graph, save_weights
from moec.compiler.passes import lower_moe
from moec.compiler.passes.external_attention import externalize_attention
from moec.compiler.passes.external_experts import externalize_experts
from moec.compiler.passes.fused_projections import fuse_projections
from moec.compiler.passes.moe_lowering import check_moe_blocks
from moec.compiler.passes.moe_tuning import CUDA_SWITCH, MoeTuning, apply_moe_plans, region_shape, tune_moe
from moec.compiler.recipe import Recipe
from moec.compiler.step import PagedStep, head_dim
from moec.errors import RecipeError, first_line
from moec.ops.expert_dispatch import expert_placement
from moec.runtime.roofline import ModelShape

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class Stages:
    """Prints each compile stage with a spinner while it runs and its time when done."""

    def __init__(self, console: Console):
        self.console = console
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        start = time.perf_counter()
        with self.console.status(f"[bold]{name}[/] {detail}"):
            yield
        self.times[name] = time.perf_counter() - start
        self.console.print(f"[green]✓[/] {name:<8} {self.times[name]:6.1f}s  {detail}")


def hf_name(model_dir: Path) -> str:
    return "synthetic model" if model_dir.name == "model" and "moec-synthetic-" in str(model_dir) else str(model_dir)


def _region_table(regions: list[dict]) -> str:
    lines = [f"  {'layer':>5}  {'block':<24} {'experts':>7} {'top-k':>5}  hidden×inter  act"]
    for r in regions:
        lines.append(
            f"  {r['layer']:>5}  {r['path']:<24} {r['num_experts']:>7} {r['top_k']:>5}  "
            f"{r['hidden_size']}×{r['intermediate_size']:<7} {r['activation']}"
        )
    return "\n".join(lines)


FALLBACK_SAYS = {
    "switch_failed": "AOTInductor failed on the program with Triton/grouped_mm branches",
    "grouped_mm_failed": "AOTInductor failed on the program with the grouped_mm path",
}
FALLBACK_DOES = {"switch_failed": "lowering again with one path per MoE block",
                 "grouped_mm_failed": "lowering again with the Triton kernels only"}


def fallback_after(key: str, tuning: MoeTuning, error: Exception, console: Console) -> MoeTuning:
    """The tuning to lower when AOTInductor failed on the program (upstream bugs have failed on
    the Triton/grouped_mm branches, torch 2.11 on an H200): `tuning`, one of the tuner's fallbacks
    chosen from the same measurements, with why in the manifest's table under `key`. Slower where
    the path it gives up was faster, never a failed compile for it."""
    why = f"{type(error).__name__}: {first_line(error, 300)}"
    console.print(f"  [yellow]{FALLBACK_SAYS[key]}[/] ({escape(why)}); {FALLBACK_DOES[key]}",
                  soft_wrap=True, highlight=False, markup=True)
    fallback = copy.deepcopy(tuning)
    fallback.table[key] = why
    return fallback


@contextmanager
def _model_source(recipe: Recipe, stages: Stages):
    """The HF directory to load: the recipe's path, or a synthetic model written to a temp dir."""
    if recipe.model.path is not None:
        yield Path(recipe.model.path)
        return
    from moec.compiler.synthetic import write_synthetic_model

    syn = recipe.model.synthetic
    # drawn where the model will run: a Mixtral-sized model takes minutes on a CPU, seconds on a GPU
    # (one larger than the GPU, to offload, a module at a time on the GPU into host memory)
    init = "cuda" if recipe.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="moec-synthetic-") as tmp:
        with stages.stage("source", f"synthetic {syn.architecture}, seed {syn.seed}, as an HF directory"):
            model_dir = write_synthetic_model(syn.architecture, syn.config, syn.seed, Path(tmp) / "model",
                                              dtype=syn.dtype, init_device=init,
                                              progress=lambda msg: stages.console.print(f"  {msg}", style="dim",
                                                                                        markup=False, highlight=False))
        yield model_dir


def compile_recipe(recipe: Recipe, out_dir: Path, explain: bool = False, console: Console | None = None,
                   experts_on_host: bool | None = None) -> Path | None:
    """Compile `recipe` into an artifact at `out_dir` (None with `explain`). `experts_on_host`:
    whether an offloaded or expert-parallel model keeps its experts in host memory while it
    compiles (`host_experts`); None decides as the comment at the load stage says (checks pass
    True or False to run one path where the rule would pick the other)."""
    console = console or Console(stderr=True)
    stages = Stages(console)
    dtype = getattr(torch, recipe.dtype)
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda, but this machine has no CUDA GPU; set device: cpu or compile on the GPU machine")
    if recipe.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # an offloaded or expert-parallel artifact's graph reads no expert weight: the runtime hands
    # the experts to it
    external = recipe.offload is not None or recipe.parallel.ep > 1
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    with _model_source(recipe, stages) as model_dir:
        with stages.stage("load", f"{hf_name(model_dir)} from safetensors ({recipe.dtype})"):
            hf_config = read_hf_config(model_dir)
            model = load_model(model_dir, dtype)
            # external experts may stay in host memory (`host_experts`): on a GPU only where the
            # model does not fit it (where it fits, the compile is the one every GPU result so far
            # was built with), and for the CPU, where it costs nothing and every test compile runs it
            if experts_on_host is None:
                experts_on_host = recipe.device != "cuda" or not fits_device(model, recipe.device)
            keep = external and experts_on_host
            host_experts = keep_on_host(model, recipe.device) if keep else None
            check_fits_device(model, recipe.device, host_experts=host_experts)
            model = host_experts.move_rest(model) if host_experts else model.to(recipe.device)
            if recipe.model.path is None:  # our own temporary copy: the disk holds one copy of the weights, not two
                copy_off_files(model, host_experts.host if host_experts else None)
                for weights_file in model_dir.glob("*.safetensors"):
                    weights_file.unlink()
            # shapes the kernels cannot run stop here, naming the block, before export trips on them
            blocks = check_moe_blocks(model, model.config, recipe.device, recipe.max_tokens_per_step)
        if recipe.offload is not None:
            # before export: the plan may raise the step's token limit (fewer prefill steps, each
            # streaming the experts once) where its GPU budget holds the activations
            with stages.stage("offload", "policy search over batch, micro-batches, placement and prefill step (HRM)"):
                shape = ModelShape.from_config(hf_config, blocks, recipe.dtype)
                offload = plan_offload(recipe.offload, shape, recipe.max_batch, recipe.max_tokens_per_step)
                step_tokens = offload["policy"]["prefill_step_tokens"] or recipe.max_tokens_per_step
                if step_tokens != recipe.max_tokens_per_step:  # lower_moe checks the kernels' limits at it
                    recipe = recipe.model_copy(update={"max_tokens_per_step": step_tokens})
            console.print("\n".join("  " + line for line in offload["summary"]), soft_wrap=True, markup=False,
                          highlight=False)
            if explain:
                return None
        step = PagedStep(model, max_positions=recipe.max_seq_len)
        with stages.stage("export", f"tokens ≤ {recipe.max_tokens_per_step}, batch ≤ {recipe.max_batch}"):
            ep = export_step(step, dtype, recipe.kv_block_size, recipe.max_tokens_per_step, recipe.max_batch,
                             recipe.max_seq_len, device=recipe.device,
                             fake_mode=host_experts.fake_mode if host_experts else None)
        with stages.stage("passes", "MoE regions → moec ops, Q/K/V → one matmul; each checked on random inputs"):
            ep, regions = lower_moe(ep, step, model.config, device=recipe.device,
                                    max_tokens=recipe.max_tokens_per_step,
                                    block_on_device=(lambda path: host_experts.on_device([path])) if host_experts else None)
            ep, fused = fuse_projections(ep)
        console.print(f"  {len(regions)} MoE regions lowered:\n{_region_table(regions)}")
        if fused:
            parts = "/".join(name.rsplit(".", 2)[-2] for name in fused[0]["parts"])
            console.print(f"  {len(fused)} groups of projections on one input fused into one matmul each ({parts}, ...)")
        expert_counts = sorted({r["num_experts"] for r in regions})
        if recipe.parallel.ep > 1 and (len(expert_counts) != 1 or expert_counts[0] % recipe.parallel.ep):
            raise RecipeError(f"parallel.ep {recipe.parallel.ep}: the MoE layers' {expert_counts} experts do not split "
                              "evenly over the ranks; choose a divisor of the expert count")
        if explain:
            return None
        # before the tuner's minutes: the artifact is built beside out_dir, and one it replaces stays
        # until the new one is complete
        check_free_disk(out_dir, device_bytes(model) + (host_experts.bytes if host_experts else 0),
                        "the artifact's weights", "choose another --output")
        tune_detail = ("each MoE shape × token bucket: Triton configs and torch._grouped_mm timed"
                       if recipe.device == "cuda" else "cpu: the MoE op runs the PyTorch reference, nothing to time")
        with stages.stage("tune", tune_detail):
            # a branch between paths lives in the graph; external experts (offload, EP) take one plan
            timed = {}  # the tuner times each MoE shape on its first block
            for r in regions:
                timed.setdefault(region_shape(r, dtype), r["path"])
            with host_experts.on_device(timed.values()) if host_experts else contextlib.nullcontext():
                tuning = tune_moe(regions, step, dtype, recipe.device, recipe.max_tokens_per_step,
                                  allow_switch=not external and CUDA_SWITCH)
        console.print("\n".join("  " + line for line in moe_kernel_lines(tuning.table)),
                      soft_wrap=True, markup=False, highlight=False)

        def program(tuning: MoeTuning) -> tuple[torch.export.ExportedProgram, list[dict]]:
            """The lowered program with `tuning`'s plans, its experts (and, offloaded to the CPU, its
            attention) handed to the runtime where the recipe says so; and which experts those are."""
            planned = apply_moe_plans(ep, step, tuning.plans, tuning.switches)
            if not external:
                return planned, []
            planned, experts = externalize_experts(planned)
            if recipe.offload is not None and offload["policy"]["placement"] == "cpu":
                planned, _ = externalize_attention(planned)  # the KV cache lives on the host, attention beside it
            return planned, experts

        if host_experts:
            host_experts.hollow(ep)
        final, experts = program(tuning)
        if recipe.offload is not None:
            offload["experts"] = experts
            del offload["summary"]
        parallel = {}
        if recipe.parallel.ep > 1:
            parallel = {"ep": recipe.parallel.ep, "chunks": recipe.parallel.chunks, "experts": experts,
                        "placement": expert_placement(regions[0]["num_experts"], recipe.parallel.ep)}

        config = model.config
        with ArtifactWriter(out_dir) as writer:
            with stages.stage("lower", f"AOTInductor for {recipe.device}"):
                # weights first: AOTInductor's decomposition run may drop the program's constants
                save_weights(final, writer.tmp / "weights.safetensors", host_experts.host if host_experts else None)
                # the tuning's program, then each of the tuner's fallbacks while AOTInductor fails
                attempts, error = [(None, tuning), *tuning.fallbacks()], None
                for i, (key, attempt) in enumerate(attempts):
                    if key is not None:
                        tuning = fallback_after(key, attempt, error, console)
                    try:
                        compile_graph(final if key is None else program(tuning)[0], writer.tmp / "model.pt2")
                        break
                    except Exception as e:  # noqa: BLE001
                        if i == len(attempts) - 1:
                            raise
                        error = e
            with stages.stage("package", str(out_dir)):
                tok_dir = writer.tmp / "tokenizer"
                tok_dir.mkdir()
                for name in TOKENIZER_FILES:
                    if (model_dir / name).is_file():
                        shutil.copy2(model_dir / name, tok_dir / name)
                writer.commit({
                    **environment_fields(recipe.device),
                    "name": recipe.name,
                    "dtype": recipe.dtype,
                    "device": recipe.device,
                    "architecture": hf_config["architectures"][0],
                    "hf_config": hf_config,
                    "recipe": recipe.model_dump(mode="json"),
                    "step": {
                        "graph": "model.pt2",
                        "weights": "weights.safetensors",
                        "max_batch": recipe.max_batch,
                        "max_seq_len": recipe.max_seq_len,
                        "max_tokens_per_step": recipe.max_tokens_per_step,
                        "kv_block_size": recipe.kv_block_size,
                        "num_layers": config.num_hidden_layers,
                        "num_kv_heads": config.num_key_value_heads,
                        "head_dim": head_dim(config),
                        "vocab_size": config.vocab_size,
                        "kv_dtype": recipe.dtype,
                    },
                    "moe_regions": [{k: v for k, v in r.items() if k != "check_error_ratio"} for r in regions],
                    "kernels": {"moe": tuning.table},
                    "offload": offload if recipe.offload is not None else {},
                    "parallel": parallel,
                })
    total = sum(stages.times.values())
    peak = f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of GPU memory at most" if recipe.device == "cuda" else ""
    console.print(f"[bold green]compiled[/] {recipe.name} → {out_dir} in {total:.1f}s{peak}")
    return out_dir
