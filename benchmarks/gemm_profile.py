"""Hardware counters of the grouped GEMMs where the MoE layer is compute-bound: why the down GEMM
trails CUTLASS (issue 3).

    python benchmarks/gemm_profile.py --out $OUT        # GPU with Nsight Compute (ncu), ~2 min

Runs itself under `ncu` (clocks left alone: --clock-control none) and profiles one launch of
each kernel below, at Mixtral-8x7B's and Qwen3-30B-A3B's expert shapes (bf16) and the token
counts where the layer is furthest from its roofline, after a warm-up outside the profiled
range (Triton compiles there), with fresh random inputs:

  gate_up              the default table's gate/up for T
  down                 the default table's down (atomic adds into the token-order output)
  down stored          the same with K = 1: each row stored, not added (what the adds cost)
  down 128x128 s3      the down on a 128x128 tile, 3 stages: two programs fit on an SM
  gate_up CUTLASS      torch._grouped_mm on x already in expert order, and down CUTLASS on h

Per kernel: duration, DRAM bytes read and written, L2 and L1 hit rates, SM and memory
throughput against peak, tensor-pipe activity, registers and occupancy, and the warp stall
reasons (average warps stalled per issued instruction). Writes OUT/gemm_profile.json and the raw
ncu CSV, prints a table. GPU only: exits 2 without CUDA or without ncu.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from measure import environment, write_json  # noqa: E402
from step_kernels import DIRECT_SHAPES as SHAPES, DTYPE, expert_weights, routed_tokens  # noqa: E402

CASES = [("mixtral", 1024), ("mixtral", 4096), ("qwen3", 4096), ("qwen3", 16384)]
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats",
            "WarpStateStats")
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sector_hit_rate.pct",
           "l1tex__t_sector_hit_rate.pct", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
           "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
           "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active",
           "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
           "launch__grid_size", "smsp__inst_executed.sum")
STALLS = "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
# the table's columns: (header, metric, scale)
COLUMNS = [("us", "gpu__time_duration.sum", 1e-3), ("DRAM rd GB", "dram__bytes_read.sum", 1e-9),
           ("DRAM wr GB", "dram__bytes_write.sum", 1e-9), ("L2 hit %", "lts__t_sector_hit_rate.pct", 1),
           ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
           ("gmma %", "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active", 1),
           ("CTA/SM", "launch__occupancy_limit_shared_mem", 1),
           ("regs", "launch__registers_per_thread", 1)]


def kernel_calls(shape: str, tokens: int, dev) -> dict:
    """label -> callable, for one case, on fresh random inputs (the default table's configs)."""
    from moec.ops.triton.align import moe_align_block_size
    from moec.ops.triton.configs import default_config, split_config
    from moec.ops.triton.grouped_gemm import down_grouped, gate_up_grouped

    hidden_size, inter, experts, top_k = SHAPES[shape]
    gen = torch.Generator().manual_seed(tokens)
    w13, w2 = expert_weights(hidden_size, inter, experts, gen, dev)
    x, weights, ids = routed_tokens(tokens, hidden_size, experts, top_k, gen, dev)
    gate_up_cfg, down_cfg = split_config(default_config(tokens, experts, top_k))
    align = moe_align_block_size(ids, experts, gate_up_cfg["BLOCK_M"])
    assign = tokens * top_k
    order = ids.flatten().argsort(stable=True)
    x_sorted = x[order // top_k]
    offs = torch.bincount(ids.flatten(), minlength=experts).cumsum(0).to(torch.int32)
    inter_rows = torch.randn(assign, inter, generator=gen).to(dev, DTYPE)
    h_sorted = inter_rows[order]
    out = torch.zeros(tokens, hidden_size, device=dev, dtype=DTYPE)
    rows_out = torch.empty(assign, hidden_size, device=dev, dtype=DTYPE)
    one_per_row = weights.reshape(-1, 1)
    two_per_sm = {**down_cfg, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    return {
        "gate_up": lambda: gate_up_grouped(x, w13, *align, top_k, gate_up_cfg),
        "down": lambda: down_grouped(inter_rows, w2, weights, *align, down_cfg, out=out),
        "down stored": lambda: down_grouped(inter_rows, w2, one_per_row, *align, down_cfg, out=rows_out),
        "down 128x128 s3": lambda: down_grouped(inter_rows, w2, weights, *align, two_per_sm, out=out),
        "gate_up CUTLASS": lambda: torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs),
        "down CUTLASS": lambda: torch._grouped_mm(h_sorted, w2.transpose(1, 2), offs=offs),
    }


def child() -> None:
    """Under ncu: warm every kernel up, then one launch each inside the profiled range, each in
    an NVTX range named after its case and label (ncu renames the kernels by it)."""
    dev = torch.device("cuda")
    for shape, tokens in CASES:
        calls = kernel_calls(shape, tokens, dev)
        for fn in calls.values():  # compile and warm up, unprofiled
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for label, fn in calls.items():
            with torch.cuda.nvtx.range(f"{shape}/T={tokens}/{label}"):
                fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del calls
        torch.cuda.empty_cache()


# ncu picks a unit per column (ns or us, byte or Mbyte): stored in ns and bytes
BASE_UNITS = {"nsecond": ("ns", 1), "usecond": ("ns", 1e3), "msecond": ("ns", 1e6), "second": ("ns", 1e9),
              "byte": ("byte", 1), "Kbyte": ("byte", 1e3), "Mbyte": ("byte", 1e6), "Gbyte": ("byte", 1e9),
              "Tbyte": ("byte", 1e12)}


def parse_raw_csv(text: str) -> list[dict]:
    """ncu --page raw --csv (a header row, a units row, then one row per kernel) -> one dict per
    kernel: numbers as {"value", "unit"} (times in ns, sizes in bytes), the rest as text."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 2:
        return []
    header, units = rows[0], rows[1]
    out = []
    for row in rows[2:]:
        rec = {}
        for name, unit, value in zip(header, units, row):
            try:
                number = float(value.replace(",", ""))
            except ValueError:
                rec[name] = value
                continue
            base, scale = BASE_UNITS.get(unit, (unit, 1))
            rec[name] = {"value": number * scale, "unit": base}
        out.append(rec)
    return out


def kept(name: str) -> bool:
    """The counters recorded in the JSON (the CSV beside it has all ~700 the sections read): the
    table's, the stall reasons, the launch's shape and limits, units' throughput against peak."""
    return (name in METRICS or "issue_stalled_" in name or name.startswith("launch__")
            or (name.endswith(".avg.pct_of_peak_sustained_elapsed") and name.split("__")[0] in ("sm", "dram", "lts", "l1tex", "gpu")))


def scaled(kernel: dict, name: str, scale: float) -> float | None:
    m = kernel["metrics"].get(name)
    return None if m is None else m * scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gemm_profile: needs a CUDA GPU; run it through the device tool", file=sys.stderr)
        return 2
    if args.child:
        child()
        return 0
    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
                                           + glob.glob("/usr/local/cuda/bin/ncu")), None)
    if ncu is None:
        print("gemm_profile: ncu (Nsight Compute) is not on the PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--nvtx", "--print-nvtx-rename", "kernel",
           "--csv", "--page", "raw", "--target-processes", "all",
           *[a for s in SECTIONS for a in ("--section", s)], "--metrics", ",".join((*METRICS, STALLS)),
           sys.executable, str(Path(__file__).resolve()), "--child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    (out / "gemm_profile.ncu.csv").write_text(proc.stdout)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return proc.returncode
    kernels, units = [], {}
    for rec in parse_raw_csv(proc.stdout):
        numbers = {k: v for k, v in rec.items() if isinstance(v, dict) and kept(k)}
        units |= {k: v["unit"] for k, v in numbers.items()}
        metrics = {k: v["value"] for k, v in numbers.items()}
        kernels.append({"label": rec.get("Kernel Name", ""), "metrics": metrics,
                        "stalls": {k.split("stalled_")[1].split("_per_issue")[0]: v
                                   for k, v in metrics.items() if "issue_stalled_" in k}})
    result = {"benchmark": "gemm_profile", "env": environment(torch.device("cuda"), args.commit),
              "tool": "ncu --clock-control none", "sections": list(SECTIONS), "units": units, "kernels": kernels}
    write_json(out / "gemm_profile.json", result)
    print(f"{'kernel':44s} " + " ".join(f"{h:>10s}" for h, _, _ in COLUMNS) + "  top stalls")
    for k in kernels:
        cells = [scaled(k, m, s) for _, m, s in COLUMNS]
        top = sorted(k["stalls"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{k['label'][:44]:44s} " + " ".join(f"{c:10.3g}" if c is not None else f"{'-':>10s}" for c in cells)
              + "  " + ", ".join(f"{n} {v:.2f}" for n, v in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
