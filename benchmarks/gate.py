"""Compare a benchmark result with its accepted baseline: a table, and exit 1 on any regression or
unexplained improvement beyond a metric's tolerance (moec.runtime.regression_gate says why both).

    python benchmarks/gate.py RESULT.json BASELINE.json [--update] [--all]

RESULT may be any benchmark's output (older layouts are converted, see result_format.py).
--update writes RESULT's values into BASELINE, on purpose: after a change that moves a number for
a reason, with the reason in the commit. Exit status: 0 pass (or updated), 1 gate failed,
2 unreadable or mismatched files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_format import load_result  # noqa: E402

from moec.errors import run_cli  # noqa: E402
from moec.runtime.regression_gate import run_gate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", help="a benchmark result (JSON)")
    parser.add_argument("baseline", help="benchmarks/baselines/<device kind>.json")
    parser.add_argument("--update", action="store_true", help="write the result's values into the baseline")
    parser.add_argument("--all", action="store_true", help="also list the result's metrics the baseline does not gate")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    return run_cli(lambda: run_gate(load_result(Path(args.result)), Path(args.baseline), update=args.update,
                                    show_ungated=args.all), args.debug)


if __name__ == "__main__":
    sys.exit(main())
