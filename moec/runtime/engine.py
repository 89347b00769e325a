"""The engine: an artifact's compiled step, its paged KV cache, and the step that feeds them.

Each step flattens the work the scheduler picked — prompt chunks and one token per decoding
sequence — into one call of the compiled graph, then samples the sequences whose chunk
reached their last token. While the host handles a decode step's tokens, the next decode
step is already running on the device (`Engine._launch_ahead`). `generate` drives it to
completion for a batch of prompts; the server's `EngineLoop` drives it forever, admitting
requests between steps:

    Engine.load("artifacts/tiny-mixtral").generate(["Hello", "Once upon"], max_tokens=32)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from moec.artifact import Artifact, open_artifact
from moec.errors import ArtifactError, MoecError, RequestError
from moec.runtime.compiled_step import CompiledStep
from moec.runtime.decode_graphs import DecodeGraphs
from moec.runtime.detokenizer import IncrementalDetokenizer
from moec.ops.external_attention import set_attention_executor
from moec.ops.external_moe import set_expert_executor
from moec.runtime.expert_pager import DeviceBudget, ExpertPager
from moec.runtime.expert_parallel import ExpertParallelExecutor, check_world
from moec.runtime.host_attention import HostAttention
from moec.runtime.launch import group_failed
from moec.runtime.micro_batches import MicroBatchRunner
from moec.runtime.kv_cache import BlockAllocator, allocate_kv_cache, blocks_needed, build_step_inputs
from moec.runtime.sampler import Sampler, SamplingParams, TokenLogprob, make_generator, token_logprobs
from moec.runtime.scheduler import Scheduler
from moec.runtime.sequence import Sequence


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    time_to_first_token_s: float
    logits: list[torch.Tensor] | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, where asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first), where asked


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    elapsed_s: float = 0.0
    time_to_first_token_s: float = 0.0
    # steps in which every scheduled sequence decoded one token (no prompt in the step): the
    # steady-state decode rate, free of the prefill steps a large batch needs first
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0


class _DevicePrompts:
    """The sampled rows' prompt ids on the device, as the sampler reads them (repetition_penalty's
    rows only): each sequence copies its prompt once (`Sequence.prompt_tensor`), not each step,
    and a step whose rows read none builds nothing."""

    __slots__ = ("seqs", "device")

    def __init__(self, seqs: list[Sequence], device: torch.device):
        self.seqs, self.device = seqs, device

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.seqs[row].prompt_tensor(self.device)


@dataclass
class _Launched:
    """A step queued on the device: the sequences it samples for, and their new token ids, on
    the device (to feed a step launched ahead) and on their way to the host (`host_ids`, ready
    once `ready` has fired: waiting on it waits for this copy only, not for a step queued after)."""

    sampled: list[Sequence]
    decoding: bool  # every sequence decoded one token (no prompt chunk): counted in decode stats
    device_ids: torch.Tensor
    host_ids: torch.Tensor
    ready: torch.cuda.Event | None
    logits: torch.Tensor | None  # kept when recording logits
    # (rows of `sampled` that asked, their tokens' log-probabilities, the top ones and their ids)
    logprobs: tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def token_ids(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_ids.tolist()

    def token_logprobs(self) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """row → (the sampled token's log-probability, the most likely (id, log-probability))."""
        if self.logprobs is None:
            return {}
        rows, chosen, top, top_ids = self.logprobs
        chosen, top, top_ids = chosen.tolist(), top.tolist(), top_ids.tolist()
        return {row: (chosen[j], list(zip(top_ids[j], top[j]))) for j, row in enumerate(rows)}


class HostIdRing:
    """Two pinned buffers taken in turn: at most two steps are in flight (one being collected,
    one launched ahead), so a buffer is never refilled before it has been read."""

    def __init__(self, size: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(size, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.turn = 0

    def send(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """(host copy of `ids`, the event that fires once it has landed; None on a CPU)."""
        if not self.cuda:
            return ids.cpu(), None
        host, ready = self.buffers[self.turn][: ids.shape[0]], self.events[self.turn]
        self.turn ^= 1
        host.copy_(ids, non_blocking=True)
        ready.record()
        return host, ready


def describe_load_phases(phases: dict[str, float]) -> str:
    """`Engine.load_phases` as bench and serve print it: "graph 0.6s, weights 4.1s, ..."."""
    return ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f}s" for name, seconds in phases.items())


class Engine:
    def __init__(self, artifact: Artifact, num_blocks: int | None = None, cuda_graphs: bool = True,
                 ep_chunks: int | None = None, overlap: bool = True):
        self.artifact = artifact
        spec = self.spec = artifact.manifest.step
        self.device = torch.device(artifact.manifest.device)
        self.rank, self.world = 0, 1
        if artifact.manifest.parallel:  # expert-parallel: one process per rank, each on its own GPU
            self.rank, self.world = check_world(artifact)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
                torch.cuda.set_device(self.device)
        if ep_chunks is not None and not artifact.manifest.parallel:
            raise MoecError(f"--ep-chunks: {artifact.path} is not expert-parallel (compiled without parallel.ep); "
                            "drop the flag")
        offload = artifact.manifest.offload or None
        micro_batches = int(offload["policy"].get("micro_batches", 1)) if offload else 1
        self.step_fn = CompiledStep(artifact, runners=micro_batches)
        # where load time goes (graph, weights, KV cache, CUDA-graph capture): printed by bench/serve
        self.load_phases = dict(self.step_fn.load_phases)
        phase_start = time.perf_counter()
        self.tokenizer, self.bos_id, self.eos_id = _load_tokenizer(artifact.tokenizer_path)
        max_batch = spec.max_batch
        if offload:  # the plan's batch, and a cache for its workload (one longest sequence at least)
            max_batch = min(max_batch, int(offload["policy"]["batch"]))
            workload = offload["workload"]["prompt_len"] + offload["workload"]["gen_len"]
            num_blocks = num_blocks or max(max_batch * blocks_needed(min(workload, spec.max_seq_len), spec.kv_block_size),
                                           blocks_needed(spec.max_seq_len, spec.kv_block_size))
        self.num_blocks = num_blocks or spec.max_batch * blocks_needed(spec.max_seq_len, spec.kv_block_size)
        self.allocator = BlockAllocator(self.num_blocks)
        # one block beyond the allocator's: padded decode rows write their K/V there
        self.scratch_block = self.num_blocks
        kv_dims = (spec.num_layers, self.num_blocks + 1, spec.kv_block_size, spec.num_kv_heads, spec.head_dim)
        kv_dtype = getattr(torch, spec.kv_dtype)
        self.host_attention = None
        if offload and offload["policy"]["placement"] == "cpu":  # the cache and attention on the host
            self.host_attention = HostAttention(*kv_dims, kv_dtype)
            set_attention_executor(self.host_attention)
            kv_dims = (spec.num_layers, 1, *kv_dims[2:])  # the graph's kv_cache input: an unused placeholder
        self.kv_cache = allocate_kv_cache(*kv_dims, kv_dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.load_phases["kv_cache_s"] = time.perf_counter() - phase_start
        self.scheduler = Scheduler(self.allocator, spec.kv_block_size, max_batch, spec.max_tokens_per_step)
        self.expert_pager = None
        if offload:
            budget = DeviceBudget(int(offload["gpu_memory"]))
            budget.take(sum(t.numel() * t.element_size() for t in self.step_fn.weights.values()), "the compiled weights")
            budget.take(self.kv_cache.numel() * self.kv_cache.element_size(),
                        "the KV cache" if self.host_attention is None else "the KV cache's placeholder")
            self.expert_pager = ExpertPager(artifact, self.device, budget)
            set_expert_executor(self.expert_pager)
            cuda_graphs = False  # the pager runs between layers, which a replayed graph would skip
        self.micro_batches = None  # CGOPipe: a step's sequences as the plan's micro-batches, in flight together
        if micro_batches > 1:
            self.micro_batches = MicroBatchRunner(self.step_fn, self.expert_pager, micro_batches, self.device,
                                                  spec.kv_block_size)
        self.expert_executor = None
        if self.world > 1:
            self.expert_executor = ExpertParallelExecutor(artifact, self.device, self.rank, ep_chunks)
            set_expert_executor(self.expert_executor)
            cuda_graphs = False  # the all-to-all sizes change with every step's routing
        self._busy = None  # lockstep_step's flag tensor
        self.sampler = Sampler(self.eos_id)
        self.overlap = overlap  # launch a decode step ahead while the host handles the last one (`step`)
        self._ahead: _Launched | None = None
        self._host_ids = HostIdRing(spec.max_batch, self.device)
        self.stats = GenerationStats()
        self.record_logits = False
        self.decode_graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.decode_graphs = DecodeGraphs(
                self.step_fn, self.kv_cache, spec.max_batch, blocks_needed(spec.max_seq_len, spec.kv_block_size),
                self.scratch_block,
            )
            self.load_phases["cuda_graphs_s"] = self.decode_graphs.capture_s

    @classmethod
    def load(cls, path: str | Path | Artifact, verify: bool = True, num_blocks: int | None = None,
             cuda_graphs: bool = True, ep_chunks: int | None = None, overlap: bool = True) -> Engine:
        """`path`: the artifact's directory, or an artifact already opened (and checked) with
        `open_artifact`, which `verify` then does not check again.
        `cuda_graphs`: replay decode steps as CUDA graphs (captured here) when on a GPU.
        `ep_chunks`: token chunks per MoE layer of an expert-parallel artifact (default: its manifest's).
        `overlap`: launch each CUDA-graph decode step before the host has read the last one's tokens."""
        artifact = path if isinstance(path, Artifact) else open_artifact(path, verify=verify)
        return cls(artifact, num_blocks=num_blocks, cuda_graphs=cuda_graphs, ep_chunks=ep_chunks, overlap=overlap)

    # --- requests -------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def new_sequence(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Validate a request and make its sequence (nothing is allocated until it is scheduled)."""
        params.validate()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("empty prompt: give at least one token of text")
        limit = self.spec.max_seq_len
        if len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"prompt of {len(ids)} tokens plus max_tokens {params.max_tokens} exceeds the compiled max_seq_len "
                f"{limit}; shorten the prompt, lower max_tokens, or recompile with a larger max_seq_len"
            )
        if blocks_needed(len(ids) + params.max_tokens, self.spec.kv_block_size) > self.num_blocks:
            raise RequestError(f"request needs more KV blocks than the cache holds ({self.num_blocks}); lower max_tokens")
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise RequestError(f"prompt token ids must lie in [0, {self.spec.vocab_size})")
        for what, token_ids in (("logit_bias token ids", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if not all(0 <= t < self.spec.vocab_size for t in token_ids):
                raise RequestError(f"{what} must lie in [0, {self.spec.vocab_size})")
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, min_tokens=params.min_tokens)
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        seq = Sequence(ids, params, detok, generator)
        if request_id is not None:
            seq.request_id = request_id
        return seq

    # --- one step ---------------------------------------------------------------------------

    def step(self) -> tuple[list[tuple[Sequence, str]], list[Sequence]]:
        """Run the scheduler's next step. Returns (sequence, new text) for every sequence that got
        a token, and the sequences that finished (their blocks are already free).

        Decode steps overlap (see `_launch_ahead`): the next step may already be running on the
        device when this returns, fed by this step's tokens without a round trip through the host;
        the next call then only collects it."""
        step_start = time.perf_counter()
        launched, self._ahead = self._ahead, None
        if launched is not None and all(seq.finished for seq in launched.sampled):
            launched = None  # every sequence it ran for has ended (EOS, stop string, abort)
        if launched is None:
            plan = self.scheduler.schedule()
            if not plan:
                return [], []
            launched = self._launch(plan)
            if launched is None:  # prompt chunks only: nothing to sample yet
                return [], []
        self._ahead = self._launch_ahead(launched)
        next_ids = launched.token_ids()
        logprobs = launched.token_logprobs()
        now = time.perf_counter()  # the device has finished the step (not the one launched ahead)
        if launched.decoding:
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(launched.sampled)
            self.stats.decode_s += now - step_start
        emitted, finished = [], []
        for row, (seq, token) in enumerate(zip(launched.sampled, next_ids)):
            if seq.finished:  # ended while this step, launched ahead, was running: its token is void
                continue
            if self.record_logits:
                seq.logits = (seq.logits or []) + [launched.logits[row].detach().clone()]
            seq.first_token_at = seq.first_token_at or now
            seq.output_ids.append(token)
            if row in logprobs:
                chosen, top = logprobs[row]
                seq.output_logprobs.append(TokenLogprob(token, chosen, top[: seq.params.logprobs]))
            stop_token = token in seq.params.stop_token_ids  # ends the output; its text is not shown
            text = "" if stop_token else seq.detok.push(token)
            if (token == self.eos_id and not seq.params.ignore_eos) or stop_token or seq.detok.stopped:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
            if seq.finished:
                text += seq.detok.finish()
                self.scheduler.finish(seq)
                finished.append(seq)
            emitted.append((seq, text))
        return emitted, finished

    def _claim_external_ops(self) -> None:
        """The graph's external ops (experts offloaded or on other ranks, attention on the host)
        call the executors set for the calling thread: point them at this engine's before its
        step, so that several such engines in one process, stepping in turn or at once in their
        own threads, each run their own."""
        if self.host_attention is not None:
            set_attention_executor(self.host_attention)
        executor = self.expert_pager or self.expert_executor
        if executor is not None:
            set_expert_executor(executor)

    def _launch(self, plan: list[tuple[Sequence, int]], ahead_of: _Launched | None = None) -> _Launched | None:
        """Queue one step on the device: the model, then sampling, then the copy of the sampled
        ids to the host. `ahead_of`: a decode step whose ids are still on the device; each of its
        sequences feeds that id as its next token (the host does not know it yet)."""
        self._claim_external_ops()
        now = time.perf_counter()
        chunks, scored = [], []  # scored: (row, seq, positions) of prompt chunks whose prompt_logprobs are asked
        for seq, take in plan:
            seq.first_scheduled = seq.first_scheduled or now
            start = seq.num_cached
            if ahead_of is None:
                chunks.append((seq.blocks.blocks, seq.token_slice(start, start + take), start,
                               start + take == seq.num_tokens))
                if seq.params.prompt_logprobs is not None and (where := seq.prompt_positions_to_score(start, take)):
                    scored.append((len(chunks) - 1, seq, where))
            else:
                chunks.append((seq.blocks.blocks, [0], start, True))  # the token comes from the device
        if scored:  # prompt chunks whose prompt_logprobs are asked: their logits at every position too
            logits = self._step_scoring_prompts(chunks, scored)
        elif self.decode_graphs is not None and self.decode_graphs.fits(chunks):
            logits = self.decode_graphs.run(chunks, None if ahead_of is None else ahead_of.device_ids)
        elif self.micro_batches is not None and len(chunks) > 1:
            logits = self.micro_batches.run(chunks, self.kv_cache)
        else:
            inputs = build_step_inputs(chunks, device=self.device, block_size=self.spec.kv_block_size)
            logits = self.step_fn(
                inputs["input_ids"], inputs["positions"], inputs["seq_ids"], inputs["block_tables"],
                self.kv_cache, inputs["logits_indices"],
            )
        self.stats.steps += 1
        for seq, take in plan:
            seq.num_cached += take
        sampled = [seq for (seq, _), chunk in zip(plan, chunks) if chunk[3]]
        if not sampled:
            return None
        if self.record_logits:  # a step launched ahead would overwrite the graph's logits buffer
            logits = logits.clone()
        device_ids = self.sampler.sample(logits, [s.params for s in sampled], [s.generator for s in sampled],
                                         [s.output_ids for s in sampled], _DevicePrompts(sampled, logits.device))
        logprobs = None
        asked = [i for i, seq in enumerate(sampled) if seq.params.logprobs is not None]
        if asked:  # queued before a step launched ahead can overwrite a graph's logits buffer
            rows = torch.tensor(asked, device=logits.device)
            most = max(sampled[i].params.logprobs for i in asked)
            logprobs = (asked, *token_logprobs(logits[rows], device_ids[rows], most))
        decoding = ahead_of is not None or all(take == 1 and seq.output_ids for seq, take in plan)
        return _Launched(sampled, decoding, device_ids, *self._host_ids.send(device_ids),
                         logits if self.record_logits else None, logprobs)

    def _step_scoring_prompts(self, chunks: list[tuple], scored: list[tuple]) -> torch.Tensor:
        """Run the step with logits at the scored prompt positions as well as at each chunk's
        sampled last token (the compiled step takes any logits_indices), record each scored prompt
        token's log-probability and top ones in its sequence, and return the sampled rows' logits."""
        inputs = build_step_inputs(chunks, device=self.device, block_size=self.spec.kv_block_size,
                                   score={row: where for row, _, where in scored})
        logits = self.step_fn(inputs["input_ids"], inputs["positions"], inputs["seq_ids"], inputs["block_tables"],
                              self.kv_cache, inputs["logits_indices"])
        # the scored rows, in the order build_step_inputs put them: by chunk, then by position
        owners = [seq for _, seq, where in scored for _ in where]
        targets = [seq.prompt_ids[p + 1] for _, seq, where in scored for p in where]  # position p scores token p + 1
        score_rows = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        score_rows[inputs["sample_rows"]] = False
        most = max(seq.params.prompt_logprobs for seq in owners)
        scored_logits, target_ids = logits[score_rows], torch.tensor(targets, device=logits.device)
        chosen, top, top_ids = token_logprobs(scored_logits, target_ids, most)
        ranks = (scored_logits > scored_logits.gather(1, target_ids[:, None])).sum(-1) + 1
        chosen, top, top_ids, ranks = chosen.tolist(), top.tolist(), top_ids.tolist(), ranks.tolist()
        for j, seq in enumerate(owners):
            n = seq.params.prompt_logprobs
            seq.prompt_logprobs.append(TokenLogprob(targets[j], chosen[j], list(zip(top_ids[j][:n], top[j][:n])),
                                                    ranks[j]))
        return logits[inputs["sample_rows"]]

    def _launch_ahead(self, launched: _Launched) -> _Launched | None:
        """Launch the step after `launched` before its tokens reach the host, so the device runs
        it while the host detokenizes and bookkeeps (a decode step at batch 1 spends ~0.4 ms
        there). Only when that next step is certain to be the same batch decoding one more token:
        a decode step replayed as a CUDA graph, nothing waiting to be admitted, no sequence about
        to reach max_tokens, and a KV slot for every next token without preempting. A sequence
        that then stops on this step's token (EOS, a stop string) wastes one row of it."""
        running = self.scheduler.running
        if (self.decode_graphs is None or not self.overlap or not launched.decoding or self.scheduler.waiting
                or len(running) != len(launched.sampled) or not self.decode_graphs.fits_batch(len(running))):
            return None
        for seq, sampled in zip(running, launched.sampled):
            if seq is not sampled or seq.finished or len(seq.output_ids) + 2 > seq.params.max_tokens:
                return None
            # its penalties count the token still on its way to the host, and min_tokens counts it
            if seq.params.penalised or len(seq.output_ids) < seq.params.min_tokens:
                return None
        if not self.scheduler.reserve(running, 1):
            return None
        return self._launch([(seq, 1) for seq in running], ahead_of=launched)

    def _lockstep(self) -> None:
        """Step until no rank has work (see `lockstep_step`)."""
        while self.lockstep_step()[0]:
            pass

    def lockstep_step(self) -> tuple[bool, list[tuple[Sequence, str]]]:
        """One step of an expert-parallel group: (did any rank have work, what this rank emitted).
        Every rank calls it together; a rank without work runs a one-token step on the scratch
        block, so that every MoE layer's all-to-all finds every rank there."""
        if self._busy is None:
            on_device = dist.get_backend() == "nccl"  # NCCL reduces GPU tensors only
            self._busy = torch.zeros(1, dtype=torch.int64, device=self.device if on_device else "cpu")
        try:
            self._busy.fill_(int(self.scheduler.has_work()))
            dist.all_reduce(self._busy)
            if not self._busy.item():
                return False, []
            if self.scheduler.has_work():
                return True, self.step()[0]
            inputs = build_step_inputs([([self.scratch_block], [0], 0, True)], device=self.device,
                                       block_size=self.spec.kv_block_size)
            self.expert_executor.counting = False  # a placeholder token: not load
            try:
                self.step_fn(inputs["input_ids"], inputs["positions"], inputs["seq_ids"], inputs["block_tables"],
                             self.kv_cache, inputs["logits_indices"])
            finally:
                self.expert_executor.counting = True
            return True, []
        except (RuntimeError, dist.DistError) as e:  # a peer died or hung: say so, never hang
            raise group_failed(self.rank, self.world, e) from e

    def expert_load(self) -> dict | None:
        """Expert-parallel artifacts: tokens per expert and per rank for each MoE layer (every rank
        calls it together); None otherwise."""
        return self.expert_executor.expert_load() if self.expert_executor is not None else None

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now and free its KV blocks."""
        if not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    # --- batch API ----------------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]] | str, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 ignore_eos: bool = False, record_logits: bool = False, logprobs: int | None = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, repetition_penalty: float = 1.0, min_p: float = 0.0,
                 min_tokens: int = 0, stop_token_ids: list[int] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 prompt_logprobs: int | None = None) -> list[Completion]:
        """Complete every prompt; all of them run together as one batch. `logprobs`: each token's
        log-probability and the `logprobs` most likely, in `Completion.logprobs`; `prompt_logprobs`
        the same for every prompt token after the first, in `Completion.prompt_logprobs`. `on_text(i,
        piece)`: each piece of prompt i's text as it is decoded (the pieces join to its
        `Completion.text`; one process, not expert-parallel)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        if len(prompts) > self.spec.max_batch:
            raise RequestError(
                f"{len(prompts)} prompts exceed the compiled max_batch {self.spec.max_batch}; "
                "send fewer at once or recompile with a larger max_batch"
            )
        if self.scheduler.has_work():
            raise RuntimeError("generate() cannot run while the engine is serving other requests")
        if on_text is not None and self.world > 1:
            raise RuntimeError("generate(on_text=...) streams in one process; expert-parallel ranks do not")
        seqs, mine = [], []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=None if seed is None else seed + i, stop=list(stop or []),
                                    ignore_eos=ignore_eos, logprobs=logprobs, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty, logit_bias=dict(logit_bias or {}),
                                    repetition_penalty=repetition_penalty, min_p=min_p, min_tokens=min_tokens,
                                    stop_token_ids=list(stop_token_ids or []), prompt_logprobs=prompt_logprobs)
            seqs.append(self.new_sequence(prompt, params))
            if i % self.world == self.rank:  # expert-parallel: each rank decodes its share
                mine.append(seqs[-1])
        start = time.perf_counter()
        before = dataclasses.replace(self.stats)
        self.record_logits = record_logits
        try:
            for seq in mine:
                self.scheduler.add(seq)
            if self.world == 1:
                index = {id(seq): i for i, seq in enumerate(seqs)}
                while self.scheduler.has_work():
                    emitted, _ = self.step()
                    if on_text is not None:
                        for seq, text in emitted:
                            if text:
                                on_text(index[id(seq)], text)
            else:
                self._lockstep()
        finally:
            self.record_logits = False
            for seq in seqs:
                self.abort(seq)
        elapsed = time.perf_counter() - start
        results = [
            Completion(
                text=seq.detok.text, token_ids=list(seq.output_ids), prompt_tokens=len(seq.prompt_ids),
                finish_reason=seq.finish_reason, time_to_first_token_s=(seq.first_token_at or start) - start,
                logits=[t.cpu() for t in seq.logits] if seq.logits and self.world > 1 else seq.logits,
                logprobs=None if logprobs is None else list(seq.output_logprobs),
                prompt_logprobs=None if prompt_logprobs is None else list(seq.prompt_logprobs or [None]),
            )
            for seq in seqs
        ]
        if self.world > 1:  # every rank returns every completion, each from the rank that decoded it
            shares = [None] * self.world
            dist.all_gather_object(shares, [(i, r) for i, r in enumerate(results) if i % self.world == self.rank])
            for share in shares:
                for i, r in share:
                    results[i] = r
        decode = [self.stats.decode_steps - before.decode_steps, self.stats.decode_tokens - before.decode_tokens,
                  self.stats.decode_s - before.decode_s]
        if self.world > 1:  # the group's decode: every rank's tokens, over the slowest rank's steps
            tokens = torch.tensor([decode[1]], dtype=torch.int64, device=self._busy.device)
            longest = torch.tensor([decode[0], decode[2]], dtype=torch.float64, device=self._busy.device)
            dist.all_reduce(tokens)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
            decode = [int(longest[0]), int(tokens[0]), float(longest[1])]
        self.stats = GenerationStats(
            prompt_tokens=sum(r.prompt_tokens for r in results),
            generated_tokens=sum(len(r.token_ids) for r in results),
            steps=self.stats.steps - before.steps, elapsed_s=elapsed,
            time_to_first_token_s=max(r.time_to_first_token_s for r in results),
            decode_steps=decode[0], decode_tokens=decode[1], decode_s=decode[2],
        )
        return results


def _load_tokenizer(tok_dir: Path) -> tuple[Tokenizer, int | None, int | None]:
    tok_file = tok_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise ArtifactError(f"{tok_file}: cannot load the tokenizer ({str(e).splitlines()[0][:120]})") from None
    cfg_file = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

    def token_id(key: str) -> int | None:
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return tokenizer.token_to_id(tok) if tok else None

    bos = token_id("bos_token") if cfg.get("add_bos_token", True) else None
    return tokenizer, bos, token_id("eos_token")
