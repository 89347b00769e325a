"""The offload policy: which batch, micro-batches and placement run a model that does not fit the GPU.

A hierarchical roofline model (HRM, MoE-Lightning): each resource is a roof — the host link
(host-to-device, device-to-host, both at once), GPU memory bandwidth and matmul rate, CPU memory
bandwidth and FLOP rate — and a layer of a step takes as long as its busiest resource, because
the CGOPipe schedule overlaps them: the next layer's expert pages copy on their own stream while
this layer computes, and with two or more micro-batches the CPU's attention of one overlaps the
GPU's work on another. With one micro-batch the CPU and the GPU wait on each other.

What a policy decides (`OffloadPolicy`): the batch N and its number of micro-batches n; where
decode attention runs and where the KV cache lives (GPU/GPU, GPU with the cache on the host, or
both on the CPU); how many layers keep their experts resident on the GPU (the rest stream through
a double buffer of two layers' experts); and, for interactive use at batch 1, how many experts
a GPU-resident LRU cache holds. `search` enumerates every policy the memory budgets allow and
keeps the one with the highest predicted generation throughput (tokens generated per second over
prefill + generation of one batch), which takes milliseconds: exhaustive beats a solver here.

Costs come from the model's shape (`moec.runtime.roofline.ModelShape`) under uniform routing;
every prediction names its bottleneck and the share each resource is busy, so a plan that
misses its prediction says which figure was wrong.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

from moec.compiler.hardware_profile import HardwareProfile
from moec.errors import RecipeError
from moec.runtime.roofline import ModelShape, expected_distinct_experts

PLACEMENTS = ("gpu", "gpu-kv-host", "cpu")  # attention on GPU with its cache; on GPU, cache on host; both on CPU
RUNTIME_PLACEMENTS = ("gpu", "cpu")  # what moec.runtime executes today: plan_offload chooses among these
GPU_RESERVE_FRACTION = 0.10  # CUDA context, allocator slack, CUDA graphs, kernels' workspaces
HOST_RESERVE_FRACTION = 0.10
# the largest prefill step a plan takes: the tuner's largest token bucket (moec.ops.triton.configs)
STEP_TOKENS_MAX = 32768
RESOURCES = ("h2d", "d2h", "gpu", "cpu")


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    gen_len: int
    # the recipe's max_tokens_per_step: the runtime prefills a batch's prompts in steps of at most
    # this many tokens, and every step streams the non-resident experts again (None: one step). A
    # policy may raise it (`OffloadPolicy.prefill_step_tokens`), spending GPU memory on
    # activations to stream fewer times
    prefill_step_tokens: int | None = None


@dataclass(frozen=True)
class OffloadPolicy:
    batch: int
    micro_batches: int
    placement: str  # one of PLACEMENTS
    resident_expert_layers: int  # the first this many MoE layers keep their experts on the GPU
    cache_experts: int = 0  # batch-1 mode: experts an LRU cache holds on the GPU, over all streamed layers
    # the compiled step's token limit, where the plan raises the recipe's (None: the workload's)
    prefill_step_tokens: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float  # generated tokens per second over prefill + generation of one batch
    prefill_s: float
    decode_step_s: float
    bottleneck: str  # the resource busy longest in a decode step
    busy: dict  # resource -> busy seconds in one decode step
    gpu_bytes: int
    host_bytes: int
    batch1_tokens_per_s: float  # interactive decode at batch 1 with the LRU expert cache

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ sizes
def _layer_bytes(shape: ModelShape) -> tuple[int, int, int]:
    """(experts of one MoE layer, one expert, K+V of one token in one layer), in bytes. The MoE
    layers are assumed alike (Mixtral and Qwen3 are)."""
    moe = shape.moe_layers[0]
    expert = shape.expert_params(moe) * shape.weight_itemsize
    kv_token_layer = 2 * shape.num_kv_heads * shape.head_dim * shape.kv_itemsize
    return moe.num_experts * expert, expert, kv_token_layer


def _resident_weight_bytes(shape: ModelShape) -> int:
    """What stays on the GPU whatever the policy: everything but the experts, embedding included."""
    return (shape.non_expert_params + shape.vocab_size * shape.hidden_size) * shape.weight_itemsize


def prefill_step_tokens(workload: Workload, policy: OffloadPolicy) -> int:
    """The prompt tokens one prefill step runs: the batch's prompts, at most the artifact's
    max_tokens_per_step, the policy's or else the recipe's (its micro-batches split the step, they
    do not shrink it)."""
    tokens = policy.batch * workload.prompt_len
    limit = policy.prefill_step_tokens or workload.prefill_step_tokens
    return min(tokens, limit) if limit else tokens


def memory_use(shape: ModelShape, workload: Workload, policy: OffloadPolicy) -> tuple[int, int]:
    """(GPU bytes, host bytes) the policy needs, reserves not included."""
    layer_experts, expert, kv_token_layer = _layer_bytes(shape)
    num_moe = len(shape.moe_layers)
    streamed = num_moe - policy.resident_expert_layers
    h, w = shape.hidden_size, shape.weight_itemsize
    kv = policy.batch * (workload.prompt_len + workload.gen_len) * kv_token_layer * shape.num_layers
    moe = shape.moe_layers[0]
    # the largest live activations: a prefill step's tokens through an MoE layer (hidden in and out,
    # the gate/up rows of their top-k assignments), all at once since the step's micro-batches run
    # together, plus the batch's logits in fp32
    activations = prefill_step_tokens(workload, policy) * (2 * h + moe.top_k * 3 * moe.intermediate_size) * w
    activations += policy.batch * shape.vocab_size * 4
    gpu = (_resident_weight_bytes(shape) + policy.resident_expert_layers * layer_experts
           + (2 * layer_experts if streamed else 0) + policy.cache_experts * expert + activations
           + (kv if policy.placement == "gpu" else 0))
    host = streamed * layer_experts + (kv if policy.placement != "gpu" else 0)
    return gpu, host


# ------------------------------------------------------------------------------------ times
def _gpu_time(bytes_: float, flops: float, hw: HardwareProfile) -> float:
    return max(bytes_ / hw.gpu_bytes_per_s, flops / hw.gpu_flops_per_s)


def _link_time(h2d: float, d2h: float, hw: HardwareProfile) -> float:
    return max(h2d / hw.h2d_bytes_per_s, d2h / hw.d2h_bytes_per_s, (h2d + d2h) / hw.duplex_bytes_per_s)


def _cpu_attention(shape: ModelShape, hw: HardwareProfile, tokens: float, kv_bytes: float,
                   flops: float) -> tuple[float, float, float]:
    """(bytes down, bytes up, CPU seconds) of attention on the CPU (`moec.runtime.host_attention`)
    for `tokens` queries over `kv_bytes` of cache: q, k, v go down and the output comes back; the
    CPU's time at the rates the hardware profile measured that very code at (cache bytes attended
    per second when decoding, attention FLOPs per second over a prompt chunk)."""
    row = shape.head_dim * shape.weight_itemsize
    down = tokens * (shape.num_heads + 2 * shape.num_kv_heads) * row
    up = tokens * shape.num_heads * row
    return down, up, max(kv_bytes / hw.host_attention_kv_bytes_per_s, flops / hw.host_attention_flops_per_s)


def _decode_layer(shape: ModelShape, hw: HardwareProfile, policy: OffloadPolicy, context: float,
                  streamed: bool) -> dict:
    """Busy seconds of each resource for one layer of a decode step of the whole batch."""
    layer_experts, expert, kv_token_layer = _layer_bytes(shape)
    moe = shape.moe_layers[0]
    n, batch = policy.micro_batches, policy.batch
    micro = batch / n
    h, w, d = shape.hidden_size, shape.weight_itemsize, shape.head_dim
    dense = (shape.attention_matmul_params + shape.norm_params_per_layer + h * moe.num_experts) * w
    hit = expected_distinct_experts(moe.num_experts, moe.top_k, max(1, round(micro))) * expert
    gpu_bytes = n * (dense + hit)  # every micro-batch reads the layer's weights from GPU memory once
    gpu_flops = 2 * batch * (shape.attention_matmul_params + h * moe.num_experts
                             + moe.top_k * shape.expert_params(moe))
    kv_read = batch * context * kv_token_layer
    attn_flops = 4 * shape.num_heads * d * batch * context
    h2d = layer_experts if streamed else 0.0
    d2h = 0.0
    cpu = 0.0
    if policy.placement == "gpu":
        gpu_bytes += kv_read
        gpu_flops += attn_flops
    elif policy.placement == "gpu-kv-host":  # the cache crosses the link every step
        h2d += kv_read
        d2h += batch * kv_token_layer
        gpu_bytes += kv_read
        gpu_flops += attn_flops
    else:  # q, k, v go down, the attention output comes back
        down, up, cpu = _cpu_attention(shape, hw, batch, kv_read, attn_flops)
        d2h += down
        h2d += up
    return {"h2d": h2d / hw.h2d_bytes_per_s, "d2h": d2h / hw.d2h_bytes_per_s, "link": _link_time(h2d, d2h, hw),
            "gpu": _gpu_time(gpu_bytes, gpu_flops, hw), "cpu": cpu}


def _layer_time(t: dict, micro_batches: int) -> float:
    """CGOPipe: the link always overlaps compute; the CPU and the GPU overlap only across micro-batches."""
    compute = max(t["gpu"], t["cpu"]) if micro_batches >= 2 else t["gpu"] + t["cpu"]
    return max(t["link"], compute)


def _lm_head_time(shape: ModelShape, hw: HardwareProfile, rows: int) -> float:
    params = shape.vocab_size * shape.hidden_size
    return _gpu_time(params * shape.weight_itemsize, 2 * rows * params, hw)


def _decode_step(shape: ModelShape, hw: HardwareProfile, policy: OffloadPolicy, context: float) -> tuple[float, dict]:
    busy = dict.fromkeys(RESOURCES, 0.0)
    total = 0.0
    num_moe = len(shape.moe_layers)
    for i in range(num_moe):
        t = _decode_layer(shape, hw, policy, context, streamed=i >= policy.resident_expert_layers)
        total += _layer_time(t, policy.micro_batches)
        for r in RESOURCES:
            busy[r] += t[r]
    head = _lm_head_time(shape, hw, policy.batch)
    busy["gpu"] += head
    return total + head, busy


def _prefill(shape: ModelShape, hw: HardwareProfile, policy: OffloadPolicy, workload: Workload) -> float:
    """The batch's prompts, in steps of `prefill_step_tokens`: streamed
    experts cross the link once per layer per step, for all micro-batches of the step (an H200 run
    of 128 prompts of 512 tokens took 16 steps of 4096 and 13.3 s where one stream, 1.04 s, was
    predicted). Attention runs where the policy puts it: on the GPU (compute-bound there), writing
    a host-side cache back (`gpu-kv-host`), or on the CPU beside its cache (`cpu`: q, k, v down,
    the output up), overlapping the GPU's work only across micro-batches, as in decode."""
    layer_experts, _, kv_token_layer = _layer_bytes(shape)
    moe = shape.moe_layers[0]
    prompt_len = workload.prompt_len
    tokens = policy.batch * prompt_len
    steps = math.ceil(tokens / prefill_step_tokens(workload, policy))
    flops = 2 * tokens * (shape.attention_matmul_params + shape.hidden_size * moe.num_experts
                          + moe.top_k * shape.expert_params(moe))
    attn_flops = 2 * shape.num_heads * shape.head_dim * policy.batch * prompt_len * prompt_len  # causal: half of 4·P²
    dense = (shape.attention_matmul_params + shape.norm_params_per_layer) * shape.weight_itemsize
    gpu_bytes = steps * policy.micro_batches * (dense + layer_experts)
    d2h = h2d_act = cpu = 0.0
    if policy.placement == "cpu":
        d2h, h2d_act, cpu = _cpu_attention(shape, hw, tokens, tokens * kv_token_layer, attn_flops)
    else:
        flops += attn_flops
        d2h = tokens * kv_token_layer if policy.placement == "gpu-kv-host" else 0.0
    gpu = _gpu_time(gpu_bytes, flops, hw)
    total = 0.0
    for i in range(len(shape.moe_layers)):
        h2d = (steps * layer_experts if i >= policy.resident_expert_layers else 0.0) + h2d_act
        total += _layer_time({"link": _link_time(h2d, d2h, hw), "gpu": gpu, "cpu": cpu}, policy.micro_batches)
    return total + _lm_head_time(shape, hw, policy.batch)


