"""Print the evaluation suites' option choices from a tuning-suite run (``bench.tuning.choose``, by
``bench.tuning.RULE``: the tuning suite's default stays unless a variant is measurably better).

    consistent-diffusion bench --suite tuning --out runs/tuning
    python scripts/tune_bench.py runs/tuning
"""

from __future__ import annotations

import argparse

from consistent_diffusion.bench.records import load_report
from consistent_diffusion.bench.tuning import choose, format_choices
from consistent_diffusion.core.errors import ConsistentDiffusionError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="a tuning-suite bench folder (or its report.json)")
    args = parser.parse_args()
    report = load_report(args.report)
    if report.suite.name != "tuning":
        print(f"note: {args.report} is suite {report.suite.name!r}, not the tuning suite")
    try:
        choices = choose(report)
    except ConsistentDiffusionError as error:
        raise SystemExit(f"error: {error}") from None
    print(format_choices(choices))


if __name__ == "__main__":
    main()
