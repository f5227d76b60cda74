#!/usr/bin/env python
"""Shape adherence with a ControlNet vs without: canny F1 / silhouette IoU of outputs against
held-out control images (same prompts and seeds). Writes OUT/bench_controlnet.{json,md}.

    python scripts/bench_controlnet.py --model embedded --controlnet embedded-canny --condition canny \
        --data runs/emoji --split holdout --count 16 --out runs/bench_controlnet
    python scripts/bench_controlnet.py --model tiny --controlnet runs/cn/controlnet --condition canny --count 2

Without --data the control images come from synthetic shapes (circles, squares, triangles).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _synthetic(count: int, size: int) -> tuple[list, list[str]]:
    from PIL import Image, ImageDraw

    shapes, colours = ("circle", "square", "triangle"), {"red": (220, 30, 30), "blue": (30, 60, 220)}
    pictures, captions = [], []
    for index in range(count):
        shape = shapes[index % 3]
        name, colour = list(colours.items())[(index // 3) % 2]
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        lo, hi = size // 5, size - size // 5
        if shape == "circle":
            draw.ellipse((lo, lo, hi, hi), fill=colour)
        elif shape == "square":
            draw.rectangle((lo, lo, hi, hi), fill=colour)
        else:
            draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=colour)
        pictures.append(image)
        captions.append(f"a {name} {shape}")
    return pictures, captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="'tiny', 'embedded' or a diffusers folder")
    parser.add_argument("--controlnet", required=True, help="ControlNet folder or embedded-<condition>")
    parser.add_argument("--condition", choices=("canny", "silhouette", "scribble"), default="canny")
    parser.add_argument("--data", default=None, help="emoji dataset or captioned image folder (default: synthetic)")
    parser.add_argument("--split", default="holdout", help="emoji datasets: split of the held-out images")
    parser.add_argument("--count", type=int, default=16, help="control images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--scale", type=float, default=1.0, help="ControlNet conditioning scale")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--text-extractor", default="emoji-text",
                        help="also the text alignment of both sets of outputs (emoji-text, clip; 'none' skips it)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_controlnet"))
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from consistent_diffusion.core.outputs import write_json_atomic, write_text_atomic
    from consistent_diffusion.methods.controlnet import load_controlnet
    from consistent_diffusion.methods.controls import make_control
    from consistent_diffusion.testing import load_pipeline_or_tiny
    from consistent_diffusion.training.controlnet import measure_shape_control
    from consistent_diffusion.training.data import load_captioned_images
    from consistent_diffusion.training.diffusion import model_size

    pipe = load_pipeline_or_tiny(args.model)
    size = model_size(pipe, None)
    if args.data:
        data = load_captioned_images(args.data, size, split=args.split, limit=args.count, heldout_styles=True)
        pictures, captions = data.images, data.captions
    else:
        pictures, captions = _synthetic(args.count, size)
    controls = [make_control(args.condition, picture) for picture in pictures]
    controlnet = load_controlnet(args.controlnet, pipe.unet.device, pipe.unet.dtype)
    report = measure_shape_control(pipe, controlnet, controls, captions, args.condition, steps=args.steps,
                                   guidance_scale=args.guidance, seeds=tuple(args.seeds), scale=args.scale,
                                   text_extractor=None if args.text_extractor == "none" else args.text_extractor)
    metric = "silhouette IoU" if args.condition == "silhouette" else "canny F1"
    table = (
        f"| {metric} ({report['n']} images) | without ControlNet | with ControlNet | ratio |\n|---|---:|---:|---:|\n"
        f"| `{args.model}` + `{args.controlnet}` | {report['without']:.3f} | {report['with']:.3f} | "
        f"{report['ratio']:.2f}x |\n"
        + (f"| text alignment ({report['text_extractor']}) | {report['text_without']:.3f} | {report['text_with']:.3f} | "
           f"{report['text_ratio']:.2f}x |\n" if report.get("text_ratio") is not None else "")
        + f"\nControl images: {args.data or 'synthetic shapes'}"
        f"{f' (split {args.split})' if args.data else ''}; seeds {args.seeds}, {args.steps} steps, guidance "
        f"{args.guidance}, conditioning scale {args.scale}.\n"
    )
    write_json_atomic({"args": vars(args) | {"out": str(args.out)}, "report": report}, args.out / "bench_controlnet.json")
    write_text_atomic(table, args.out / "bench_controlnet.md")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