def batch1_cache_experts(shape: ModelShape, policy: OffloadPolicy) -> int:
    """The experts the runtime's batch-1 cache holds: the plan's own cache when it has room for a
    token's top-k, else the double buffer's two layers of slots (`moec.runtime.expert_pager`)."""
    moe = shape.moe_layers[0]
    if policy.resident_expert_layers >= len(shape.moe_layers):
        return 0
    return policy.cache_experts if policy.cache_experts >= moe.top_k else 2 * moe.num_experts


def lru_hit_rate(cache_experts: int, streamed_layers: int, num_experts: int, top_k: int) -> float:
    """The share of a batch-1 token's streamed experts an LRU cache of `cache_experts` holds, under
    uniform routing. The layers come in a cycle: between two tokens' visits to a layer, every other
    streamed layer inserts its picks too, so an expert last used d tokens ago is still cached only
    if the distinct experts all streamed layers used in those d tokens fit. It was used d tokens ago
    with probability p (1 - p)^(d-1), p = top_k / E, so the hit rate is 1 - (1 - p)^D for the largest
    D that fits. (An H200 run with 13 streamed layers of Mixtral, 26 experts a token, and a cache of
    16 hit 0 times; cached / streamed experts, which this replaces, predicted 15%.)"""
    if streamed_layers <= 0 or cache_experts >= streamed_layers * num_experts:
        return 1.0
    fits = 0
    while streamed_layers * expected_distinct_experts(num_experts, top_k, fits + 1) <= cache_experts:
        fits += 1
    return 1.0 - (1.0 - top_k / num_experts) ** fits


