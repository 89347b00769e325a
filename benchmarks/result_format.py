"""Every benchmark's output in the one result format of moec.runtime.regression_gate.

New results (`cpu_gates.py`, `moe-runtime bench --json`) are written in it. The outputs the other
scripts write (cpu_tiny, serve, moe_layer, cuda_tiny_check, e2e_decode, gpu_op_check, offload) keep their own layout, the
record of everything a run saw; `load_result` converts them when read, so the gate and the report
see one format. The committed files in results/ are left as they were written.

    python benchmarks/result_format.py RESULT.json [-o CONVERTED.json]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script on a machine where moec is not installed
    sys.path.insert(0, str(ROOT))

from moec.runtime.regression_gate import (  # noqa: E402
    RESULT_FORMAT,
    GateError,
    check_result,
    device_kind,
    git_commit,
    metric,
    read_json,
    utc_now,
)

HF_EAGER = "transformers eager, same weights, same machine, same run"

# Which metrics of a converted output a new baseline gates, and how tightly (the first pattern a
# metric's name matches decides; unmatched metrics are recorded but not gated). GPU timings are
# CUDA-event medians with L2 flushed: CUDA-graph replays move a few percent between runs, eager
# (Python-launched) ones with the host CPU; ratios to a peer or roofline of the same run are steadier.
ADVISED_TOLERANCES = {
    "moe_layer": [
        ("copy_bandwidth", {"rel": 0.10}), ("matmul_rate", {"rel": 0.10}),
        ("*/moec_graph_ms", {"rel": 0.15}), ("*/moec_graph_over_roofline", {"rel": 0.15}),
        ("*/graph_speedup_vs_hf_compile_graph", {"rel": 0.20}),
        ("*/moec_ms", {"rel": 0.25}), ("*/moec_over_roofline", {"rel": 0.25}),
        ("*/speedup_vs_hf_eager", {"rel": 0.25}),
        ("*/max_abs_err_over_ref_max", {"abs": 0.01}),
    ],
    "cuda_tiny_check": [
        ("compile_s", {"rel": 0.5}), ("logits_rel_error_max", {"abs": 0.01}),
        ("greedy_16_identical_prompts", {"abs": 0}), ("tokens_per_s_batch3", {"rel": 0.30}),
    ],
    "e2e_decode": [
        ("compile_s", {"rel": 0.5}), ("load_to_first_token_s", {"rel": 0.5}),
        ("logits_rel_error_max", {"abs": 0.01}), ("greedy_16_identical_prompts", {"abs": 0}),
        # transformers eager at batch 1 is bound by its Python launches: 166 and 113 tokens/s in two
        # H200 runs of one day, so a ratio to it moves by a third on its own (moec's own batch-1
        # numbers, gated at 15%, catch moec's regressions)
        ("decode/B=1/speedup_vs_hf_*", {"rel": 0.5}),
        ("*/speedup_vs_hf_*", {"rel": 0.25}),
    ],
}


def advise_tolerances(result: dict) -> dict:
    """Attach ADVISED_TOLERANCES to the metrics of a converted result that carry none."""
    rules = ADVISED_TOLERANCES.get(result["benchmark"], [])
    for m in result["metrics"]:
        if "tolerance" not in m:
            tol = next((tol for pattern, tol in rules if fnmatch.fnmatchcase(m["name"], pattern)), None)
            if tol is not None:
                m["tolerance"] = tol
    return result


def new_result(benchmark: str, device_type: str, device: str, metrics: list[dict], versions: dict,
               **detail) -> dict:
    """A result of this run, dated now, at this checkout's commit."""
    return {"format": RESULT_FORMAT, "benchmark": benchmark, "date": utc_now(), "git_commit": git_commit(),
            "device": device, "device_kind": device_kind(device_type, device), "versions": versions,
            "metrics": metrics, **detail}


def _converted(doc: dict, device_type: str, device: str, commit: str | None, metrics: list[dict]) -> dict:
    out = {"format": RESULT_FORMAT, "benchmark": doc["benchmark"], "date": doc["date"], "git_commit": commit,
           "device": device, "device_kind": device_kind(device_type, device), "versions": doc.get("versions", {}),
           "metrics": metrics, "converted_from": f"the {doc['benchmark']} output layout"}
    model = doc.get("model")
    model = model.get("artifact") if isinstance(model, dict) else model
    if isinstance(model, str):  # what was measured: runs of different models are not one history
        out["model"] = model
    return out


