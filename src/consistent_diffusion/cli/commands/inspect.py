"""`consistent-diffusion inspect IMG`: what made an image (its recipe chunks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  consistent-diffusion inspect runs/faces/p00_s0002.png
  consistent-diffusion inspect runs/faces/p00_s0002.png --json > recipe.json
  consistent-diffusion inspect some-a1111-image.png      (reads AUTOMATIC1111 parameters too)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print what made an image: prompt, sampler, seed, model, method stack",
        description="Read the generation parameters a PNG carries: the AUTOMATIC1111 'parameters' chunk (ours "
        "or another tool's) and, for images this tool wrote, the full recipe (model, series, methods with "
        "their options), with the command that makes the image again.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="a PNG (or any image PIL reads)")
    parser.add_argument("--json", action="store_true", help="print the chunks as JSON (the recipe parsed)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.core import recipe

    text = recipe.read_png_text(args.image)
    ours = recipe.read_recipe(args.image) if recipe.RECIPE_KEY in text else None
    parameters = text.get(recipe.PARAMETERS_KEY)
    if args.json:
        found = {"parameters": parameters, "parsed": recipe.parse_parameters(parameters) if parameters else None,
                 "recipe": ours}
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    if parameters is None and ours is None:
        print(f"{args.image} carries no generation parameters")
        return 1
    if parameters is not None:
        print(parameters)
    if ours is not None:
        print(describe_recipe(ours, args.image))
    return 0


def describe_recipe(found: dict, image: Path) -> str:
    """Our recipe in a few lines: model, place in the series, methods with their options, how to re-create."""
    request, where = found.get("request", {}), found.get("image", {})
    model = request.get("model", {})
    config = request.get("config", {})
    lines = ["", f"made by: consistent-diffusion ({found.get('kind')})",
             f"model: {model.get('spec')} ({model.get('kind')}, fingerprint {str(model.get('fingerprint'))[:12]})",
             f"series: {len(config.get('prompts', []))} prompts x {len(config.get('seeds', []))} seeds, batches of "
             f"{config.get('batch_size')}; this is prompt {where.get('prompt_index')}, seed {where.get('seed')}"]
    for method in request.get("methods", []) or [{"name": "(none: plain generation)", "options": {}}]:
        options = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(method.get("options", {}).items()))
        lines.append(f"method: {method['name']}" + (f" ({options})" if options else ""))
    lines.append(f"re-create: consistent-diffusion generate --from-image {image} --out again.png")
    return "\n".join(lines)