def _batch1_tokens_per_s(shape: ModelShape, hw: HardwareProfile, policy: OffloadPolicy, context: float) -> float:
    """Decode at batch 1 with an LRU cache over the streamed layers (`batch1_cache_experts`): a token
    finds a needed expert cached at `lru_hit_rate` and copies the others (no prefetch: the router
    decides them one layer at a time)."""
    _, expert, _ = _layer_bytes(shape)
    moe = shape.moe_layers[0]
    one = replace(policy, batch=1, micro_batches=1)
    streamed_layers = len(shape.moe_layers) - policy.resident_expert_layers
    hit = lru_hit_rate(batch1_cache_experts(shape, policy), streamed_layers, moe.num_experts, moe.top_k)
    total = 0.0
    for i in range(len(shape.moe_layers)):
        t = _decode_layer(shape, hw, one, context, streamed=False)
        miss = 0.0 if i < policy.resident_expert_layers else moe.top_k * (1.0 - hit) * expert / hw.h2d_bytes_per_s
        total += t["gpu"] + t["cpu"] + miss  # a miss is waited for: nothing overlaps it
    return 1.0 / (total + _lm_head_time(shape, hw, 1))


def predict(shape: ModelShape, hw: HardwareProfile, workload: Workload, policy: OffloadPolicy) -> Prediction:
    context = workload.prompt_len + workload.gen_len / 2  # the average context of a generated token
    step_s, busy = _decode_step(shape, hw, policy, context)
    prefill_s = _prefill(shape, hw, policy, workload)
    gpu, host = memory_use(shape, workload, policy)
    link = max(busy["h2d"], busy["d2h"])
    shares = {"host link": link, "GPU": busy["gpu"], "CPU": busy["cpu"]}
    return Prediction(
        tokens_per_s=policy.batch * workload.gen_len / (prefill_s + workload.gen_len * step_s),
        prefill_s=prefill_s, decode_step_s=step_s, bottleneck=max(shares, key=shares.get), busy=busy,
        gpu_bytes=gpu, host_bytes=host, batch1_tokens_per_s=_batch1_tokens_per_s(shape, hw, policy, context),
    )


