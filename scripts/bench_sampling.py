"""Choose and re-time the embedded model's default sampling (scheduler and step count).

    python scripts/bench_sampling.py quality --data DATA_DIR --out DIR [--candidates ddim:30,dpm++:12]
        [--per-category 2] [--colour-seeds 2] [--fd-draws 50]
    python scripts/bench_sampling.py retime [--candidates ddim:30,dpm++:12] [--images 8] [--rounds 3]

``quality`` measures each candidate ``scheduler:steps`` (scheduler names of ``models.SCHEDULERS``,
swapped in with ``set_scheduler``, which keeps the embedded model's zero-SNR, v-prediction, trailing
configuration) with the evaluation's own tools, on the same prompts and seeds for every candidate:
style-probe accuracy (``probe_scores``, Wilson 95% interval added here), colour binding
(``colour_binding``, Wilson 95%), and the Frechet distance in EfficientNet-Lite0 features of the
generated images to the held-out real ones (95% normal bootstrap interval over the generated images).
It writes OUT/<scheduler>-<steps>.json (and .features.pt) per candidate and OUT/quality.md.

``retime`` times ``images`` images per candidate at one thread (``time_generation``: one call after a
warm-up), the candidates interleaved over ``rounds`` rounds in one process, and prints the median
seconds and the ratio to the first candidate (today's default) as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from consistent_diffusion.core.outputs import write_text_atomic
from consistent_diffusion.methods.base import default_guidance_rescale
from consistent_diffusion.models import set_scheduler
from consistent_diffusion.models.embedded import load_embedded_pipeline
from consistent_diffusion.models.sampling import DEFAULT_STEPS, EMBEDDED_SAMPLER
from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate, time_generation
from consistent_diffusion.training.recipes.evaluation.stats import wilson_interval

GUIDANCE = 5.0  # the model card's guidance (chosen on its tuning set)
TODAY = "ddim:30"  # the default before this choice: the ratio's denominator


def parse_candidates(text: str) -> list[tuple[str, int]]:
    """"ddim:30,dpm++:12" -> [("ddim", 30), ("dpm++", 12)]."""
    out = []
    for item in text.split(","):
        name, steps = item.strip().rsplit(":", 1)
        out.append((name, int(steps)))
    return out


def sampled_pipe(name: str):
    """The embedded pipeline with scheduler ``name`` swapped in (its config kept)."""
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return set_scheduler(pipe, name)


def fd_with_interval(generated_features: torch.Tensor, held: torch.Tensor, draws: int) -> dict:
    """FD of generated (N, D) to held-out real (M, D) features, 95% normal bootstrap interval over the N
    (FD +- 1.96 sd of the resampled FDs: resampling with replacement biases the FD itself upwards,
    so its percentiles would not cover the point estimate; its spread is what the interval needs)."""
    from consistent_diffusion.metrics.frechet import frechet_distance

    rng = np.random.default_rng(0)
    boot = [frechet_distance(generated_features[rng.integers(0, len(generated_features), len(generated_features))],
                             held) for _ in range(draws)]
    fd, spread = frechet_distance(generated_features, held), float(np.std(boot, ddof=1))
    return {"fd": round(fd, 2), "interval95": [round(fd - 1.96 * spread, 2), round(fd + 1.96 * spread, 2)],
            "bootstrap_sd": round(spread, 2), "draws": draws}


def measure(name: str, steps: int, args, dataset, styles, held_features, features) -> dict:
    """Every quality measure of one candidate (see the module docstring)."""
    from consistent_diffusion.training.recipes.evaluation.colour import colour_binding
    from consistent_diffusion.training.recipes.evaluation.probe_accuracy import probe_scores
    from consistent_diffusion.training.recipes.evaluation.prompts import prompt_set

    pipe = sampled_pipe(name)
    sampling = Sampling(steps, GUIDANCE, default_guidance_rescale(pipe) or 0.0)
    prompts = prompt_set(dataset, args.per_category, styles)
    generated = generate(pipe, prompts, sampling)
    probes = probe_scores(generated, prompts, None)
    correct = round(probes["style_accuracy"] * len(prompts))
    generated_features = features.embed(generated)
    torch.save(generated_features, args.out / f"{name}-{steps}.features.pt")  # for paired comparisons
    colour = colour_binding(pipe, dataset, styles, sampling, args.colour_seeds)
    return {
        "scheduler": name, "class": type(pipe.scheduler).__name__, "steps": steps, "images": len(prompts),
        "finite": bool(torch.isfinite(generated).all()),
        "style_accuracy": probes["style_accuracy"], "style_interval95": [round(x, 4) for x in
                                                                        wilson_interval(correct, len(prompts))],
        "category_accuracy": probes["category_accuracy"],
        "colour_binding": colour["accuracy"], "colour_interval95": colour["interval95"], "colour_images": colour["images"],
        "frechet": fd_with_interval(generated_features, held_features, args.fd_draws),
        "seconds_8_images_1_thread": round(time_generation(pipe, 1, sampling, steps=steps), 2),
    }


def quality(args) -> None:
    from consistent_diffusion.data.emoji import load_emoji_dataset
    from consistent_diffusion.metrics.common import as_batch
    from consistent_diffusion.metrics.extractors import load_features
    from consistent_diffusion.training.recipes.evaluation.prompts import heldout_rows, measured_styles

    dataset = load_emoji_dataset(args.data)
    styles = measured_styles(dataset, None, None)
    features = load_features("efficientnet-lite0")
    held = features.embed(as_batch(dataset.images[heldout_rows(dataset, styles)]))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, steps in parse_candidates(args.candidates):
        path = args.out / f"{name}-{steps}.json"
        if path.is_file():
            continue
        row = measure(name, steps, args, dataset, styles, held, features)
        write_text_atomic(json.dumps(row, indent=1), path)
        print(json.dumps(row), flush=True)
    write_text_atomic(quality_table(args.out), args.out / "quality.md")


def quality_table(folder: Path) -> str:
    """Markdown table of every OUT/*.json, today's default first, then by seconds."""
    rows = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    rows.sort(key=lambda r: (f"{r['scheduler']}:{r['steps']}" != TODAY, r["seconds_8_images_1_thread"]))
    lines = ["| scheduler | steps | s, 8 images, 1 thread | style probe (95%) | colour binding (95%) | FD (95%) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fd = r["frechet"]
        lines.append(f"| {r['class']} | {r['steps']} | {r['seconds_8_images_1_thread']:.2f} | "
                     f"{r['style_accuracy']:.1%} [{r['style_interval95'][0]:.1%}, {r['style_interval95'][1]:.1%}] | "
                     f"{r['colour_binding']:.1%} [{r['colour_interval95'][0]:.1%}, {r['colour_interval95'][1]:.1%}] | "
                     f"{fd['fd']:.1f} [{fd['interval95'][0]:.1f}, {fd['interval95'][1]:.1f}] |")
    return "\n".join(lines) + "\n"


def retime(args) -> None:
    candidates = parse_candidates(args.candidates)
    pipes = {name: sampled_pipe(name) for name, _ in candidates}
    seconds: dict[tuple[str, int], list[float]] = {c: [] for c in candidates}
    for _ in range(args.rounds):
        for name, steps in candidates:
            pipe = pipes[name]
            sampling = Sampling(steps, GUIDANCE, default_guidance_rescale(pipe) or 0.0)
            seconds[(name, steps)].append(time_generation(pipe, 1, sampling, steps=steps, images=args.images))
    base = statistics.median(seconds[candidates[0]])
    print(f"| scheduler | steps | s, {args.images} images, 1 thread (median of {args.rounds}) | ratio to {candidates[0][0]} "
          f"{candidates[0][1]} |\n|---|---|---|---|")
    for (name, steps), values in seconds.items():
        median = statistics.median(values)
        print(f"| {type(pipes[name].scheduler).__name__} | {steps} | {median:.2f} | {median / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--data", required=True, type=Path, help="emoji dataset folder")
    q.add_argument("--out", required=True, type=Path, help="folder for the per-candidate JSON and quality.md")
    q.add_argument("--candidates", default=f"{TODAY},{EMBEDDED_SAMPLER}:{DEFAULT_STEPS}")
    q.add_argument("--per-category", type=int, default=2, help="identities per category x styles")
    q.add_argument("--colour-seeds", type=int, default=2, help="seeds per (colour, style)")
    q.add_argument("--fd-draws", type=int, default=50, help="bootstrap draws of the FD interval")
    r = sub.add_parser("retime")
    r.add_argument("--candidates", default=f"{TODAY},{EMBEDDED_SAMPLER}:{DEFAULT_STEPS}")
    r.add_argument("--images", type=int, default=8)
    r.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quality(args) if args.command == "quality" else retime(args)


if __name__ == "__main__":
    main()