def _converted_from_env(doc: dict, metrics: list[dict]) -> dict:
    """A result whose date, versions, device and commit sit in its "env" block (measure.environment)."""
    device = doc["env"]["device"]
    return _converted(doc | {"date": doc["env"]["date"], "versions": doc["env"].get("versions", {})},
                      device.get("kind", "cuda"), device.get("name"), doc["env"].get("commit"), metrics)


def _cpu_name(device: dict) -> str:
    return f"{device.get('processor', 'cpu')} ({device.get('cores')} cores)"


def from_cpu_tiny(doc: dict) -> dict:
    metrics = [dict(m) for m in doc["metrics"]]
    for row in doc["decode"]:
        tag = f"decode/B={row['batch']}/N={row['new_tokens_per_seq']}"
        metrics += [metric(f"{tag}/moec_tokens_per_s", row["moec_tokens_per_s"], "tokens/s", "higher",
                           peer=HF_EAGER, peer_value=row["hf_eager_tokens_per_s"]),
                    metric(f"{tag}/speedup_vs_hf_eager", row["speedup"], "x", "higher", peer=HF_EAGER)]
    return _converted(doc, "cpu", _cpu_name(doc["device"]), doc.get("git_commit"), metrics)


def from_serve(doc: dict) -> dict:
    baseline = doc.get("baseline") or {}  # None: run with --no-baseline
    peer = baseline.get("description")
    metrics = [{**m, "name": f"moec/{m['name']}"} for m in doc["moec"]["metrics"]]
    metrics += [{**m, "name": f"hf_static_batches/{m['name']}"} for m in baseline.get("metrics", [])]
    cmp = doc.get("comparison") or {}
    if "output_throughput_ratio" in cmp:
        metrics.append(metric("output_throughput_over_hf", cmp["output_throughput_ratio"], "x", "higher", peer=peer))
    if "ttft_p50_ratio" in cmp:
        metrics.append(metric("ttft_p50_hf_over_moec", cmp["ttft_p50_ratio"], "x", "higher", peer=peer))
    device = doc["device"]
    if device.get("kind") == "cuda":
        return _converted(doc, "cuda", device["name"], doc.get("git_commit"), metrics)
    return _converted(doc, "cpu", _cpu_name(device), doc.get("git_commit"), metrics)


def from_moe_layer(doc: dict) -> dict:
    """Its metrics already have this shape, except the roofline entries (direction "bound"): each
    becomes the `roofline` of the moec timings of its case."""
    bounds = {m["name"].rsplit("/", 1)[0]: m for m in doc["metrics"] if m["direction"] == "bound"}
    metrics = []
    for m in doc["metrics"]:
        if m["direction"] == "bound":
            continue
        case, _, last = m["name"].rpartition("/")
        if case in bounds and last in ("moec_ms", "moec_graph_ms"):
            m = {**m, "roofline": bounds[case]["value"], "roofline_how": bounds[case].get("how")}
        metrics.append(m)
    device = doc["device"]
    return _converted(doc, device["kind"], device["name"], doc.get("commit"), metrics)


def _check_metrics(doc: dict) -> list[dict]:
    """What cuda_tiny_check and e2e_decode check against transformers, as metrics."""
    prompts = doc["prompts"]
    return [
        metric("logits_rel_error_max", max(p["logits_rel_error"] for p in prompts), "ratio", "lower",
               peer="transformers eager, same weights, same GPU", threshold=2e-2),
        metric("greedy_16_identical_prompts", sum(bool(p["greedy_identical_16"]) for p in prompts), "prompts",
               "higher", of=len(prompts), peer="transformers eager greedy"),
        *([metric("fp32_error_over_hf_fp32_error_max",
                  max(p["moec_vs_hf_fp32"] / max(p["hf_vs_hf_fp32"], 1e-12) for p in prompts), "x", "lower",
                  peer="transformers eager in the checkpoint dtype, both measured against transformers fp32")]
          if all("moec_vs_hf_fp32" in p for p in prompts) else []),
    ]