# ------------------------------------------------------------------------------------ search
def _batches(max_batch: int) -> list[int]:
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch}
    return sorted(sizes)


def step_options(workload: Workload, batch: int) -> list[int | None]:
    """The prefill step limits a plan may take: the recipe's max_tokens_per_step, then doubled while
    a batch's prompts need more than one step of it, up to `STEP_TOKENS_MAX`."""
    base = workload.prefill_step_tokens
    if base is None:
        return [None]
    out = [base]
    while out[-1] < batch * workload.prompt_len and out[-1] * 2 <= STEP_TOKENS_MAX:
        out.append(out[-1] * 2)
    return out


def search(shape: ModelShape, hw: HardwareProfile, workload: Workload, gpu_memory: int, host_memory: int,
           max_batch: int, fixed: dict | None = None,
           placements: tuple[str, ...] = PLACEMENTS) -> tuple[OffloadPolicy, Prediction]:
    """The policy with the highest predicted throughput that fits both budgets (after their
    reserves); `fixed` pins any OffloadPolicy field, `placements` are those to consider. Ties go to
    the smaller batch, then to fewer micro-batches, then to the shorter prefill step. Raises
    RecipeError naming the shortfall when nothing fits."""
    if not shape.moe_layers:
        raise RecipeError("offload: the model has no MoE layers to offload")
    fixed = dict(fixed or {})
    gpu_cap = int(gpu_memory * (1 - GPU_RESERVE_FRACTION))
    host_cap = int(host_memory * (1 - HOST_RESERVE_FRACTION))
    layer_experts, expert, _ = _layer_bytes(shape)
    num_moe = len(shape.moe_layers)
    best = None
    smallest = None  # the least memory any policy needed, for the error
    batches = [fixed["batch"]] if "batch" in fixed else _batches(max_batch)
    for batch, placement, resident in itertools.product(
            batches, [fixed["placement"]] if "placement" in fixed else placements,
            [fixed["resident_expert_layers"]] if "resident_expert_layers" in fixed else range(num_moe + 1)):
        micro_options = ([fixed["micro_batches"]] if "micro_batches" in fixed
                         else [m for m in _batches(batch) if batch % m == 0])
        steps = ([fixed["prefill_step_tokens"]] if "prefill_step_tokens" in fixed
                 else step_options(workload, batch))
        for micro, step in itertools.product(micro_options, steps):
            policy = OffloadPolicy(batch, micro, placement, resident, prefill_step_tokens=step)
            gpu, host = memory_use(shape, workload, policy)
            if smallest is None or (gpu - gpu_cap, host - host_cap) < smallest[0]:
                smallest = ((gpu - gpu_cap, host - host_cap), gpu, host)
            if gpu > gpu_cap or host > host_cap:
                continue
            # the batch-1 cache takes what the batch leaves on the GPU (whole experts)
            streamed_experts = (num_moe - resident) * shape.moe_layers[0].num_experts
            cache = fixed.get("cache_experts", min(streamed_experts, (gpu_cap - gpu) // expert))
            policy = replace(policy, cache_experts=int(cache))
            pred = predict(shape, hw, workload, policy)
            key = (pred.tokens_per_s, -batch, -micro, -(step or 0))
            if best is None or key > best[0]:
                best = (key, policy, pred)
    if best is None:
        _, gpu, host = smallest
        raise RecipeError(
            f"offload: nothing fits: the smallest plan needs {_gib(gpu)} of GPU memory (budget {_gib(gpu_memory)} "
            f"less {GPU_RESERVE_FRACTION:.0%} reserve) and {_gib(host)} of host memory (budget {_gib(host_memory)} "
            f"less {HOST_RESERVE_FRACTION:.0%}); raise offload.gpu_memory / offload.host_memory or shorten the workload")
    return best[1], best[2]


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def describe(policy: OffloadPolicy, pred: Prediction, shape: ModelShape) -> list[str]:
    """Lines for the compile log: the plan, its prediction and its bottleneck."""
    busy = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in pred.busy.items())
    cache = (f"{policy.cache_experts} experts" if policy.cache_experts >= shape.moe_layers[0].top_k
             else f"{batch1_cache_experts(shape, policy)} experts (the double buffer's slots)")
    return [
        f"batch {policy.batch} in {policy.micro_batches} micro-batches, attention/KV: {policy.placement}, "
        f"{policy.resident_expert_layers} layers' experts resident, batch-1 LRU cache of {cache}"
        + (f", prefill steps of up to {policy.prefill_step_tokens} tokens" if policy.prefill_step_tokens else ""),
        f"predicted {pred.tokens_per_s:.1f} tokens/s (prefill {pred.prefill_s:.3g} s, decode step "
        f"{pred.decode_step_s * 1e3:.3g} ms), bound by the {pred.bottleneck}; batch 1: {pred.batch1_tokens_per_s:.1f} tokens/s",
        f"per decode step busy: {busy}; GPU {_gib(pred.gpu_bytes)}, host {_gib(pred.host_bytes)}",
    ]


def host_memory_bytes() -> int:
    """This machine's physical memory: the host budget when a recipe names none."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_offload(plan, shape: ModelShape, max_batch: int, max_tokens_per_step: int | None = None) -> dict:
    """A recipe's `offload` block (`moec.compiler.recipe.OffloadPlan`) → what the manifest records:
    the chosen policy, its prediction, and the figures it was planned with."""
    from moec.compiler.hardware_profile import load_profile

    hw = load_profile(plan.hardware)
    workload = Workload(plan.workload.prompt_len, plan.workload.gen_len, max_tokens_per_step)
    host = plan.host_memory or host_memory_bytes()
    fixed = {} if plan.policy == "auto" else {k: v for k, v in plan.policy.model_dump().items() if v is not None}
    if fixed.get("batch", 1) > max_batch:
        raise RecipeError(f"offload.policy.batch {fixed['batch']} exceeds max_batch {max_batch}; lower it or raise max_batch")
    if "micro_batches" in fixed and "batch" in fixed and fixed["batch"] % fixed["micro_batches"]:
        raise RecipeError(f"offload.policy.micro_batches {fixed['micro_batches']} must divide batch {fixed['batch']}")
    if fixed.get("resident_expert_layers", 0) > len(shape.moe_layers):
        raise RecipeError(f"offload.policy.resident_expert_layers {fixed['resident_expert_layers']} exceeds the "
                          f"model's {len(shape.moe_layers)} MoE layers")
    if fixed.get("placement", RUNTIME_PLACEMENTS[0]) not in RUNTIME_PLACEMENTS:
        raise RecipeError(f"offload.policy.placement {fixed['placement']!r}: the runtime runs only "
                          f"{', '.join(RUNTIME_PLACEMENTS)} today (the GPU reading a host-side cache is not built)")
    policy, pred = search(shape, hw, workload, plan.gpu_memory, host, max_batch, fixed, RUNTIME_PLACEMENTS)
    return {"policy": policy.as_dict(), "prediction": pred.as_dict(), "hardware": hw.as_dict(),
            "workload": asdict(workload), "gpu_memory": plan.gpu_memory, "host_memory": host,
            "summary": describe(policy, pred, shape)}
