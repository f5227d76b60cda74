#!/usr/bin/env python
"""New subject: how well each method renders an identity the model never saw.

For each holdout identity of an emoji dataset (never in the base model's training), its images
(one per house style) are the references. With the same prompts and seeds the script compares:
plain prompt (the identity's name), img2img from a reference, full DreamBooth and LoRA DreamBooth,
each with and without prior preservation. Fine-tuned models are called with
"<instance prompt>, <name>, <style> style"; every method is scored against "<name>, <style>
style" (``metrics.consistency``): object consistency to the references, text alignment,
diversity. Writes OUT/bench_dreambooth.{json,md} (mean over identities, then per identity) and
one contact sheet per identity and method.

    python scripts/bench_dreambooth.py --model embedded --data runs/emoji --out runs/bench_dreambooth
    python scripts/bench_dreambooth.py --model tiny --data runs/emoji --steps 2 --sample-steps 2 --seeds 0  # smoke

The default identities are holdout emoji that the bench suites do not use, so settings chosen
here are not tuned on the bench's own references.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DEFAULT_IDENTITIES = ("1f499", "1f98e", "1f9c5")  # blue heart, lizard, onion: holdout, not in any bench suite
METRICS = ("object_consistency", "text_alignment", "diversity")


def load_model(spec: str):
    import torch

    if spec == "tiny":
        from consistent_diffusion.testing import tiny_sd_pipeline

        return tiny_sd_pipeline()
    from consistent_diffusion.models.loading import load_pipeline

    return load_pipeline(spec, dtype=torch.float32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", required=True, help="emoji dataset folder")
    parser.add_argument("--identities", nargs="+", default=list(DEFAULT_IDENTITIES), help="holdout identity codes")
    parser.add_argument("--instance-prompt", default="sks emoji")
    parser.add_argument("--class-prompt", default="emoji")
    parser.add_argument("--steps", type=int, default=300, help="training steps per fine-tuning method")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch size")
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-class-images", type=int, default=16)
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--variants", nargs="+", default=["plain", "img2img", "lora", "lora+prior", "dreambooth", "dreambooth+prior"],
                        help="which methods to run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dreambooth"))
    return parser.parse_args(argv)


def study_identity(args: argparse.Namespace, dataset, identity: str, work: Path) -> dict[str, dict]:
    """Every variant on one identity: {variant: {metric: value, "train_seconds": s}}."""
    from PIL import Image

    from consistent_diffusion.core.errors import ModelNotFoundError
    from consistent_diffusion.core.images import contact_sheet
    from consistent_diffusion.methods.dreambooth import DreamBooth
    from consistent_diffusion.methods.img2img import Img2Img
    from consistent_diffusion.methods.lora import LoRA
    from consistent_diffusion.metrics.consistency import diversity, object_consistency, text_alignment
    from consistent_diffusion.series import SeriesConfig, generate_series
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora

    rows = [i for i, r in enumerate(dataset.records) if r["identity"] == identity]
    if not rows or dataset.records[rows[0]]["split"] != "holdout":
        raise SystemExit(f"identity {identity!r} is not a holdout identity of {args.data}")
    name = dataset.records[rows[0]]["name"]
    styles = [dataset.records[i]["style"] for i in rows]
    references = [Image.fromarray(dataset.images[i]) for i in rows]
    instance_dir = work / identity / "instance"
    instance_dir.mkdir(parents=True)
    for style, image in zip(styles, references, strict=True):
        image.save(instance_dir / f"{identity}_{style}.png")
    name_prompts = [f"{name}, {style} style" for style in styles]
    token_prompts = [f"{args.instance_prompt}, {prompt}" for prompt in name_prompts]
    captions = [p for p in name_prompts for _ in args.seeds]
    base = load_model(args.model)

    def metric(compute):
        try:
            return compute().aggregate
        except ModelNotFoundError as error:  # an extractor that is not installed: reported as n/a
            print(f"metric unavailable: {error}", flush=True)
            return None

    def run(label: str, prompts, methods=(), train_seconds: float = 0.0) -> dict:
        config = SeriesConfig(prompts=tuple(prompts), seeds=tuple(args.seeds), steps=args.sample_steps,
                              guidance_scale=args.guidance, batch_size=8)
        images = generate_series(base, config, list(methods), progress=False).images
        contact_sheet(images, columns=len(args.seeds)).save(work / identity / f"{label}.png")
        values = {"object_consistency": metric(lambda: object_consistency(images, references)),
                  "text_alignment": metric(lambda: text_alignment(images, captions)),
                  "diversity": metric(lambda: diversity(images)), "train_seconds": round(train_seconds, 1)}
        print(identity, label, values, flush=True)
        return values

    def train(kind: str, prior: bool):
        common = dict(instance_dir=instance_dir, instance_prompt=args.instance_prompt, class_prompt=args.class_prompt,
                      prior_preservation=prior, steps=args.steps, batch_size=args.batch_size,
                      checkpoint_every=args.steps, progress=False, num_class_images=args.num_class_images,
                      class_steps=args.sample_steps, class_guidance=args.guidance, class_images_dir=work / "class_images",
                      out=work / identity / f"{kind}_{'prior' if prior else 'noprior'}")
        began = time.perf_counter()
        if kind == "lora":
            result = train_lora(LoraDreamBoothConfig(rank=args.rank, learning_rate=args.lr_lora, **common), load_model(args.model))
            return LoRA(weights=str(result.result)), time.perf_counter() - began
        result = train_dreambooth(DreamBoothConfig(learning_rate=args.lr_full, **common), load_model(args.model))
        return DreamBooth(model=str(result.out)), time.perf_counter() - began

    variants: dict[str, dict] = {}
    for variant in args.variants:
        if variant == "plain":
            variants[variant] = run(variant, name_prompts)
        elif variant == "img2img":
            variants[variant] = run(variant, name_prompts, [Img2Img(image=references[0], strength=args.strength)])
        else:
            kind, _, prior = variant.partition("+")
            method, seconds = train(kind, bool(prior))
            variants[variant] = run(variant, token_prompts, [method], seconds)
    return {"name": name, "variants": variants}


def _table(variants: dict[str, dict]) -> list[str]:
    lines = ["| method | object consistency to references | text alignment | diversity | training (s) |",
             "|---|---:|---:|---:|---:|"]
    for label, values in variants.items():
        cells = ["n/a" if values[k] is None else f"{values[k]:.3f}" for k in METRICS]
        lines.append(f"| {label} | {' | '.join(cells)} | {values['train_seconds']:.0f} |")
    return lines


def mean_over_identities(results: dict[str, dict]) -> dict[str, dict]:
    """variant -> metric -> mean over the identities where it was measured (None: never)."""
    labels = dict.fromkeys(label for study in results.values() for label in study["variants"])
    means: dict[str, dict] = {}
    for label in labels:
        for key in (*METRICS, "train_seconds"):
            values = [study["variants"][label][key] for study in results.values()
                      if label in study["variants"] and study["variants"][label][key] is not None]
            means.setdefault(label, {})[key] = sum(values) / len(values) if values else None
    return means


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sheets-", dir=args.out))
    results = {identity: study_identity(args, dataset, identity, work) for identity in args.identities}
    mean = mean_over_identities(results)
    lines = [f"Mean over {len(results)} new subjects:", "", *_table(mean)]
    for identity, study in results.items():
        lines += ["", f"`{identity}` ({study['name']}):", "", *_table(study["variants"])]
    lines += ["", f"Model `{args.model}`; references: each identity's google and twitter images; {len(args.seeds)} seeds "
              f"x 2 prompts per method, {args.sample_steps} sampling steps, guidance {args.guidance}; fine-tuning "
              f"{args.steps} steps at batch {args.batch_size} (LoRA rank {args.rank}, lr {args.lr_lora:g}; full lr "
              f"{args.lr_full:g}; {args.num_class_images} class images of '{args.class_prompt}' for prior preservation); "
              f"fine-tuned models are prompted '{args.instance_prompt}, <name>, <style> style'; img2img strength {args.strength}."]
    markdown = "\n".join(lines) + "\n"
    (args.out / "bench_dreambooth.json").write_text(json.dumps(
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "mean": mean, "identities": results}, indent=2))
    (args.out / "bench_dreambooth.md").write_text(markdown)
    print(markdown)
    print(f"contact sheets: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
