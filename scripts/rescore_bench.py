"""Add the columns computed from the cells' images (distance to plain and its "no measurable effect"
flag, subject agreement within the series where missing) to an existing bench folder, and rewrite
its report.json, report.md and report.html (``bench.image_columns.rescore``; deterministic).

    python scripts/rescore_bench.py runs/bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from consistent_diffusion.bench.image_columns import rescore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a bench output folder (report.json, cells/<id>/series/)")
    args = parser.parse_args()
    if not (args.out / "report.json").is_file():
        print(f"error: {args.out} holds no report.json (a `consistent-diffusion bench --out` folder)", file=sys.stderr)
        return 2
    report = rescore(args.out)
    flagged = [cell.id for cell in report.cells if cell.no_effect]
    print(f"re-scored {len(report.cells)} cells in {args.out}; no measurable effect: {', '.join(flagged) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
