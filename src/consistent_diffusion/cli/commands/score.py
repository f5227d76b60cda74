"""`consistent-diffusion score DIR`: score a series folder, write DIR/scores.json, print a table."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score a series folder's consistency (writes scores.json beside its manifest)",
        description="Metrics: style, object, text, diversity (default) and shape (needs --control or "
        "--reference), fidelity (needs --reference: the source image), concept (needs --reference exemplars "
        "and/or --concept-text), or 'all'. Every consistency score is printed next to the set's diversity "
        "and its validation status on held-out real emoji (see docs/metrics.md).",
    )
    parser.add_argument("series", type=Path, metavar="DIR", help="series folder (holds manifest.json)")
    parser.add_argument("--reference", type=Path, default=None, metavar="IMG_OR_DIR",
                        help="reference image or folder: style/object reference, fidelity source, concept exemplars")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="metrics to compute (space or comma separated; 'all')")
    parser.add_argument("--control", type=Path, default=None, metavar="IMG_OR_DIR",
                        help="control image(s) for the shape metric (default: the reference)")
    parser.add_argument("--control-kind", choices=["image", "map"], default="image",
                        help="image: extract edges/silhouette from it; map: it already is a ControlNet map")
    parser.add_argument("--shape-mode", choices=["edges", "silhouette"], default="edges")
    parser.add_argument("--concept-text", default=None, help="the concept as text (concept metric)")
    parser.add_argument("--style-features", default=None, help="extractor for style (default emoji-style)")
    parser.add_argument("--object-features", default=None, help="extractor for object (default efficientnet-lite0)")
    parser.add_argument("--text-features", default=None,
                        help="extractor for text alignment (default: emoji-text for the embedded model, else clip; "
                             "skipped, with the reason, where its weights are not available)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.metrics.score import ScoreConfig, format_table, parse_metric_list, score_series

    extractors = {key: value for key, value in (("style", args.style_features), ("object", args.object_features),
                                                ("concept", args.object_features), ("text", args.text_features))
                  if value}
    config = ScoreConfig(
        series=args.series, metrics=parse_metric_list(args.metrics), reference=args.reference,
        control=args.control, control_kind=args.control_kind, shape_mode=args.shape_mode,
        concept_text=args.concept_text, extractors=extractors, device=args.device,
    )
    document = score_series(config, log=lambda message: None)
    print(format_table(document))
    print(f"wrote {config.series / 'scores.json'}")
    return 0