def from_gpu_op_check(doc: dict) -> dict:
    """Each op row's error against its fp32 reference (eager and through Inductor)."""
    metrics = [metric("failed_rows", doc["failed"], "rows", "lower", of=len(doc["rows"]), threshold=0)]
    for row in doc["rows"]:
        if "rel_error" in row:
            how = "inductor" if row["compiled"] else "eager"
            metrics.append(metric(f"{row['op']}/{how}/{row['case']}/rel_error", row["rel_error"], "ratio", "lower",
                                  peer="the op's reference in fp32 on the same bf16 inputs",
                                  threshold=doc["tolerance"]))
    return _converted(doc, "cuda", doc["device"], doc.get("commit"), metrics)  # set by hand where recorded


def from_offload(doc: dict) -> dict:
    """Per batch: moec's decode rate against the host-link bound and the accelerate baseline."""
    metrics = [metric("compile_s", doc.get("compile_s"), "s", "lower")]
    for row in doc.get("rows", []):
        tag = f"decode/B={row['batch']}"
        metrics += [
            metric(f"{tag}/decode_tokens_per_s", row.get("moec"), "tokens/s", "higher", roofline=row.get("bound")),
            metric(f"{tag}/percent_of_link_bound", row.get("percent_of_bound"), "%", "higher",
                   peer="expert bytes streamed per step / measured host-to-device bandwidth"),
            metric(f"{tag}/speedup_vs_accelerate", row.get("speedup_vs_accelerate"), "x", "higher",
                   peer="transformers + accelerate device_map=auto, same GPU budget", peer_value=row.get("accelerate")),
            metric(f"{tag}/link_busy_fraction", row.get("link_busy_fraction"), "ratio", "higher"),
        ]
    metrics = [m for m in metrics if m["value"] is not None]
    return _converted(doc, "cpu" if doc["device"] == "cpu" else "cuda", doc["device"], doc.get("commit"), metrics)


def from_step_kernels(doc: dict) -> dict:
    """The fastest passing config per prefill size (and SDPA's time beside it), the compiled
    step's decode attention per batch, the built-in router per token count, the K/V write per
    token count (the torch path beside it), the experts at few tokens per path, the grouped
    GEMMs' rate per kernel form, the DIRECT GEMMs' bandwidth per tile, and every variant of
    the router's partials and of the align."""
    metrics = []
    for row in doc.get("prefill", []):
        ok = [c for c in row["configs"].values() if c.get("ok")]
        if ok:
            best = min(ok, key=lambda c: c["ms"])
            metrics.append(metric(f"prefill_attention/T={row['tokens']}/best_ms", best["ms"], "ms", "lower",
                                  roofline=row["bound_ms"], peer="torch SDPA flash, contiguous Q/K/V",
                                  peer_value=row["sdpa_flash_ms"], config=best["config"]))
    for row in doc.get("decode", []):
        cfg = row["configs"].get("dynamic (compiled step)")
        if cfg:
            metrics.append(metric(f"decode_attention/B={row['batch']}/us", cfg["us"], "us", "lower",
                                  roofline=row["bound_us"]))
    for row in doc.get("router", []):
        built = next((v for k, v in row["variants"].items() if k.endswith("(built in)") or k == "as built"), None)
        if built:
            shape = row.get("shape", "mixtral")  # rows before the Qwen3 shape was added are Mixtral's
            name = f"router/T={row['tokens']}/us" if shape == "mixtral" else f"router/{shape}/T={row['tokens']}/us"
            metrics.append(metric(name, built["us"], "us", "lower", roofline=row["bound_us"]))
    for row in doc.get("router_wide", []):  # the split path's partials by tokens a program
        for name, v in row["variants"].items():
            if "us" in v:
                metrics.append(metric(f"router_wide/{row['shape']}/T={row['tokens']}/{name.replace(' ', '_')}_us",
                                      v["us"], "us", "lower", roofline=row["bound_us"]))
    for row in doc.get("align", []):  # the histograms and a scatter by chunk, warps, scan width
        for name, v in row["variants"].items():
            if v.get("same_as_built_in"):
                metrics.append(metric(f"align/{row['shape']}/T={row['tokens']}/{name.replace(' ', '_')}_us",
                                      v["us"], "us", "lower", roofline=row["bound_us"]))
    for row in doc.get("kv_write", []):
        built = row["paths"].get("triton (built in)")
        if built:
            metrics.append(metric(f"kv_write/T={row['tokens']}/us", built["us"], "us", "lower", roofline=row["bound_us"],
                                  peer="torch index_copy_", peer_value=row["paths"]["torch index_copy_"]["us"]))
    for row in doc.get("direct", []):
        for name, path in row["paths"].items():
            if path.get("ok"):
                tag = "aligned" if name == "aligned (built in)" else name.replace(" ", "_")
                metrics.append(metric(f"experts_few_tokens/{row['shape']}/T={row['tokens']}/{tag}_us",
                                      path.get("us_interleaved", path["us"]), "us", "lower", roofline=row["bound_us"]))
    for row in [*doc.get("gemm", []), *doc.get("middle", []), *doc.get("tma", [])]:  # failed checks left out
        for name, kernel in row["kernels"].items():
            if kernel.get("ok") is not False and "tflop_s" in kernel:
                metrics.append(metric(f"grouped_gemm/{row['shape']}/T={row['tokens']}/{name.replace(' ', '_')}_tflop_s",
                                      kernel["tflop_s"], "TFLOP/s", "higher"))
    for row in doc.get("gemv", []):  # DIRECT GEMMs alone at few tokens: bandwidth of the hit experts
        for name, kernel in row["kernels"].items():
            if kernel.get("ok") and "gb_s" in kernel:
                metrics.append(metric(f"direct_gemm/{row['shape']}/T={row['tokens']}/{name.replace(' ', '_')}_gb_s",
                                      kernel["gb_s"], "GB/s", "higher"))
    return _converted_from_env(doc, metrics)


