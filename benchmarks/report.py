"""The benchmark record: every result in benchmarks/results/ as tables and trend plots.

    python benchmarks/report.py [--results benchmarks/results] [--out benchmarks/REPORT.md]

For each benchmark on each device kind (a metric group), REPORT.md gets a table of every metric
over the runs (newest last, at most --columns of them) and benchmarks/report/ one PNG: each metric
against its first recorded value, turned so that up is better, so one axis shows what moved.
Results in older layouts are converted as they are read (result_format.py). Regenerate after
adding a result; do not edit the output by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_format import load_result  # noqa: E402

from moec.runtime.regression_gate import GateError, device_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELLED_LINES = 8  # lines named in a plot's legend: the ones that moved most


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def load_history(results_dir: Path) -> tuple[dict, list[str]]:
    """{(benchmark, device_kind): [results, oldest first]}, and the files that could not be read."""
    groups, skipped = defaultdict(list), []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = load_result(path)
        except GateError as e:
            skipped.append(f"{path.name}: {e}")
            continue
        result["_file"] = path.name
        # one history per benchmark, device kind and model: a 2-layer and an 8-layer run are not a trend
        groups[(result["benchmark"], result["device_kind"], result.get("model") or "")].append(result)
    for runs in groups.values():
        runs.sort(key=lambda r: r["date"])
    return dict(sorted(groups.items())), skipped


def run_label(result: dict) -> str:
    commit = (result.get("git_commit") or "")[:7] or "no commit"
    return f"{result['date'][:10]} {commit}"


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:.4g}"


def metric_rows(runs: list[dict]) -> list[tuple[str, str, str, list]]:
    """(name, unit, direction, [value per run]) for every metric any run has, in first-seen order."""
    seen: dict[str, tuple[str, str]] = {}
    for run in runs:
        for m in run["metrics"]:
            seen.setdefault(m["name"], (m["unit"], m["direction"]))
    values = [{m["name"]: m["value"] for m in run["metrics"]} for run in runs]
    return [(name, unit, direction, [v.get(name) for v in values]) for name, (unit, direction) in seen.items()]


def plot_group(path: Path, title: str, labels: list[str], rows: list[tuple[str, str, str, list]]) -> None:
    """Every metric of the group against its first recorded value, turned so that up is better
    (value / first where higher is better, first / value where lower is): one axis for all units,
    1 = unchanged. The metrics that moved most are named, the rest drawn in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    better = {}
    for name, _, direction, values in rows:
        numbers = [v if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None for v in values]
        first = next((v for v in numbers if v is not None), None)
        if first is not None:
            better[name] = [None if v is None else (v / first if direction == "higher" else first / v) for v in numbers]
    moved = sorted(better, key=lambda n: -max(abs((v or 1) - 1) for v in better[n]))[:LABELLED_LINES]
    moved = [n for n in moved if any(v not in (None, 1) for v in better[n])]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = list(range(len(labels)))
    for name, ys in better.items():
        pts = [(i, y) for i, y in zip(x, ys) if y is not None]
        style = {"marker": "o", "linewidth": 1.5, "label": name} if name in moved else \
            {"marker": ".", "linewidth": 0.8, "color": "0.7"}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel("against the first record (up = better)")
    ax.set_title(f"{title}: {len(better)} metrics, {len(labels)} run(s)"
                 + (f"; the {len(moved)} that moved most named" if moved else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if moved:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(groups: dict, skipped: list[str], out: Path, plots_dir: Path, columns: int) -> list[Path]:
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):
        old.unlink()
    written: list[Path] = []
    rel = lambda p: p.relative_to(out.parent).as_posix()  # noqa: E731
    lines = ["# Benchmark record", "",
             f"Generated by `python benchmarks/report.py` from `benchmarks/results/` "
             f"({sum(len(r) for r in groups.values())} results); regenerate, do not edit. Each table shows a "
             f"benchmark's metrics over its last {columns} runs on one kind of device (↑ higher is better, "
             "↓ lower); its plot shows every recorded run, each metric against its first value "
             "(up = better). Gates and "
             "tolerances: `benchmarks/baselines/`, `benchmarks/gate.py`.", ""]
    for (bench, kind, model), runs in groups.items():
        shown = runs[-columns:]
        devices = ", ".join(sorted({device_name(r) for r in runs}))
        files = ", ".join(f"`{r['_file']}`" for r in shown)
        title = f"{bench} · {kind}" + (f" · {model}" if model else "")
        lines += [f"## {title}", "", f"{len(runs)} run(s) on {devices}; files: {files}", ""]
        rows = metric_rows(shown)
        lines.append("| metric | unit | " + " | ".join(run_label(r) for r in shown) + " |")
        lines.append("|---|---|" + "---:|" * len(shown))
        for name, unit, direction, values in rows:
            arrow = "↑" if direction == "higher" else "↓"
            lines.append(f"| {name} | {unit} {arrow} | " + " | ".join(fmt(v) for v in values) + " |")
        lines.append("")
        png = plots_dir / f"{slug(bench)}-{kind}{'-' + slug(model) if model else ''}.png"
        label = f"{bench} on {kind}" + (f", {model}" if model else "")
        plot_group(png, label, [run_label(r) for r in runs], metric_rows(runs))
        written.append(png)
        lines += [f"![{label}, every run]({rel(png)})", ""]
    if skipped:
        lines += ["## Not shown", ""] + [f"- {s}" for s in skipped] + [""]
    out.write_text("\n".join(lines))
    return [out, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "REPORT.md"))
    parser.add_argument("--columns", type=int, default=8, help="runs per table (newest)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    groups, skipped = load_history(Path(args.results))
    written = render(groups, skipped, out, out.parent / "report", args.columns)
    print(f"wrote {written[0]} and {len(written) - 1} plots in {out.parent / 'report'}")
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
