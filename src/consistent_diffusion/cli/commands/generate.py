"""`consistent-diffusion generate`: prompts x seeds -> a series folder with manifest."""

from __future__ import annotations

import argparse
import sys

from consistent_diffusion.cli.options import methods as method_options
from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args
from consistent_diffusion.models.loading import SCHEDULERS
from consistent_diffusion.series import (
    SeriesConfig,
    fingerprint_mismatch,
    generate_series,
    load_series_request,
)

DEFAULT_GUIDANCE = 7.5  # also the embedded model's best setting (guidance sweep in its model card)

EXAMPLES = """examples:
  consistent-diffusion generate --prompt "grinning face, twitter style" --seeds 0 1 2 3 --out runs/faces
  consistent-diffusion generate --model path/to/sd15 --prompt "a red fox, watercolor" --steps 25 --out runs/fox
  consistent-diffusion generate --from-manifest runs/faces/manifest.json --out runs/faces-again
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a series (prompts x seeds) with a manifest and a contact sheet",
        description="Generate every prompt with every seed. Each image has its own seed, so the "
        "same (prompt, seed) gives the same image alone or in any batch. The output folder holds "
        "one PNG per image (p<prompt>_s<seed>.png), contact_sheet.png and manifest.json, which "
        "re-creates the folder with --from-manifest.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for several)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], metavar="N", help="seeds (default: 0 1 2 3)")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance (default: {DEFAULT_GUIDANCE})")
    parser.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                        help="rescale the guided prediction's std toward the conditional one's, in [0, 1] "
                             "(Lin et al. 2024; default: 0.7 on a zero-terminal-SNR model such as the embedded one, "
                             "else off)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="swap the model's scheduler")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    parser.add_argument("--from-manifest", metavar="MANIFEST", help="re-create the series a manifest.json describes")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    method_options.add_method_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_manifest:
        request = load_series_request(args.from_manifest)
        args.config = request.model_config or args.config
        pipe = load_model_from_args(args, spec=request.model, dtype=request.dtype)
        warning = fingerprint_mismatch(request, pipe)
        if warning:
            print(warning, file=sys.stderr)
        config, methods = request.config, request.methods
    else:
        config = SeriesConfig(
            prompts=tuple(args.prompt),
            seeds=tuple(args.seeds),
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance_scale=args.guidance,
            guidance_rescale=args.guidance_rescale,
            height=args.height,
            width=args.width,
            scheduler=args.scheduler,
            batch_size=args.batch_size,
        )
        methods = method_options.methods_from_args(args)
        pipe = load_model_from_args(args)
    result = generate_series(pipe, config, methods, out_dir=args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {len(result.images)} images, contact_sheet.png and manifest.json to {result.out_dir}")
    return 0