def from_grouped_mm_path(doc: dict) -> dict:
    """Each formulation's time per shape, token count and shape mode (T symbolic or static),
    launched directly and, where timed (`--graph`), as a CUDA-graph replay, alone and interleaved."""
    metrics = [metric(f"{c['shape']}/T={c['tokens']}/{c['variant']}{'' if c['dynamic'] else '_static'}{suffix}_ms",
                      c[key]["median_ms"], "ms", "lower", max_rel_err=c.get("max_rel_err"))
               for c in doc.get("cases", []) for key, suffix in (("timing", ""), ("timing_graph", "_replayed"))
               if key in c]
    metrics += [metric(f"{row['shape']}/T={row['tokens']}/{variant}_replayed_interleaved_ms", t["median_ms"], "ms",
                       "lower", how="CUDA-graph replays of every variant timed round by round, order rotated")
                for row in doc.get("interleaved", []) for variant, t in row["timing_graph"].items()]
    device = doc["env"]["device"]
    return _converted(doc | {"versions": doc["env"].get("versions", {})}, device.get("kind", "cuda"),
                      device.get("name"), doc.get("commit") or doc["env"].get("commit"), metrics)


def from_gemm_profile(doc: dict) -> dict:
    """Each profiled kernel's duration, DRAM bytes and L2 hit rate under ncu (one launch each)."""
    wanted = {"gpu__time_duration.sum": ("us", 1e-3, "lower"), "dram__bytes_read.sum": ("dram_read_bytes", 1, "lower"),
              "lts__t_sector_hit_rate.pct": ("l2_hit_pct", 1, "higher")}
    metrics = []  # gemm_profile stores times in ns and sizes in bytes
    for k in doc["kernels"]:
        for name, (tag, scale, direction) in wanted.items():
            m = k["metrics"].get(name)
            if m is not None:
                metrics.append(metric(f"{k['label'].replace(' ', '_')}/{tag}", m * scale,
                                      "us" if tag == "us" else "bytes" if "bytes" in tag else "%", direction))
    return _converted_from_env(doc, metrics)


def from_cuda_tiny_check(doc: dict) -> dict:
    prompts = [{"logits_rel_error": e, "greedy_identical_16": g}
               for e, g in zip(doc["logits_rel_error"], doc["greedy_16_identical"])]
    metrics = [metric("compile_s", doc["compile_s"], "s", "lower"), *_check_metrics({"prompts": prompts}),
               metric("tokens_per_s_batch3", doc["tokens_per_s_batch3"], "tokens/s", "higher",
                      how="engine.generate of 3 prompts x 64 tokens, second run")]
    return _converted(doc, "cuda", doc["device"], doc.get("commit"), metrics)  # set by hand where recorded


