"""`consistent-diffusion generate`: prompts x seeds -> a series folder with manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from consistent_diffusion.cli.options import methods as method_options
from consistent_diffusion.cli.options.memory import add_memory_arguments
from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args
from consistent_diffusion.models.loading import SCHEDULERS, default_steps
from consistent_diffusion.models.sampling import DEFAULT_STEPS, EMBEDDED_SAMPLER, OTHER_MODEL_STEPS

if TYPE_CHECKING:
    from PIL import Image

from consistent_diffusion.series import (
    SeriesConfig,
    fingerprint_mismatch,
    generate_series,
    load_series_request,
)

DEFAULT_GUIDANCE = 5.0  # the embedded model's setting (guidance sweep in its model card); SD checkpoints often want 7.5

EXAMPLES = """examples:
  consistent-diffusion generate --prompt "grinning face, twitter style" --seeds 0 1 2 3 --out runs/faces
  consistent-diffusion generate --model path/to/sd15 --prompt "a red fox, watercolor" --steps 25 --out runs/fox
  consistent-diffusion generate --model path/to/sd15 --prompt "a fox" --ip-adapter IP-Adapter/models/ip-adapter_sd15.safetensors --ip-image style.png --ip-preset style --out runs/styled
  consistent-diffusion generate --from-manifest runs/faces/manifest.json --out runs/faces-again
  consistent-diffusion generate --from-image runs/faces/p00_s0002.png --out runs/again.png
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a series (prompts x seeds) with a manifest and a contact sheet",
        description="Generate every prompt with every seed. Each image has its own seed, so the "
        "same (prompt, seed) gives the same image alone or in any batch. The output folder holds "
        "one PNG per image (p<prompt>_s<seed>.png), contact_sheet.png and manifest.json, which "
        "re-creates the folder with --from-manifest. Every PNG carries its recipe (AUTOMATIC1111 "
        "'parameters' other tools read, and ours): --from-image makes that one image again, and "
        "`consistent-diffusion inspect IMG` prints what made it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for several)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], metavar="N", help="seeds (default: 0 1 2 3)")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps (default: {DEFAULT_STEPS} on the embedded model, whose sampler is "
                             f"{EMBEDDED_SAMPLER}; {OTHER_MODEL_STEPS} on other models, with the scheduler they ship)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance (default: {DEFAULT_GUIDANCE})")
    parser.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                        help="rescale the guided prediction's std toward the conditional one's, in [0, 1] "
                             "(Lin et al. 2024; default: 0.7 on a zero-terminal-SNR model such as the embedded one, "
                             "else off)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help=f"swap the model's scheduler (the embedded model samples with {EMBEDDED_SAMPLER})")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    parser.add_argument("--from-manifest", metavar="MANIFEST", help="re-create the series a manifest.json describes")
    parser.add_argument("--from-image", metavar="PNG", help="re-create one image this tool wrote, from the recipe it carries "
                        "(--out is then a .png file, or a folder to write it into under its own name)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_memory_arguments(parser)
    method_options.add_method_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_image:
        return run_from_image(args)
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
            steps=args.steps if args.steps is not None else default_steps(args.model),
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


def run_from_image(args: argparse.Namespace) -> int:
    """``--from-image``: read the PNG's recipe, make the image again, write it with its recipe, and say
    whether the pixels match the source's."""
    from consistent_diffusion.core.errors import ConfigError
    from consistent_diffusion.core.images import save_png_atomic
    from consistent_diffusion.core.recipe import read_recipe
    from consistent_diffusion.series import (
        IMAGE_RECIPE_KIND,
        build_manifest,
        image_recipe_text,
        recreate_image,
        series_request,
    )

    if args.from_manifest or args.prompt:
        raise ConfigError("--from-image re-creates an image from its own recipe; drop --from-manifest and --prompt")
    source = Path(args.from_image)
    found = read_recipe(source)
    if found.get("kind") != IMAGE_RECIPE_KIND:
        raise ConfigError(f"{source} was made by {found.get('kind')!r}, not a series; --from-image re-creates series images")
    request = series_request(found["request"], f"the recipe in {source}")
    image_info = found["image"]
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        out = out / image_info["file"]
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    args.config = request.model_config or args.config
    pipe = load_model_from_args(args, spec=request.model, dtype=request.dtype)
    warning = fingerprint_mismatch(request, pipe)
    if warning:
        print(warning, file=sys.stderr)
    index, seed = int(image_info["prompt_index"]), int(image_info["seed"])
    image = recreate_image(pipe, request, index, seed, progress=not args.quiet)
    device = str(getattr(pipe, "_execution_device", None) or getattr(pipe, "device", "cpu"))  # offload: where it ran
    dtype = str(getattr(pipe.unet, "dtype", "")).replace("torch.", "")
    manifest = build_manifest(pipe, request.config, request.methods, device, dtype)
    save_png_atomic(image, out, text=image_recipe_text(manifest, index, image_info["prompt"], seed, image.size))
    print(f"wrote {out}: {pixel_verdict(source, image)}")
    return 0


def pixel_verdict(source: Path, image: Image.Image) -> str:
    """Whether ``image`` has the pixels of the image file ``source``, in words."""
    import numpy as np

    from consistent_diffusion.core.images import load_image

    before = np.asarray(load_image(source), dtype=np.int16)
    after = np.asarray(image.convert("RGB"), dtype=np.int16)
    if before.shape != after.shape:
        return f"differs from {source}: size {after.shape[1]}x{after.shape[0]} vs {before.shape[1]}x{before.shape[0]}"
    if np.array_equal(before, after):
        return f"pixels identical to {source}"
    diff = np.abs(before - after)
    return (f"differs from {source}: {int((diff.max(axis=-1) > 0).sum())} pixels, max difference {int(diff.max())} "
            "(other library versions, hardware or weights than the recipe records?)")
