"""`consistent-diffusion data emoji`: build the emoji dataset the embedded model trains on."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build datasets (emoji artwork in several house styles)")
    kinds = parser.add_subparsers(dest="data_kind", metavar="DATASET")
    emoji = kinds.add_parser(
        "emoji",
        help="emoji in several house styles from the npm emoji-datasource-<vendor> packages",
        description=(
            "Fetch emoji-datasource-<vendor> with `npm pack` into a cache (or read extracted package "
            "folders given with --from) and write images.npy, labels.json and DATASET_CARD.md to --out."
        ),
    )
    emoji.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    emoji.add_argument("--from", dest="sources", action="append", type=Path, default=[], metavar="DIR",
                       help="an extracted emoji-datasource-<vendor> package folder; repeat per vendor "
                            "(skips npm)")
    emoji.add_argument("--vendor", dest="vendors", action="append", default=None,
                       help="vendor to npm pack (default: google and twitter); repeatable")
    emoji.add_argument("--npm-version", default=None, help="package version to fetch (default 16.0.0)")
    emoji.add_argument("--cache", type=Path, default=None,
                       help="folder for npm tarballs (default ~/.cache/consistent-diffusion/npm)")
    emoji.add_argument("--holdout", type=int, default=40, help="identities kept out of all training")
    emoji.add_argument("--val-fraction", type=float, default=0.05, help="fraction of identities for validation")
    emoji.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    emoji.set_defaults(func=run_emoji)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_emoji(args: argparse.Namespace) -> int:
    from consistent_diffusion.data.emoji import (
        DEFAULT_NPM_VERSION,
        DEFAULT_VENDORS,
        EmojiDatasetConfig,
        build_emoji_dataset,
        load_emoji_dataset,
    )

    config = EmojiDatasetConfig(
        out=args.out,
        sources=args.sources,
        vendors=tuple(args.vendors or DEFAULT_VENDORS),
        npm_version=args.npm_version or DEFAULT_NPM_VERSION,
        cache=args.cache,
        holdout_identities=args.holdout,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
    )
    out = build_emoji_dataset(config)
    dataset = load_emoji_dataset(out)
    splits = {s: len(dataset.indices(split=s)) for s in ("train", "val", "holdout")}
    print(f"wrote {len(dataset.records)} images ({', '.join(dataset.styles)}) to {out}: {splits}")
    return 0
