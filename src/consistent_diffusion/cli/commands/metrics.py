"""`consistent-diffusion metrics ...`: list extractors, validate metrics on held-out real emoji,
train the small metric heads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("metrics", help="consistency metrics: validate on real data, train heads, list")
    actions = parser.add_subparsers(dest="metrics_action", metavar="ACTION")

    listing = actions.add_parser("list", help="feature extractors and the validation status of each metric")
    listing.set_defaults(func=run_list)

    validate = actions.add_parser(
        "validate",
        help="AUC of every metric and extractor on held-out real emoji, against the bars",
        description="Builds same/different sets from the val + holdout identities of an emoji dataset, in the "
        "trained styles and in the styles no head ever saw, and writes validation.json and validation.md (the "
        "table in docs/metrics.md) to --out. Ship a new table by copying validation.json to "
        "src/consistent_diffusion/assets/metrics/: the validated flags of every score come from it.",
    )
    validate.add_argument("--data", type=Path, default=None,
                          help="emoji dataset folder (consistent-diffusion data emoji --out DIR); default: "
                               "build one under --out/.. from the npm packages")
    validate.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    validate.add_argument("--sets", type=int, default=500, help="positive and negative style sets (default 500)")
    validate.add_argument("--seed", type=int, default=0)
    validate.add_argument("--device", default="cpu")
    validate.add_argument("--heads", type=Path, default=None,
                          help="metric heads file to validate (from train-heads; default: the shipped heads)")
    validate.add_argument("--no-concept", action="store_true", help="skip the concept protocols")
    validate.add_argument("--overwrite", action="store_true")
    validate.set_defaults(func=run_validate)

    train = actions.add_parser(
        "train-heads",
        help="train the emoji-style, emoji-object and emoji-text heads on the train split of an emoji dataset",
        description="Trains on the train-split identities of the trained styles only (never val, holdout or a "
        "held-out style), so `metrics validate` measures them on emoji and styles they never saw.",
    )
    train.add_argument("--data", type=Path, required=True, help="emoji dataset folder")
    train.add_argument("--out", type=Path, required=True, help="heads file to write (.safetensors, + .json)")
    train.add_argument("--cache", type=Path, default=None, help="folder to cache frozen features in")
    train.add_argument("--image-size", type=int, default=None,
                       help="EfficientNet-Lite0 input side for the frozen features (default: the shipped heads')")
    train.add_argument("--style-steps", type=int, default=1500)
    train.add_argument("--object-steps", type=int, default=1500)
    train.add_argument("--text-steps", type=int, default=1000)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=run_train_heads)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_list(args: argparse.Namespace) -> int:
    from consistent_diffusion.metrics.consistency import validation_table
    from consistent_diffusion.metrics.extractors import describe_features

    print("feature extractors:")
    for name, description in describe_features().items():
        print(f"  {name:26s} {description}")
    table = validation_table()
    print("\nvalidated metric/extractor pairs (held-out real emoji):")
    if not table:
        print("  none shipped (run: consistent-diffusion metrics validate)")
    for (metric, extractor), row in sorted(table.items()):
        status = "validated" if row["passed"] else "validated: false"
        bar = f" (bar {row['bar']:.2f})" if row.get("bar") is not None else ""
        print(f"  {metric:8s} {extractor:26s} AUC {row['auc']:.3f}{bar}  {status}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from consistent_diffusion.metrics.validation import ValidationConfig, validate_metrics
    from consistent_diffusion.metrics.validation_report import markdown_table, write_validation

    data = args.data
    if data is None:
        from consistent_diffusion.data.emoji import EmojiDatasetConfig, build_emoji_dataset

        data = args.out.parent / f"{args.out.name}-emoji-data"
        if not (data / "labels.json").is_file():
            print(f"building the emoji dataset in {data}")
            build_emoji_dataset(EmojiDatasetConfig(out=data))
    config = ValidationConfig(data=data, sets=args.sets, seed=args.seed, device=args.device,
                              concept=not args.no_concept, heads=args.heads)
    report = validate_metrics(config)
    out = write_validation(report, args.out, overwrite=args.overwrite)
    print(markdown_table(report))
    failed = [f"{r['metric']}/{r['extractor']} ({r['protocol_id']})" for r in report["results"] if r["passed"] is False]
    print(f"wrote {out / 'validation.json'}; below their bar (validated: false): {', '.join(failed) or 'none'}")
    return 0


def run_train_heads(args: argparse.Namespace) -> int:
    from consistent_diffusion.metrics.extractors.heads import HEAD_IMAGE_SIZE
    from consistent_diffusion.training.recipes.heads import (
        HeadTrainingConfig,
        dataset_head_inputs,
        save_heads,
        train_heads,
    )

    size = args.image_size or HEAD_IMAGE_SIZE
    inputs, records = dataset_head_inputs(args.data, args.cache, image_size=size)
    config = HeadTrainingConfig(style_steps=args.style_steps, object_steps=args.object_steps,
                                text_steps=args.text_steps, seed=args.seed)
    tensors, meta = train_heads(inputs, records, config, image_size=size)
    out = save_heads(tensors, meta, args.out)
    print(json.dumps(meta["training"], indent=None))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
