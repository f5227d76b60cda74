#!/usr/bin/env python
"""An interim look at a paused UNet stage: the EMA weights it would ship now, beside the shipped model.

    python scripts/peek_stage.py --data DATA --run RUN --vae-from stages/embedded-v2/vae \\
        --out stages/embedded-v2 [--threads 2] [--colour-seeds 2] [--noise-seeds 48]

Publishes RUN's newest checkpoint as a pipeline (``publish_paused_unet``: EMA weights, the stage's
recorded UNet shape), then measures what the stage's bars need soonest, with the library's
evaluation code (``training.recipes.evaluation``):

- noise R^2: how much of the mean R, G, B of "red heart, twitter style" the starting noise's channel
  means explain (48 seeds; bar <= 0.3 on each channel), with its shuffled control;
- colour binding: eight colour-named hearts in the five trained styles, dominant hue = the word
  (bar >= 80%, Wilson 95% interval);
- a comparison sheet of the 24 fixed prompts, the shipped model beside the snapshot.

Writes OUT/step-<N>-peek.json and OUT/step-<N>-comparison.png. The new model is sampled with guidance
5 and rescale 0.7 (zero terminal SNR), the shipped one with its own 7.5 and no rescale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the emoji dataset the stage trains on")
    parser.add_argument("--run", required=True, type=Path, help="the paused `train base` run folder")
    parser.add_argument("--vae-from", required=True, type=Path, help="the stage's VAE (stages/embedded-v2/vae)")
    parser.add_argument("--out", required=True, type=Path, help="where the peek json and sheet go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--colour-seeds", type=int, default=2, help="seeds per colour and style")
    parser.add_argument("--noise-seeds", type=int, default=48)
    parser.add_argument("--no-sheet", action="store_true", help="skip the comparison sheet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from consistent_diffusion.core.images import save_png_atomic
    from consistent_diffusion.core.outputs import write_json_atomic
    from consistent_diffusion.data.emoji import load_emoji_dataset
    from consistent_diffusion.data.styles import ALL_STYLES, HELDOUT_STYLES
    from consistent_diffusion.models.embedded import load_embedded_pipeline
    from consistent_diffusion.training.recipes.embedded import export_embedded, preset, publish_paused_unet
    from consistent_diffusion.training.recipes.evaluation.colour import colour_binding, noise_colour_r2
    from consistent_diffusion.training.recipes.evaluation.sampling import Sampling
    from consistent_diffusion.training.recipes.evaluation.sheet import comparison_sheet

    start = time.perf_counter()
    config = preset("cpu", args.data, args.run, pretrained_vae=args.vae_from)
    pipeline = publish_paused_unet(config)
    step = json.loads((pipeline / "training.json").read_text()).get("paused_at_step") or _step_of(args.run)
    trained = tuple(style for style in ALL_STYLES if style not in HELDOUT_STYLES)
    with tempfile.TemporaryDirectory() as snapshot:
        export_embedded(pipeline, Path(snapshot) / "embedded")
        new = load_embedded_pipeline(folder=Path(snapshot) / "embedded")
        new.set_progress_bar_config(disable=True)
        sampling = Sampling(30, 5.0, 0.7)
        dataset = load_emoji_dataset(args.data)
        results = {
            "step": step,
            "sampling": {"steps": sampling.steps, "guidance": sampling.guidance, "rescale": sampling.guidance_rescale},
            "noise_r2": noise_colour_r2(new, sampling, "red heart, twitter style", seeds=args.noise_seeds),
            "colour_binding": colour_binding(new, dataset, trained, sampling, seeds=args.colour_seeds),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.no_sheet:
            old = load_embedded_pipeline()
            old.set_progress_bar_config(disable=True)
            sheet = comparison_sheet([("shipped model", old, Sampling(30, 7.5, 0.0)), (f"step {step}", new, sampling)])
            save_png_atomic(sheet, args.out / f"step-{step}-comparison.png")
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(results, args.out / f"step-{step}-peek.json")
    r2, binding = results["noise_r2"]["r2"], results["colour_binding"]
    print(f"step {step}: noise R^2 R/G/B {r2['R']:.3f}/{r2['G']:.3f}/{r2['B']:.3f} (bar <= 0.3); colour binding "
          f"{binding['accuracy']:.1%} {binding['interval95']} (bar >= 80%); {results['seconds']:.0f} s")


def _step_of(run: Path) -> int:
    """The newest checkpoint's step of the run's UNet stage."""
    from consistent_diffusion.training.checkpoints import list_checkpoints
    from consistent_diffusion.training.recipes.embedded import stage_dir

    checkpoints = list_checkpoints(stage_dir(run, "unet"))
    return checkpoints[-1][0] if checkpoints else 0


if __name__ == "__main__":
    main()
