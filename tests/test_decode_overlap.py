"""Decode steps launched ahead (`Engine._launch_ahead`): the next step runs, fed by the last
step's tokens still on the device, while the host handles that last step. On CPU the padded
decode path (what CUDA graphs replay) runs the same logic synchronously; these tests check that
launching ahead never changes what is generated, however sequences end around it.
"""

from __future__ import annotations

from moec.runtime import Engine
from moec.runtime.sampler import SamplingParams
from test_decode_graphs import with_padded_decode

PROMPTS = ["The mixture of experts", "Rain", "Once upon a time, in a kitchen far away, a baker", "A"]


def overlapped(tiny_artifact, overlap: bool = True, **load) -> tuple[Engine, list[int]]:
    """An engine on the padded decode path, and a list that counts its steps launched ahead."""
    engine = with_padded_decode(Engine.load(tiny_artifact, **load))
    engine.overlap = overlap
    ahead = []
    run = engine.decode_graphs.run
    engine.decode_graphs.run = lambda chunks, device_tokens=None: (
        ahead.append(len(chunks)) if device_tokens is not None else None) or run(chunks, device_tokens)
    return engine, ahead


def drive(engine: Engine, requests: list[tuple[str, SamplingParams]]) -> list:
    seqs = [engine.new_sequence(prompt, params) for prompt, params in requests]
    for seq in seqs:
        engine.scheduler.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    assert engine.allocator.num_used == 0
    return [(seq.output_ids, seq.finish_reason, seq.detok.text) for seq in seqs]


def test_launched_ahead_equals_step_by_step(tiny_artifact):
    """Different max_tokens, a stop string and an EOS met mid-run: the same tokens, texts and
    finish reasons as without launching ahead, and most decode steps were launched ahead."""
    plain, _ = overlapped(tiny_artifact, overlap=False)
    free = drive(plain, [(p, SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS])
    stop = free[1][2][5:8]  # text sequence 1 produces after a few tokens
    eos = free[2][0][6]  # a token sequence 2 produces at its 7th step: made the EOS below
    requests = [
        (PROMPTS[0], SamplingParams(max_tokens=3, temperature=0)),
        (PROMPTS[1], SamplingParams(max_tokens=20, temperature=0, stop=[stop])),
        (PROMPTS[2], SamplingParams(max_tokens=20, temperature=0)),
        (PROMPTS[3], SamplingParams(max_tokens=17, temperature=0, ignore_eos=True)),
    ]
    results = []
    for overlap in (False, True):
        engine, ahead = overlapped(tiny_artifact, overlap)
        engine.eos_id = eos
        results.append(drive(engine, requests))
        assert bool(ahead) == overlap
    want, got = results
    assert got == want
    assert [r[1] for r in got] == ["length", "stop", "stop", "length"]
    assert len(got[2][0]) <= 7 and got[2][0][-1] == eos
    assert len(ahead) >= 10, ahead


def test_sampled_requests_with_seeds_are_unchanged(tiny_artifact):
    """Seeded sampling draws from each request's own generator in the same order either way."""
    requests = [(p, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=7 + i)) for i, p in enumerate(PROMPTS)]
    plain, _ = overlapped(tiny_artifact, overlap=False)
    engine, ahead = overlapped(tiny_artifact)
    assert drive(engine, requests) == drive(plain, requests) and ahead


def test_logprobs_and_penalties_with_steps_launched_ahead(tiny_artifact):
    """Log-probabilities read from a step's logits before the step launched ahead reuses them:
    the same either way. A penalised request needs its last token on the host, so its batch is
    not launched ahead; its tokens are those of step-by-step decoding."""
    def run(requests, overlap):
        engine, ahead = overlapped(tiny_artifact, overlap)
        seqs = [engine.new_sequence(p, params) for p, params in requests]
        for seq in seqs:
            engine.scheduler.add(seq)
        while engine.scheduler.has_work():
            engine.step()
        return [(s.output_ids, [(lp.token, round(lp.logprob, 5), [t for t, _ in lp.top]) for lp in s.output_logprobs])
                for s in seqs], ahead

    asking = [(p, SamplingParams(max_tokens=12, temperature=0, logprobs=2)) for p in PROMPTS]
    (want, _), (got, ahead) = run(asking, False), run(asking, True)
    assert got == want and ahead and all(len(lps) == len(ids) for ids, lps in got)
    penalised = [(p, SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.5, logit_bias={5: 1.0}))
                 for p in PROMPTS]
    (want, _), (got, ahead) = run(penalised, False), run(penalised, True)
    assert got == want and not ahead
    repeated = [(p, SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.5)) for p in PROMPTS]
    (want, _), (got, ahead) = run(repeated, False), run(repeated, True)
    assert got == want and not ahead
    # min_tokens counts the token on its way to the host: no step launched ahead until it is reached
    plain, _ = run([(p, SamplingParams(max_tokens=12, temperature=0)) for p in PROMPTS], False)
    held = [(p, SamplingParams(max_tokens=12, temperature=0, min_tokens=6, stop_token_ids=ids[:3]))
            for p, (ids, _) in zip(PROMPTS, plain)]
    (want, _), (got, ahead) = run(held, False), run(held, True)
    assert got == want and [ids[:1] for ids, _ in got] != [ids[:1] for ids, _ in plain]
    assert all(len(ids) >= 6 for ids, _ in got) and ahead  # launched ahead once min_tokens is reached


