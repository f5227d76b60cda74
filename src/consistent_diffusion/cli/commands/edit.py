"""`consistent-diffusion edit`: re-sample an inversion with new prompts (edit-friendly DDPM editing)."""

from __future__ import annotations

import argparse
import os

from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args
from consistent_diffusion.core.errors import ConfigError

EXAMPLES = """examples:
  consistent-diffusion edit runs/cat-inv --prompt "a dog, twitter style" --skip 12 --cfg 10 --out runs/cat-to-dog
  consistent-diffusion edit runs/cat-inv --prompt "a cat, google style" --prompt "a tiger" --skip 20 --out runs/cats
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="edit an inverted image with a new prompt (from `invert`)",
        description="Re-run the DDPM sampler of an inversion folder with each target prompt, starting at "
        "step --skip, with the inversion's noise maps: the structure of the input is kept and the "
        "prompt changes what differs. With the source prompt, the source cfg and --skip 0 it "
        "reconstructs the input exactly. Writes edit_pNN.png per prompt, contact_sheet.png and manifest.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inversion", metavar="DIR", help="a folder written by `consistent-diffusion invert`")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="target prompt (repeat for several; default: the source prompt)")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT")
    parser.add_argument("--skip", type=int, default=0, metavar="N",
                        help="leading steps to skip, 0..steps-1 (more keeps more of the input; default: 0)")
    parser.add_argument("--cfg", type=float, default=None, help="target guidance (default: the inversion's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="unused by the sampler (the noise is the inversion's); recorded for uniformity")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.methods.inversion import DdpmEdit, Inversion, edit_to_folder

    inversion = Inversion.load(args.inversion)
    DdpmEdit(inversion=inversion, skip=args.skip)  # validates skip before the model loads
    if os.path.exists(args.out) and not args.overwrite:
        raise ConfigError(f"output folder {args.out} already exists; choose another --out or pass --overwrite")
    recorded = inversion.config.get("model")
    if recorded and args.model != recorded:
        print(f"warning: the inversion was made with model {recorded!r}, editing with {args.model!r}")
    pipe = load_model_from_args(args)
    cfg = inversion.cfg if args.cfg is None else args.cfg
    images = edit_to_folder(pipe, inversion, args.out, args.prompt or None, cfg=cfg, skip=args.skip,
                            negative_prompt=args.negative_prompt, seed=args.seed, overwrite=args.overwrite,
                            runtime={"device": args.device, "dtype": args.dtype})
    print(f"wrote {len(images)} edit(s) of {args.inversion} (skip {args.skip}, cfg {cfg}) to {args.out}")
    return 0
