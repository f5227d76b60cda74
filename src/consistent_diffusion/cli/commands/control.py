"""`consistent-diffusion control canny|silhouette|scribble IMAGE --out PNG`: make a control image."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "control",
        help="make a ControlNet control image (canny edges, silhouette, scribble) from an image",
        description="Compute a control image (white structure on black, the input's size unless --size) "
        "for ControlNet generation or to inspect what a ControlNet will see.",
    )
    kinds = parser.add_subparsers(dest="control_kind", metavar="CONDITION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("image", type=Path, help="input image (any format PIL reads; alpha kept for silhouettes)")
    common.add_argument("--out", required=True, type=Path, help="output PNG")
    common.add_argument("--size", type=int, default=None, help="resize + centre-crop to SIZE x SIZE first")

    canny = kinds.add_parser("canny", parents=[common], help="Canny edges of the luma")
    canny.add_argument("--sigma", type=float, default=1.0, help="Gaussian blur in pixels (default 1)")
    canny.add_argument("--low", type=float, default=0.08, help="hysteresis low threshold, gradient in [0,1] units")
    canny.add_argument("--high", type=float, default=0.2, help="hysteresis high threshold")
    canny.set_defaults(func=run, options=("sigma", "low", "high"))

    silhouette = kinds.add_parser("silhouette", parents=[common], help="foreground mask (alpha, else background colour)")
    silhouette.add_argument("--threshold", type=float, default=0.08, help="colour difference to the background, [0,1]")
    silhouette.add_argument("--keep-holes", dest="fill_holes", action="store_false", help="do not fill enclosed holes")
    silhouette.set_defaults(func=run, options=("threshold", "fill_holes"))

    scribble = kinds.add_parser("scribble", parents=[common], help="coarse strokes (or read a drawing)")
    scribble.add_argument("--sigma", type=float, default=2.0, help="blur before edge detection (default 2)")
    scribble.add_argument("--width", type=int, default=1, help="stroke dilation in pixels (default 1)")
    scribble.add_argument("--from-drawing", action="store_true", help="the image is a drawing: threshold it")
    scribble.set_defaults(func=run, options=("sigma", "width", "from_drawing"))
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.core.images import save_png_atomic
    from consistent_diffusion.methods.controls import make_control

    options = {name: getattr(args, name) for name in args.options}
    image = make_control(args.control_kind, args.image, size=args.size, **options)
    save_png_atomic(image, args.out)
    print(f"wrote {args.out} ({args.control_kind}, {image.width}x{image.height})")
    return 0
