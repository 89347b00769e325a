"""Compare a benchmark result with its accepted baseline: a table, and exit 1 on any regression or
unexplained improvement beyond a metric's tolerance (moec.runtime.regression_gate says why both).

    python benchmarks/gate.py RESULT.json BASELINE.json [--update] [--all]
    python benchmarks/gate.py --calibrate BASELINE.json RUN.json RUN.json RUN.json ...

RESULT may be any benchmark's output (older layouts are converted, see result_format.py).
--update writes RESULT's values into BASELINE, on purpose: after a change that moves a number for
a reason, with the reason in the commit. --calibrate accepts repeated runs of one commit (the
flicker check: `gpu_gate.sh --flicker N`): the values of the run nearest their medians, and for
every metric the runs moved further than its tolerance, a tolerance of 1.5x that spread, or no gate
where that would pass a 2x regression (moec.runtime.regression_gate.calibrated_baseline). Exit
status: 0 pass (or updated), 1 gate failed, 2 unreadable or mismatched files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_format import load_result  # noqa: E402

from moec.errors import run_cli  # noqa: E402
from moec.runtime.regression_gate import calibrated_baseline, read_json, run_gate, write_json  # noqa: E402


def calibrate(baseline: Path, runs: list[Path]) -> int:
    new, notes = calibrated_baseline([load_result(p) for p in runs], read_json(baseline, "baseline")
                                     if baseline.exists() else None)
    write_json(baseline, new)
    print(f"calibrated {baseline} from {len(runs)} runs:\n  " + "\n  ".join(notes))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="RESULT BASELINE, or with --calibrate: BASELINE RUN RUN RUN ...")
    parser.add_argument("--update", action="store_true", help="write the result's values into the baseline")
    parser.add_argument("--calibrate", action="store_true",
                        help="accept repeated runs of one commit into BASELINE, widening what they show is noise")
    parser.add_argument("--all", action="store_true", help="also list the result's metrics the baseline does not gate")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.calibrate:
        if len(args.files) < 4:
            parser.error("--calibrate wants BASELINE and at least 3 runs of one commit")
        return run_cli(lambda: calibrate(Path(args.files[0]), [Path(p) for p in args.files[1:]]), args.debug)
    if len(args.files) != 2:
        parser.error(f"want RESULT BASELINE, got {len(args.files)} files")
    return run_cli(lambda: run_gate(load_result(Path(args.files[0])), Path(args.files[1]), update=args.update,
                                    show_ungated=args.all), args.debug)


if __name__ == "__main__":
    sys.exit(main())
