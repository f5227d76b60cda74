"""`consistent-diffusion advise`: choose a method from measured evidence."""

from __future__ import annotations

import argparse
from pathlib import Path

from consistent_diffusion.core.assets import ASSETS_DIR

REFERENCE_REPORT = ASSETS_DIR / "bench" / "report.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "advise",
        help="rank methods for a consistency need from a measured bench report",
        description="Rank the benchmarked methods and combinations for what you need to keep "
        "consistent, explaining each with its measured numbers. Uses --report DIR (a bench output) "
        "or the reference report shipped with the package.",
        epilog="examples:\n  consistent-diffusion advise --need style,object --have reference-images --no-training\n"
        "  consistent-diffusion advise --need object --min-diversity 0.5 --max-seconds 2 --report runs/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--need", required=True, help="comma list of: style, object, shape, concept")
    parser.add_argument("--have", default="reference-images", choices=["reference-images", "text-only"],
                        help="what you can give the method (default: reference-images)")
    parser.add_argument("--no-training", action="store_true", help="exclude methods that train weights")
    parser.add_argument("--min-text", type=float, default=None, metavar="X",
                        help="drop methods whose text alignment is below X")
    parser.add_argument("--min-diversity", type=float, default=None, metavar="X",
                        help="drop methods whose diversity is below X")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S",
                        help="drop methods slower than S seconds per image (training spread over the images)")
    parser.add_argument("--allow-low-diversity", action="store_true",
                        help="keep methods whose diversity is below half of plain generation's (they copy the reference)")
    parser.add_argument("--allow-copying", action="store_true",
                        help="for style, keep methods whose outputs resemble the reference's own subject more than "
                             "plain generation's by over 0.05 (object leakage: img2img at low strength)")
    parser.add_argument("--report", metavar="DIR", help="a bench output folder (default: the shipped reference report)")
    parser.add_argument("--top", type=int, default=5, help="how many to show (default: 5)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.bench.advisor import Constraints, advise, format_advice, parse_needs
    from consistent_diffusion.bench.records import load_report
    from consistent_diffusion.core.errors import ConfigError

    path = Path(args.report) / "report.json" if args.report else REFERENCE_REPORT
    if not path.is_file():
        raise ConfigError(f"no bench report at {path}; run `consistent-diffusion bench --out DIR` and pass --report DIR")
    report = load_report(path)
    needs = parse_needs(args.need)
    print(f"from {path}:")
    constraints = Constraints(have=args.have, allow_training=not args.no_training, min_text=args.min_text,
                              min_diversity=args.min_diversity, max_seconds=args.max_seconds,
                              allow_low_diversity=args.allow_low_diversity, allow_copying=args.allow_copying)
    dropped: list[tuple[str, str]] = []
    print(format_advice(advise(report, needs, top=args.top, constraints=constraints, dropped=dropped), needs, dropped))
    return 0
