"""The benchmark result format, and the gate that compares a result with its accepted baseline.

Every benchmark in `benchmarks/` and `moe-runtime bench --json` produce (or convert to) one result:

    format       "moec-result/1"
    benchmark    what ran: "cpu_gates", "moe_layer", "e2e_decode", "moe-runtime bench", ...
    date         ISO 8601, UTC
    git_commit   the commit measured (null where unknown)
    device       the device's name (`moe-runtime bench`: an object with a "name")
    device_kind  "cpu", "h100", "h200", ...: which `benchmarks/baselines/<kind>.json` applies
    versions     {package: version}
    metrics      [{name, value, unit, direction: "higher" | "lower", ...}]; a metric measured against
                 something in the same run says so: "peer" (what it was compared with), "peer_value",
                 "roofline" (the bound, in the metric's unit). "tolerance" is the producer's advice
                 for a new baseline entry.

A baseline holds, per benchmark, the accepted value of each gated metric and its tolerance,
{"rel": fraction of the value} and/or {"abs": amount} (the band is the larger of the two):

    {"format": "moec-baseline/1", "device_kind": "h100",
     "benchmarks": {"moe_layer": {"accepted": {git_commit, date, device, versions},
                                  "metrics": {name: {value, unit, direction, tolerance, why}}}}}

A metric outside its band fails the gate whichever way it moved: worse is a regression; better is
an improvement nobody has explained, and a baseline that keeps it would stop catching the next
regression. `--update` writes the result's values into the baseline on purpose. A gated metric
missing from the result fails too: a gate that silently stops measuring is no gate.

Needs nothing beyond the standard library and rich itself: the GPU gate compares its results with it too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moec.errors import MoecError

RESULT_FORMAT = "moec-result/1"
BASELINE_FORMAT = "moec-baseline/1"
DIRECTIONS = ("higher", "lower")
DEFAULT_TOLERANCE = {"rel": 0.10}  # for a metric whose producer gave no advice
REPO = Path(__file__).resolve().parents[2]


class GateError(MoecError):
    """A result or baseline file that cannot be compared (unreadable, wrong format, other device)."""


# --- the result format ---------------------------------------------------------------------------


def metric(name: str, value, unit: str, direction: str, **extra) -> dict:
    """One entry of a result's `metrics`; extras that are None are left out."""
    if direction not in DIRECTIONS:
        raise ValueError(f"metric {name}: direction must be one of {DIRECTIONS}, got {direction!r}")
    if isinstance(value, float) and not math.isfinite(value):
        value = None
    return {"name": name, "value": value, "unit": unit, "direction": direction,
            **{k: v for k, v in extra.items() if v is not None}}


