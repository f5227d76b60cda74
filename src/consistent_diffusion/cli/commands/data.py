"""`consistent-diffusion data emoji`: build the emoji dataset the embedded model trains on."""

from __future__ import annotations

import argparse
from pathlib import Path

STYLE_HELP = """\
house styles (--style, repeatable; default all seven):
  google           Noto Emoji, 64 px PNG      emoji-datasource-google (img/google/64)   Apache-2.0
  twitter          Twemoji, 64 px PNG         emoji-datasource-twitter (img/twitter/64) CC-BY-4.0
  openmoji         OpenMoji colour, SVG       openmoji (color/svg)                      CC-BY-SA-4.0
  openmoji-line    OpenMoji black line, SVG   openmoji (black/svg)                      CC-BY-SA-4.0
  fluent-flat      Fluent Emoji flat, SVG     fluentui-emoji (icons/flat)               MIT
  fluent-3d        Fluent Emoji 3D, WebP      @lobehub/fluent-emoji-3d (assets)         MIT
  fluent-contrast  Fluent high contrast, SVG  fluentui-emoji (icons/high-contrast)      MIT

held-out styles (--heldout-style; default openmoji-line and fluent-contrast) are labelled
style_split=heldout: no training (VAE, UNet, probes, metric heads) uses them; they only measure
whether a method, or the style metric, handles a style the model never saw. Holdout identities
(split=holdout, a hash of the code point) are kept out of all training in every style.

Identities are matched across packages by code point, or by normalised name for the
name-only fluentui-emoji files; the summary and DATASET_CARD.md report how many identities
have 2..7 styles and how many files matched no identity. SVG is rasterised with resvg; all
images are composited on white at 64x64. Captions are "<name>, <style> style", and just
"<name>" for a fixed hashed fraction of training rows (--unstyled-fraction, default 0.25)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build datasets (emoji artwork in several house styles)")
    kinds = parser.add_subparsers(dest="data_kind", metavar="DATASET")
    emoji = kinds.add_parser(
        "emoji",
        help="emoji in seven house styles from npm packages (two of them held out from training)",
        description=(
            "Fetch the emoji packages with `npm pack` into a cache (or read extracted package folders "
            "given with --from) and write images.npy, labels.json and DATASET_CARD.md to --out."
        ),
        epilog=STYLE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    emoji.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    emoji.add_argument("--from", dest="sources", action="append", type=Path, default=[], metavar="DIR",
                       help="an extracted package folder (emoji-datasource-<vendor>, openmoji, fluentui-emoji, "
                            "@lobehub/fluent-emoji-3d); repeat per package (skips npm). Default styles: all "
                            "that the folders draw")
    emoji.add_argument("--style", "--vendor", dest="styles", action="append", default=None, metavar="STYLE",
                       help="style to build (default: all seven, or all of --from); repeatable")
    emoji.add_argument("--heldout-style", dest="heldout_styles", action="append", default=None, metavar="STYLE",
                       help="style no training may use (default: openmoji-line, fluent-contrast); repeatable")
    emoji.add_argument("--npm-version", default=None, help="emoji-datasource version to fetch (default 16.0.0)")
    emoji.add_argument("--cache", type=Path, default=None,
                       help="folder for npm tarballs (default ~/.cache/consistent-diffusion/npm)")
    emoji.add_argument("--holdout-fraction", type=float, default=None,
                       help="hash threshold of holdout identities among subject categories (default 0.0275: "
                            "today's 40 holdout emoji)")
    emoji.add_argument("--val-fraction", type=float, default=0.05, help="fraction of identities for validation")
    emoji.add_argument("--unstyled-fraction", type=float, default=None,
                       help="fraction of training rows captioned without a style word (default 0.25)")
    emoji.add_argument("--min-styles", type=int, default=2, help="keep identities drawn by at least this many "
                                                                 "of the chosen styles (default 2)")
    emoji.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    emoji.set_defaults(func=run_emoji)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_emoji(args: argparse.Namespace) -> int:
    from consistent_diffusion.data.emoji import (
        DEFAULT_NPM_VERSION,
        HOLDOUT_FRACTION,
        UNSTYLED_CAPTION_FRACTION,
        EmojiDatasetConfig,
        build_emoji_dataset,
        load_emoji_dataset,
    )
    from consistent_diffusion.data.styles import HELDOUT_STYLES

    styles = tuple(args.styles) if args.styles else None  # None: every style of --from, or DEFAULT_STYLES via npm
    config = EmojiDatasetConfig(
        out=args.out,
        sources=args.sources,
        styles=styles,
        npm_version=args.npm_version or DEFAULT_NPM_VERSION,
        cache=args.cache,
        holdout_fraction=HOLDOUT_FRACTION if args.holdout_fraction is None else args.holdout_fraction,
        val_fraction=args.val_fraction,
        heldout_styles=tuple(args.heldout_styles) if args.heldout_styles else HELDOUT_STYLES,
        unstyled_caption_fraction=(UNSTYLED_CAPTION_FRACTION if args.unstyled_fraction is None
                                   else args.unstyled_fraction),
        min_styles=args.min_styles,
        overwrite=args.overwrite,
    )
    out = build_emoji_dataset(config, log=print)
    dataset = load_emoji_dataset(out)
    splits = {s: len(dataset.indices(split=s)) for s in ("train", "val", "holdout")}
    print(f"wrote {len(dataset.records)} images ({', '.join(dataset.styles)}) to {out}: {splits}; "
          f"trainable rows {len(dataset.trainable())}")
    return 0
