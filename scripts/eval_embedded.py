"""Measure the embedded model's quality and write it into its model card.

    python scripts/eval_embedded.py --data DATA_DIR [--weights DIR] [--out DIR] [--write-card]

The measurements, the quality table and the model card are library code
(``consistent_diffusion.training.recipes.evaluation``); this script parses, calls and writes
OUT/results.json, OUT/quality.md, OUT/samples.png and (with --write-card) the weights folder's
MODEL_CARD.md and samples.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from consistent_diffusion.core.outputs import write_text_atomic
from consistent_diffusion.data.emoji import load_emoji_dataset
from consistent_diffusion.models.embedded import EMBEDDED_DIR
from consistent_diffusion.training.recipes.evaluation import (
    EvalConfig,
    evaluate,
    quality_markdown,
    write_model_card,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="emoji dataset folder")
    parser.add_argument("--weights", type=Path, default=None, help="embedded weights folder (default: package)")
    parser.add_argument("--probes", type=Path, default=None, help="probes folder (default: package)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and samples.png")
    parser.add_argument("--per-category", type=int, default=14, help="identities per category (x styles)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--guidance-sweep", type=lambda t: [float(x) for x in t.split(",")], default=(),
                        help="comma-separated guidance scales to choose from on a separate tuning prompt set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-card", action="store_true", help="write MODEL_CARD.md into the weights folder")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = evaluate(EvalConfig(
        data=args.data, weights=args.weights, probes=args.probes, out=args.out, per_category=args.per_category,
        steps=args.steps, guidance=args.guidance, guidance_sweep=tuple(args.guidance_sweep), threads=args.threads,
    ))
    print(json.dumps(results, indent=1))
    if args.out:
        write_text_atomic(json.dumps(results, indent=1), args.out / "results.json")
        write_text_atomic(quality_markdown(results) + "\n", args.out / "quality.md")
    if args.write_card:
        folder = args.weights or EMBEDDED_DIR
        write_model_card(folder, results, quality_markdown(results), load_emoji_dataset(args.data))
        if args.out and (args.out / "samples.png").is_file():
            (folder / "samples.png").write_bytes((args.out / "samples.png").read_bytes())


if __name__ == "__main__":
    main()