def device_kind(device_type: str, name: str) -> str:
    """The baseline family of a device: "cpu" for any CPU (gates there use machine-independent
    metrics), else the GPU's model ("NVIDIA H100 80GB HBM3" → "h100")."""
    if device_type == "cpu":
        return "cpu"
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return found.group(1).lower() if found else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with "-dirty" when tracked files differ;
    None outside a git checkout (an installed package)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if not (REPO / ".git").exists():
        return None
    head = git("rev-parse", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def device_name(result: dict) -> str:
    device = result.get("device")
    return device.get("name", "?") if isinstance(device, dict) else str(device)


def check_result(result: dict, source: str = "result") -> None:
    """Raise GateError naming the first thing that makes `result` not a result of this format."""
    if not isinstance(result, dict):
        raise GateError(f"{source}: not a JSON object")
    if result.get("format") != RESULT_FORMAT:
        raise GateError(f"{source}: format is {result.get('format')!r}, expected {RESULT_FORMAT!r} "
                        "(older benchmark outputs: convert with benchmarks/result_format.py)")
    for key in ("benchmark", "date", "device", "device_kind", "versions", "metrics"):
        if key not in result:
            raise GateError(f"{source}: no {key!r}")
    names = set()
    for i, m in enumerate(result["metrics"]):
        if not isinstance(m, dict) or not {"name", "value", "unit", "direction"} <= set(m):
            raise GateError(f"{source}: metrics[{i}] lacks one of name, value, unit, direction")
        if m["direction"] not in DIRECTIONS:
            raise GateError(f"{source}: metric {m['name']}: direction {m['direction']!r} is not higher or lower")
        if m["name"] in names:
            raise GateError(f"{source}: metric {m['name']} appears twice")
        names.add(m["name"])


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GateError(f"{path}: no such {what} file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GateError(f"{path}: cannot read the {what} ({str(e).splitlines()[0][:120]})") from None


def write_json(path: Path, data: dict) -> None:
    """Atomically: a gate killed mid-write leaves the old baseline, not half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# --- comparison ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    direction: str
    baseline: float | None
    now: float | None
    tolerance: dict | None
    verdict: str  # ok | regression | improvement | missing | not gated

    @property
    def failed(self) -> bool:
        return self.verdict in ("regression", "improvement", "missing")

    @property
    def change(self) -> str:
        if self.baseline is None or self.now is None:
            return ""
        diff = self.now - self.baseline
        if self.baseline:
            return f"{100 * diff / abs(self.baseline):+.1f}%"
        return f"{diff:+.4g}"


def band_of(entry: dict) -> float:
    """The largest allowed distance from the accepted value: max(abs, rel x |value|)."""
    tol = entry.get("tolerance") or {}
    return max(float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0)) * abs(float(entry["value"])))


def judge(entry: dict, now: float | None) -> str:
    if now is None:
        return "missing"
    base = float(entry["value"])
    diff = now - base
    if abs(diff) <= band_of(entry) * (1 + 1e-12):
        return "ok"
    worse = diff < 0 if entry["direction"] == "higher" else diff > 0
    return "regression" if worse else "improvement"


def section(baseline: dict, benchmark: str) -> dict | None:
    return (baseline.get("benchmarks") or {}).get(benchmark)


def compare(result: dict, baseline: dict) -> list[Row]:
    """One row per metric the baseline gates (result order, then the baseline's missing ones),
    then the result's metrics the baseline does not hold, as "not gated"."""
    gated = (section(baseline, result["benchmark"]) or {}).get("metrics", {})
    measured = {m["name"]: m for m in result["metrics"]}
    rows = []
    for name in [*[n for n in measured if n in gated], *[n for n in gated if n not in measured]]:
        entry = gated[name]
        now = measured.get(name, {}).get("value")
        rows.append(Row(name, entry.get("unit", ""), entry["direction"], entry["value"], now,
                        entry.get("tolerance") or {}, judge(entry, now)))
    for name, m in measured.items():
        if name not in gated:
            rows.append(Row(name, m["unit"], m["direction"], None, m["value"], None, "not gated"))
    return rows


def updated_baseline(result: dict, baseline: dict | None) -> dict:
    """The baseline with `result`'s benchmark section rewritten from it: every metric the section
    gated or the result advises a tolerance for, at the result's value; tolerances and reasons
    already in the baseline are kept. Metrics the result lacks leave the section."""
    baseline = json.loads(json.dumps(baseline)) if baseline else {
        "format": BASELINE_FORMAT, "device_kind": result["device_kind"], "benchmarks": {}}
    old_section = section(baseline, result["benchmark"]) or {}
    old, ungated = old_section.get("metrics", {}), old_section.get("ungated", {})
    metrics = {}
    for m in result["metrics"]:
        if m["value"] is None or m["name"] in ungated or (m["name"] not in old and "tolerance" not in m):
            continue
        entry = {"value": m["value"], "unit": m["unit"], "direction": m["direction"],
                 "tolerance": old.get(m["name"], {}).get("tolerance") or m.get("tolerance") or DEFAULT_TOLERANCE}
        why = old.get(m["name"], {}).get("why") or m.get("why")
        if why:
            entry["why"] = why
        metrics[m["name"]] = entry
    baseline.setdefault("benchmarks", {})[result["benchmark"]] = {
        "accepted": {"git_commit": result.get("git_commit"), "date": result.get("date"),
                     "device": device_name(result), "versions": result.get("versions")},
        "metrics": metrics,
        **({"ungated": ungated} if ungated else {}),
    }
    return baseline


FLICKER_FACTOR = 1.5  # a calibrated tolerance: this many times the widest change between repeated runs
FLICKER_LIMIT = 1.0  # a metric whose runs need more than ±100% cannot tell a 2x regression from noise


def spread(values: list[float]) -> float:
    """The largest relative change between any two of `values`: max/min - 1 (for positive values)."""
    low, high = min(values), max(values)
    if low <= 0:
        return 0.0 if low == high else math.inf
    return high / low - 1


def calibrated_baseline(runs: list[dict], baseline: dict | None, factor: float = FLICKER_FACTOR,
                        limit: float = FLICKER_LIMIT) -> tuple[dict, list[str]]:
    """The baseline accepted from repeated runs of one commit (the flicker check), and what changed.

    The accepted values are the run nearest the runs' medians. Every gated metric whose tolerance is
    narrower than `factor` times the widest change between its runs gets that (in steps of 5%), so
    that no run of the set would fail against any other, with room to spare; a metric that would need
    more than `limit` is taken out of the gates (listed under "ungated" with its spread), because
    its noise would hide a 2x regression: it stays in the results, unjudged."""
    if len(runs) < 3:
        raise GateError(f"calibration needs at least 3 runs of one commit, got {len(runs)}")
    benches = {r["benchmark"] for r in runs}
    if len(benches) != 1:
        raise GateError(f"calibration runs are of different benchmarks: {sorted(benches)}")
    values: dict[str, list[float]] = {}
    for r in runs:
        for m in r["metrics"]:
            if m["value"] is not None:
                values.setdefault(m["name"], []).append(float(m["value"]))
    medians = {name: sorted(v)[len(v) // 2] for name, v in values.items()}

    def distance(run: dict) -> float:
        return sum(abs(math.log(m["value"] / medians[m["name"]])) for m in run["metrics"]
                   if m["value"] and medians.get(m["name"]) and m["value"] * medians[m["name"]] > 0)

    accepted = min(runs, key=distance)
    new = updated_baseline(accepted, baseline)
    part = section(new, accepted["benchmark"])
    notes = [f"accepted values from the run of {accepted.get('date')} (nearest the medians of {len(runs)} runs)"]
    for name, entry in list(part["metrics"].items()):
        v = values.get(name, [])
        if len(v) < len(runs):
            continue  # not measured by every run: the gate's "missing" verdict is the right one
        change = spread(v)
        allowed = min((band_of({**entry, "value": x}) / abs(x) if x else math.inf) for x in v)
        if factor * change <= allowed:
            continue
        needed = math.ceil(factor * change * 20) / 20
        why = f"{len(runs)} runs of {accepted.get('git_commit')} moved {100 * change:.1f}%"
        if needed > limit:
            del part["metrics"][name]
            part.setdefault("ungated", {})[name] = f"{why}: too noisy to gate"
            notes.append(f"{name}: ungated ({why}; ±{100 * needed:.0f}% would hide a 2x regression)")
        else:
            entry["tolerance"] = {**(entry.get("tolerance") or {}), "rel": needed}
            entry["why"] = f"{why}; tolerance {factor}x that"
            notes.append(f"{name}: tolerance ±{100 * needed:.0f}% ({why})")
    return new, notes


# --- output --------------------------------------------------------------------------------------

STYLE = {"ok": "green", "regression": "bold red", "improvement": "bold yellow", "missing": "bold red",
         "not gated": "dim"}


def _num(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:.4g}"


def _tolerance(tol: dict | None) -> str:
    if tol is None:
        return ""
    parts = []
    if tol.get("rel"):
        parts.append(f"±{100 * tol['rel']:.3g}%")
    if tol.get("abs"):
        parts.append(f"±{_num(tol['abs'])}")
    return " or ".join(parts) or "exact"  # the band is the larger


def render(rows: list[Row], title: str, show_ungated: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("unit")
    for col in ("baseline", "now", "change", "tolerance"):
        table.add_column(col, justify="right")
    table.add_column("verdict")
    for r in rows:
        if r.verdict == "not gated" and not show_ungated:
            continue
        better = "higher is better" if r.direction == "higher" else "lower is better"
        table.add_row(r.name, f"{r.unit} [dim]({better})[/]", _num(r.baseline), _num(r.now), r.change,
                      _tolerance(r.tolerance), f"[{STYLE[r.verdict]}]{r.verdict}[/]")
    return table


def run_gate(result: dict, baseline_path: Path, update: bool = False, console: Console | None = None,
             show_ungated: bool = False) -> int:
    """Compare, print the table, and return the exit status: 0 when every gated metric is within its
    band (or `update` rewrote the baseline), 1 otherwise."""
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    check_result(result)
    baseline_path = Path(baseline_path)
    baseline = None
    if baseline_path.exists() or not update:
        baseline = read_json(baseline_path, "baseline")
        if baseline.get("format") != BASELINE_FORMAT:
            raise GateError(f"{baseline_path}: format is {baseline.get('format')!r}, expected {BASELINE_FORMAT!r}")
        if baseline.get("device_kind") != result["device_kind"]:
            raise GateError(f"{baseline_path} holds {baseline.get('device_kind')} values, the result was measured "
                            f"on {result['device_kind']} ({device_name(result)}); use baselines/"
                            f"{result['device_kind']}.json")
    bench = result["benchmark"]
    rows = compare(result, baseline or {})
    title = f"{bench} on {device_name(result)} ({result['device_kind']}) at {str(result.get('git_commit'))[:12]}"
    if baseline is not None and section(baseline, bench):
        accepted = section(baseline, bench).get("accepted", {})
        title += (f" vs baseline {baseline_path.name} from {str(accepted.get('git_commit'))[:12]} "
                  f"({accepted.get('date')})")
    if show_ungated or any(r.verdict != "not gated" for r in rows):
        console.print(render(rows, title, show_ungated))
    ungated = sum(r.verdict == "not gated" for r in rows)
    if ungated and not show_ungated:
        console.print(f"[dim]{ungated} more metrics in the result are not gated by {baseline_path.name}[/]")
    if update:
        write_json(baseline_path, updated_baseline(result, baseline))
        console.print(f"updated {baseline_path} ({bench}) with this result's values")
        return 0
    if baseline is None or not section(baseline, bench):
        console.print(f"[bold red]FAIL[/] {baseline_path} has no baseline for {bench}: record this result "
                      f"with --update if it is the accepted one")
        return 1
    failed = [r for r in rows if r.failed]
    if not failed:
        console.print(f"[green]PASS[/] {sum(r.verdict == 'ok' for r in rows)} metrics within tolerance")
        return 0
    for r in failed:
        if r.verdict == "regression":
            console.print(f"[bold red]REGRESSION[/] {r.name}: {_num(r.baseline)} → {_num(r.now)} {r.unit} "
                          f"({r.change}, tolerance {_tolerance(r.tolerance)})")
        elif r.verdict == "improvement":
            console.print(f"[bold yellow]UNEXPLAINED IMPROVEMENT[/] {r.name}: {_num(r.baseline)} → "
                          f"{_num(r.now)} {r.unit} ({r.change}, tolerance {_tolerance(r.tolerance)}); "
                          "update the baseline with --update if intended")
        else:
            console.print(f"[bold red]MISSING[/] {r.name}: gated by the baseline but not in the result")
    console.print(f"[bold red]FAIL[/] {len(failed)} of {sum(r.verdict != 'not gated' for r in rows)} gated "
                  f"metrics: {', '.join(r.name for r in failed)}")
    return 1