def from_e2e_decode(doc: dict) -> dict:
    """moec's own numbers are its `moe-runtime bench` metrics; the peers become speed-ups per batch."""
    device = doc["device"]
    moec = doc.get("moec") or {}
    metrics = [metric("compile_s", doc.get("compile_s"), "s", "lower")]
    if moec:
        if "metrics" not in moec:  # a bench from before the common format
            from moec.runtime.bench import bench_metrics

            moec = {**moec, "metrics": bench_metrics(moec)}
        metrics += [{**m, "name": f"moec/{m['name']}"} for m in moec["metrics"]]
    check = doc.get("check") or {}
    if check.get("prompts"):
        metrics += [metric("load_to_first_token_s", check.get("load_to_first_token_s"), "s", "lower"),
                    *_check_metrics(check)]
    ours = {r["batch"]: r for r in moec.get("decode", [])}
    for key, what in (("hf_eager", "transformers eager"), ("hf_compile", "transformers grouped_mm + torch.compile "
                                                                          "(static cache, reduce-overhead)")):
        peer = doc.get(key) or {}
        for row in peer.get("decode", []):
            mine = ours.get(row["batch"])
            if mine and mine.get("decode_tokens_per_s") and row.get("decode_tokens_per_s"):
                metrics.append(metric(f"decode/B={row['batch']}/speedup_vs_{key}",
                                      mine["decode_tokens_per_s"] / row["decode_tokens_per_s"], "x", "higher",
                                      peer=what, peer_value=row["decode_tokens_per_s"], peer_unit="tokens/s"))
        mine, theirs = moec.get("prefill") or {}, peer.get("prefill") or {}
        if mine.get("prompt_tokens_per_s") and theirs.get("prompt_tokens_per_s"):
            metrics.append(metric(f"prefill/speedup_vs_{key}",
                                  mine["prompt_tokens_per_s"] / theirs["prompt_tokens_per_s"], "x", "higher",
                                  peer=what, peer_value=theirs["prompt_tokens_per_s"], peer_unit="tokens/s"))
    metrics = [m for m in metrics if m["value"] is not None]
    commit = doc.get("commit") or moec.get("git_commit")  # gpu_gate.sh records the commit it ran
    return _converted(doc, "cpu" if device == "cpu" else "cuda", device, commit, metrics)


def from_bench(doc: dict) -> dict:
    """`moe-runtime bench` output written before it carried the common fields."""
    from moec.runtime.bench import bench_metrics

    device = doc["device"]
    return {**doc, **_converted(doc, device["type"], device["name"], doc.get("git_commit"), bench_metrics(doc)),
            "device": device}


CONVERTERS = {"cpu_tiny": from_cpu_tiny, "serve": from_serve, "moe_layer": from_moe_layer,
              "cuda_tiny_check": from_cuda_tiny_check, "e2e_decode": from_e2e_decode, "gpu_op_check": from_gpu_op_check,
              "offload": from_offload, "step_kernels": from_step_kernels, "grouped_mm_path": from_grouped_mm_path,
              "gemm_profile": from_gemm_profile,
              "moe-runtime bench": from_bench}


def to_result(doc: dict, source: str = "result") -> dict:
    """`doc` in the common format: as it is when it already is, else converted by its benchmark."""
    if doc.get("format") != RESULT_FORMAT:
        convert = CONVERTERS.get(doc.get("benchmark"))
        if convert is None:
            raise GateError(f"{source}: benchmark {doc.get('benchmark')!r} is neither in the common format nor "
                            f"one this converter knows ({', '.join(CONVERTERS)})")
        try:
            doc = advise_tolerances(convert(doc))
        except (KeyError, TypeError, ValueError) as e:
            raise GateError(f"{source}: cannot convert this {doc.get('benchmark')} output "
                            f"({type(e).__name__}: {e})") from None
    check_result(doc, source)
    return doc


def load_result(path: Path) -> dict:
    return to_result(read_json(Path(path), "result"), str(path))


def versions(*modules: str) -> dict:
    """Versions of the named modules (None where absent) and of Python."""
    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as None
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    from moec.errors import run_cli

    parser = argparse.ArgumentParser(description="Convert a benchmark output to the common result format.")
    parser.add_argument("result")
    parser.add_argument("-o", "--output", help="write here (default: print)")
    args = parser.parse_args(argv)

    def body() -> int:
        text = json.dumps(load_result(Path(args.result)), indent=1) + "\n"
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        return 0

    return run_cli(body, debug=False)


if __name__ == "__main__":
    sys.exit(main())