def test_abort_and_arrival_while_a_step_runs_ahead(tiny_artifact):
    """A request aborted while a step launched ahead is running gets no token from it and frees
    its blocks; a request that arrives then is admitted at the next step and decodes exactly as
    it would alone."""
    alone = Engine.load(tiny_artifact).generate([PROMPTS[2]], max_tokens=10)[0].token_ids
    engine, ahead = overlapped(tiny_artifact)
    first, second = (engine.new_sequence(p, SamplingParams(max_tokens=30, temperature=0)) for p in PROMPTS[:2])
    engine.scheduler.add(first)
    engine.scheduler.add(second)
    while engine._ahead is None:
        engine.step()
    tokens_at_abort = len(second.output_ids)
    engine.abort(second)
    late = engine.new_sequence(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0))
    engine.scheduler.add(late)
    emitted, _ = engine.step()  # collects the step launched ahead: nothing for the aborted one
    assert second not in [seq for seq, _ in emitted] and len(second.output_ids) == tokens_at_abort
    assert engine._ahead is None  # a request is waiting: the next step must admit it
    while engine.scheduler.has_work():
        engine.step()
    assert late.output_ids == alone and len(first.output_ids) == 30
    assert engine.allocator.num_used == 0 and ahead


def test_no_overlap_flag_reaches_the_engine(tiny_artifact, monkeypatch):
    """`--no-overlap` on generate/serve/bench turns launching ahead off (for debugging, A/B timing)."""
    from moec.runtime import cli

    seen = {}
    real = Engine.load

    def load(*args, **kwargs):
        engine = real(*args, **kwargs)
        seen["overlap"] = engine.overlap
        return engine

    monkeypatch.setattr(Engine, "load", load)
    for flags, want in (([], True), (["--no-overlap"], False)):
        assert cli.main(["generate", str(tiny_artifact), "--prompt", "Rain", "--max-tokens", "2", *flags]) == 0
        assert seen.pop("overlap") is want


def test_server_loop_streams_with_steps_launched_ahead(tiny_artifact):
    """The server's engine thread over an engine that launches ahead: concurrent streams give
    the texts `generate` gives alone, one aborted mid-stream ends as "abort", blocks all free."""
    import asyncio

    from moec.runtime.engine_loop import EngineLoop

    plain = Engine.load(tiny_artifact)
    want = [plain.generate([p], max_tokens=12)[0].text for p in PROMPTS]
    engine, ahead = overlapped(tiny_artifact)
    loop = EngineLoop(engine)
    loop.start()

    async def collect(stream, abort_after=None):
        text, seen, event = "", 0, None
        async for event in stream:
            text, seen = text + event.text, seen + 1
            if seen == abort_after:
                stream.abort()
        return text, event.finish_reason

    async def run():
        streams = [loop.submit(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0)) for i, p in enumerate(PROMPTS)]
        victim = loop.submit("victim", PROMPTS[0], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        done = await asyncio.gather(*(collect(s) for s in streams), collect(victim, abort_after=4))
        await loop.shutdown()
        return done

    done = asyncio.run(run())
    assert [text for text, _ in done[:-1]] == want
    assert done[-1][1] == "abort" and ahead
    assert engine.allocator.num_used == 0


def test_a_small_cache_preempts_and_recomputes_with_steps_launched_ahead(tiny_artifact):
    """Four sequences in 6 blocks: a step launched ahead never preempts (it is skipped when a
    block is missing); the scheduler's preemptions and recomputation give the same tokens."""
    want = [r.token_ids for r in Engine.load(tiny_artifact).generate(PROMPTS, max_tokens=30, ignore_eos=True)]
    small, ahead = overlapped(tiny_artifact, num_blocks=6)
    got = [r.token_ids for r in small.generate(PROMPTS, max_tokens=30, ignore_eos=True)]
    assert small.scheduler.num_preemptions > 0 and ahead
    assert got == want
    assert small.allocator.num_used == 0
