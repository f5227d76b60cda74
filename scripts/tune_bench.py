"""Print the quick suite's option choices from a tuning-suite run (``bench.tuning.choose``).

    consistent-diffusion bench --suite tuning --out runs/tuning
    python scripts/tune_bench.py runs/tuning
"""

from __future__ import annotations

import argparse

from consistent_diffusion.bench.records import load_report
from consistent_diffusion.bench.tuning import choose, format_choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="a tuning-suite bench folder (or its report.json)")
    args = parser.parse_args()
    report = load_report(args.report)
    if report.suite.name != "tuning":
        print(f"note: {args.report} is suite {report.suite.name!r}, not the tuning suite")
    print(format_choices(choose(report)))


if __name__ == "__main__":
    main()
