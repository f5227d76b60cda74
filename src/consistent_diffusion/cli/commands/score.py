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
                        help="metrics to compute (space or comma separated; 'all') and/or extractor sets: emoji "
                             "(the heads validated on emoji; the embedded model's default), dreambooth (DINO "
                             "ViT-S/16 + CLIP-I + CLIP-T), consistory (DreamSim on foreground crops), csd (CSD "
                             "style). Other models get no set by default: their style/object/text axes are "
                             "reported as not measured until you choose one")
    parser.add_argument("--feature-model", action="append", default=[], metavar="NAME=PATH",
                        help="local weights of an extractor, e.g. dino=DIR clip=DIR csd=checkpoint.pth "
                             "dreamsim=DIR (nothing is downloaded; hub ids are looked up in the local cache)")
    parser.add_argument("--control", type=Path, default=None, metavar="IMG_OR_DIR",
                        help="control image(s) for the shape metric (default: the reference)")
    parser.add_argument("--control-kind", choices=["image", "map"], default="image",
                        help="image: extract edges/silhouette from it; map: it already is a ControlNet map")
    parser.add_argument("--shape-mode", choices=["edges", "edges-f1", "silhouette"], default="edges",
                        help="edges: Canny edge F1 corrected for chance (0 = no better than random edges of the "
                             "same extent; default); edges-f1: the plain F1 (unrelated emoji score about 0.45); "
                             "silhouette: foreground IoU")
    parser.add_argument("--concept-text", default=None, help="the concept as text (concept metric)")
    parser.add_argument("--style-features", default=None, help="extractor for style (default: emoji-style on the embedded model)")
    parser.add_argument("--object-features", default=None, help="extractor for object and concept (default: emoji-object on the embedded model)")
    parser.add_argument("--text-features", default=None,
                        help="extractor for text alignment (default: emoji-text on the embedded model, clip with "
                             "--metrics dreambooth; not measured, with the reason, where its weights are missing)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.metrics.score import parse_feature_models, parse_metric_list
    from consistent_diffusion.metrics.series_scores import ScoreConfig, format_table, score_series

    extractors = {key: value for key, value in (("style", args.style_features), ("object", args.object_features),
                                                ("concept", args.object_features), ("text", args.text_features))
                  if value}
    metrics, sets = parse_metric_list(args.metrics)
    config = ScoreConfig(
        series=args.series, metrics=metrics, reference=args.reference,
        control=args.control, control_kind=args.control_kind, shape_mode=args.shape_mode,
        concept_text=args.concept_text, extractors=extractors, extractor_sets=sets,
        feature_models=parse_feature_models(args.feature_model), device=args.device,
    )
    document = score_series(config, log=lambda message: None)
    print(format_table(document))
    print(f"wrote {config.series / 'scores.json'}")
    return 0
