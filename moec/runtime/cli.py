"""`moe-runtime`: run a compiled artifact: `generate`, `serve`, `inspect`, `bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NoReturn

from moec.errors import run_cli


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def _model_name(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name: give one word, no spaces")
    return text


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID=BIAS (e.g. 13=-100)") from None


def _print_logprobs(tokenizer, completion) -> None:
    """One line per generated token: its text, its log-probability, and the most likely tokens'."""
    def piece(token: int) -> str:
        return json.dumps(tokenizer.decode([token]))  # quoted: spaces and newlines show

    for entry in completion.logprobs:
        top = "  ".join(f"{piece(t)} {lp:.3f}" for t, lp in entry.top)
        print(f"  {piece(entry.token):>16} {entry.logprob:9.4f}" + (f"   top: {top}" if top else ""))


def _generate(args) -> int:
    from moec.artifact import open_artifact

    start = time.perf_counter()
    artifact = open_artifact(args.artifact, verify=not args.no_verify)  # a bad artifact fails before torch loads
    from moec.runtime.engine import Engine

    engine = Engine.load(artifact, cuda_graphs=not args.no_cuda_graphs, ep_chunks=args.ep_chunks,
                         overlap=not args.no_overlap)
    load_s = time.perf_counter() - start
    # one prompt in one process: its text is printed as it is decoded; a batch when it is done
    stream = len(args.prompt) == 1 and engine.world == 1
    if stream:
        print(args.prompt[0], end="", flush=True)
    results = engine.generate(
        args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, logprobs=args.logprobs,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        logit_bias=dict(args.logit_bias), repetition_penalty=args.repetition_penalty, min_p=args.min_p,
        min_tokens=args.min_tokens, stop_token_ids=args.stop_token_id,
        on_text=(lambda _, piece: print(piece, end="", flush=True)) if stream else None,
    )
    if engine.rank != 0:  # expert-parallel: rank 0 speaks for the group
        return 0
    for prompt, result in zip(args.prompt, results):
        print("" if stream else f"{prompt}{result.text}")
        if result.logprobs is not None:
            _print_logprobs(engine.tokenizer, result)
        if len(args.prompt) > 1:
            print("---")
    s = engine.stats
    print(
        f"[{s.generated_tokens} tokens from {len(results)} prompt(s) in {s.elapsed_s:.3f}s: "
        f"{s.tokens_per_s:.1f} tokens/s, time to first token {s.time_to_first_token_s * 1000:.1f} ms, "
        f"load {load_s:.2f}s]",
        file=sys.stderr,
    )
    return 0


def _inspect(args) -> int:
    from moec.artifact import open_artifact, read_manifest, render_summary, summary_dict

    if args.no_verify:
        manifest = read_manifest(args.artifact)
    else:
        manifest = open_artifact(args.artifact, verify=True).manifest
    print(json.dumps(summary_dict(manifest), indent=2) if args.json else render_summary(manifest))
    return 0


def _serve(args) -> int:
    from moec.runtime.server import serve

    return serve(args.artifact, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
                 request_timeout_s=args.request_timeout, verify=not args.no_verify,
                 shutdown_timeout_s=args.shutdown_timeout, cuda_graphs=not args.no_cuda_graphs,
                 ep_chunks=args.ep_chunks, overlap=not args.no_overlap, model_name=args.served_model_name)


