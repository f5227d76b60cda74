"""`consistent-diffusion invert`: edit-friendly DDPM inversion of one image into a reusable folder."""

from __future__ import annotations

import argparse
import os

from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args
from consistent_diffusion.core.errors import ConfigError

EXAMPLES = """examples:
  consistent-diffusion invert cat.png --prompt "a cat, twitter style" --steps 50 --cfg 3.5 --out runs/cat-inv
  consistent-diffusion edit runs/cat-inv --prompt "a dog, twitter style" --skip 12 --cfg 10 --out runs/cat-to-dog
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "invert",
        help="invert an image (edit-friendly DDPM inversion) for exact reconstruction and editing",
        description="Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024): draws every "
        "noisy latent x_t independently from the image's latent and stores the noise maps z_t that make "
        "the DDPM sampler reproduce the image exactly. The output folder holds inversion.safetensors + "
        "inversion.json (reusable by `edit`, `generate --edit-inversion` and StyleAligned's "
        "--style-reference-inversion), input.png, reconstruction.png and manifest.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="the image to invert (any format PIL reads)")
    parser.add_argument("--prompt", default="", metavar="TEXT", help="a description of the image (default: empty)")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--cfg", type=float, default=3.5, help="guidance scale of the inversion (default: 3.5, as in the paper)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta in (0, 1]; 1 is DDPM (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the independent noises x_t (default: 0)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.core.images import load_image
    from consistent_diffusion.methods.inversion import invert_to_folder

    load_image(args.image)  # bad input fails before the model loads
    if os.path.exists(args.out) and not args.overwrite:
        raise ConfigError(f"output folder {args.out} already exists; choose another --out or pass --overwrite")
    pipe = load_model_from_args(args)
    done = invert_to_folder(
        pipe,
        args.image,
        args.out,
        args.prompt,
        steps=args.steps,
        cfg=args.cfg,
        eta=args.eta,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        width=args.width,
        height=args.height,
        model=args.model,
        overwrite=args.overwrite,
        runtime={"device": args.device, "dtype": args.dtype},
    )
    print(f"inverted {args.image} in {args.steps} steps; reconstruction max |error| "
          f"{done.reconstruction_error:.2e} (latent); wrote {args.out}")
    return 0
