"""The engine: an artifact's compiled step, its paged KV cache, and the loop that feeds them.

Every step flattens the work of all running sequences into one call: prompt chunks (prefill)
and one token per decoding sequence, bounded by the artifact's `max_tokens_per_step`. The
Python API and `moe-runtime generate` use it the same way:

    Engine.load("artifacts/tiny-mixtral").generate(["Hello", "Once upon"], max_tokens=32)
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moec.artifact import Artifact, open_artifact
from moec.errors import ArtifactError, RequestError
from moec.runtime.compiled_step import CompiledStep
from moec.runtime.detokenizer import IncrementalDetokenizer
from moec.runtime.kv_cache import BlockAllocator, SequenceBlocks, allocate_kv_cache, build_step_inputs
from moec.runtime.sampler import Sampler, SamplingParams, make_generator


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    time_to_first_token_s: float
    logits: list[torch.Tensor] | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    logits: list[torch.Tensor] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def pending(self) -> list[int]:
        """Tokens to feed next: the uncached rest of the prompt, or the last generated token."""
        return self.tokens[self.num_cached:]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    elapsed_s: float = 0.0
    time_to_first_token_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0


class Engine:
    def __init__(self, artifact: Artifact, num_blocks: int | None = None):
        self.artifact = artifact
        spec = self.spec = artifact.manifest.step
        self.device = torch.device(artifact.manifest.device)
        self.step_fn = CompiledStep(artifact)
        self.tokenizer, self.bos_id, self.eos_id = _load_tokenizer(artifact.tokenizer_path)
        blocks_per_seq = -(-spec.max_seq_len // spec.kv_block_size)
        self.num_blocks = num_blocks or spec.max_batch * blocks_per_seq
        self.allocator = BlockAllocator(self.num_blocks)
        self.kv_cache = allocate_kv_cache(
            spec.num_layers, self.num_blocks, spec.kv_block_size, spec.num_kv_heads, spec.head_dim,
            getattr(torch, spec.kv_dtype), self.device,
        )
        self.sampler = Sampler()
        self.stats = GenerationStats()

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, num_blocks: int | None = None) -> Engine:
        return cls(open_artifact(path, verify=verify), num_blocks=num_blocks)

    # --- requests -------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def new_sequence(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
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
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise RequestError(f"prompt token ids must lie in [0, {self.spec.vocab_size})")
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        return Sequence(ids, params, detok, generator)

    # --- the loop -------------------------------------------------------------------------

    def step(self, running: list[Sequence], record_logits: bool = False) -> list[Sequence]:
        """Run one step over `running`; return the sequences that finished in it."""
        budget = self.spec.max_tokens_per_step
        chunks, scheduled = [], []
        for seq in running:
            todo = seq.pending()
            take = min(len(todo), budget)
            if take == 0:
                break
            seq.blocks.ensure_capacity(self.allocator, seq.num_cached + take, self.spec.kv_block_size)
            wants_logits = seq.num_cached + take == len(seq.tokens)
            chunks.append((seq.blocks.blocks, todo[:take], seq.num_cached, wants_logits))
            scheduled.append((seq, take, wants_logits))
            budget -= take
        inputs = build_step_inputs(chunks, device=self.device)
        logits = self.step_fn(
            inputs["input_ids"], inputs["positions"], inputs["seq_ids"], inputs["block_tables"],
            self.kv_cache, inputs["logits_indices"],
        )
        self.stats.steps += 1
        sampling = [(seq, take) for seq, take, wants in scheduled if wants]
        for seq, take, _ in scheduled:
            seq.num_cached += take
        if not sampling:
            return []
        seqs = [s for s, _ in sampling]
        next_ids = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        finished, now = [], time.perf_counter()
        for row, (seq, token) in enumerate(zip(seqs, next_ids)):
            if record_logits:
                seq.logits = (seq.logits or []) + [logits[row].detach().clone()]
            seq.first_token_at = seq.first_token_at or now
            seq.output_ids.append(token)
            seq.detok.push(token)
            if token == self.eos_id and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            elif seq.detok.stopped:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                self.release(seq)
                finished.append(seq)
        return finished

    def release(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks.blocks)
        seq.blocks.blocks = []

    def generate(self, prompts: list[str | list[int]] | str, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 ignore_eos: bool = False, record_logits: bool = False) -> list[Completion]:
        """Complete every prompt; all of them run together as one batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        if len(prompts) > self.spec.max_batch:
            raise RequestError(
                f"{len(prompts)} prompts exceed the compiled max_batch {self.spec.max_batch}; "
                "send fewer at once or recompile with a larger max_batch"
            )
        seqs = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=None if seed is None else seed + i, stop=list(stop or []),
                                    ignore_eos=ignore_eos)
            seqs.append(self.new_sequence(prompt, params))
        start = time.perf_counter()
        running = deque(seqs)
        while running:
            for seq in self.step(list(running), record_logits=record_logits):
                running.remove(seq)
        elapsed = time.perf_counter() - start
        results = []
        for seq in seqs:
            seq.detok.finish()
            results.append(Completion(
                text=seq.detok.text, token_ids=list(seq.output_ids), prompt_tokens=len(seq.prompt_ids),
                finish_reason=seq.finish_reason or "length",
                time_to_first_token_s=(seq.first_token_at or start) - start, logits=seq.logits,
            ))
        self.stats = GenerationStats(
            prompt_tokens=sum(r.prompt_tokens for r in results),
            generated_tokens=sum(len(r.token_ids) for r in results),
            steps=self.stats.steps, elapsed_s=elapsed,
            time_to_first_token_s=max(r.time_to_first_token_s for r in results),
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