def _bench(args) -> int:
    from moec.runtime.bench import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-runtime", description="Run a compiled moec artifact.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the text")
    gen.add_argument("artifact")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--logprobs", type=int, metavar="N",
                     help="print each token's log-probability and the N (0-20) most likely tokens'")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, as OpenAI's")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, as OpenAI's")
    gen.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="TOKEN_ID=BIAS",
                     help="add BIAS (-100..100) to a token's logit; repeatable")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (vLLM's)")
    gen.add_argument("--min-p", type=float, default=0.0, help="0..1 (vLLM's)")
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS, stop token or stop string before this many tokens")
    gen.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                     help="a token id that ends the output; repeatable")
    gen.set_defaults(func=_generate)

    ins = sub.add_parser("inspect", help="summarise an artifact")
    ins.add_argument("artifact")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=_inspect)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    srv.add_argument("artifact")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("MOEC_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $MOEC_API_KEY; /health and /metrics stay open)")
    srv.add_argument("--served-model-name", type=_model_name, metavar="NAME",
                     help="the model id clients send and /v1/models lists (default: the artifact's name), as vLLM's")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 Too Many Requests")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request, queue time included")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds to let running requests finish before cancelling them")
    srv.set_defaults(func=_serve)

    # Numbers are checked by moec.runtime.bench, not argparse, so a bad one is a one-line error.
    bench = sub.add_parser("bench", help="prefill and decode speed, against the model's roofline")
    bench.add_argument("artifact")
    bench.add_argument("--batch-sizes", default="1,8,32,128",
                       help="decode batch sizes, comma-separated; those above the compiled max_batch are skipped")
    bench.add_argument("--context", default="512", help="prompt tokens of each decoding sequence")
    bench.add_argument("--decode-tokens", default="64", help="tokens generated per sequence (>= 2)")
    bench.add_argument("--prefill-tokens", default="4096",
                       help="prompt length of the prefill measurement (clamped to what one step can take)")
    bench.add_argument("--repeats", default="3", help="timed runs per measurement (the median is reported)")
    bench.add_argument("--copy-bandwidth", help="copy bandwidth in GB/s (read + write), instead of measuring it")
    bench.add_argument("--matmul-tflops", help="matmul rate in TFLOP/s, instead of measuring it")
    bench.add_argument("--json", metavar="PATH", help="write every number here")
    bench.add_argument("--profile", metavar="DIR",
                       help="also profile 3 decode steps per batch size: kernels by time, busy share per stream, "
                            "a trace (Perfetto) and a timeline PNG per batch under DIR")
    bench.add_argument("--compare", metavar="BASELINE",
                       help="compare with this baseline (benchmarks/baselines/*.json); exit 1 on a regression "
                            "or an unexplained improvement beyond a metric's tolerance")
    bench.add_argument("--update", action="store_true", help="with --compare: write this run's values into BASELINE")
    bench.set_defaults(func=_bench)

    for p in (gen, ins, srv, bench):
        p.add_argument("--no-verify", action="store_true", help="skip sha256 checks (large, trusted artifacts)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    for p in (gen, srv, bench):
        p.add_argument("--no-cuda-graphs", action="store_true",
                       help="on a GPU, run decode steps without CUDA graphs (slower; for debugging)")
        p.add_argument("--no-overlap", action="store_true",
                       help="on a GPU, wait for each decode step's tokens before launching the next "
                            "(slower; for debugging and A/B timing)")
    for p in (gen, srv, bench):
        p.add_argument("--nproc", type=int, default=1,
                       help="ranks to start here for an expert-parallel artifact (or launch with torchrun)")
        p.add_argument("--ep-chunks", type=_positive_int, default=None, metavar="N",
                       help="expert-parallel artifacts: token chunks per MoE layer, each chunk's all-to-all "
                            "overlapping another's experts (default: the compiled choice; 1 = no overlap)")
    args = parser.parse_args(argv)

    def body() -> int:
        # moec.runtime.launch imports torch.distributed: only where there are ranks (one process
        # checks its artifact first, so a wrong path fails in a fraction of a second)
        if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
            from moec.runtime.launch import run_ranks

            return run_ranks(args.nproc, list(sys.argv[1:] if argv is None else argv))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from moec.runtime.launch import join_group_from_env

            join_group_from_env()
        return args.func(args)

    return run_cli(body, args.debug)


def run() -> NoReturn:
    """The `moe-runtime` process: main(), then its exit code. A rank of an expert-parallel group
    ends through `launch.exit_rank` (no interpreter teardown to abort in)."""
    code = main()
    launch = sys.modules.get("moec.runtime.launch")  # imported only where there are ranks
    if launch is not None and launch.in_group():
        launch.exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
