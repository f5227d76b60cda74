#!/usr/bin/env python
"""New subject: how well each method renders an identity the model never saw.

Takes one holdout identity of an emoji dataset (never in the base model's training), uses its
images (one per house style) as the references, and compares, with the same prompts and seeds:
plain prompt (the identity's name), img2img from a reference, full DreamBooth, and LoRA DreamBooth
with and without prior preservation. Metrics (``metrics.consistency``): object consistency to the
references, text alignment to "<name>, <style> style", diversity. Writes OUT/bench_dreambooth.{json,md}.

    python scripts/bench_dreambooth.py --model embedded --data runs/emoji --out runs/bench_dreambooth
    python scripts/bench_dreambooth.py --model tiny --data runs/emoji --steps 2 --sample-steps 2 --seeds 0  # smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def load_model(spec: str):
    import torch

    if spec == "tiny":
        from consistent_diffusion.testing import tiny_sd_pipeline

        return tiny_sd_pipeline()
    from consistent_diffusion.models import load_pipeline

    return load_pipeline(spec, dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", required=True, help="emoji dataset folder")
    parser.add_argument("--identity", default=None, help="holdout identity code (default: the first holdout one)")
    parser.add_argument("--instance-prompt", default="sks emoji")
    parser.add_argument("--class-prompt", default="emoji")
    parser.add_argument("--steps", type=int, default=300, help="training steps per fine-tuning method")
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-class-images", type=int, default=32)
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dreambooth"))
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    from consistent_diffusion.data.emoji import load_emoji_dataset
    from consistent_diffusion.errors import ModelNotFoundError
    from consistent_diffusion.methods.img2img import Img2Img
    from consistent_diffusion.methods.lora import LoRA
    from consistent_diffusion.metrics.consistency import diversity, object_consistency, text_alignment
    from consistent_diffusion.series import SeriesConfig, generate_series
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora

    dataset = load_emoji_dataset(args.data)
    holdout = [r for r in dataset.records if r["split"] == "holdout"]
    identity = args.identity or holdout[0]["identity"]
    rows = [i for i, r in enumerate(dataset.records) if r["identity"] == identity]
    if not rows or dataset.records[rows[0]]["split"] != "holdout":
        raise SystemExit(f"identity {identity!r} is not a holdout identity of {args.data}")
    name = dataset.records[rows[0]]["name"]
    styles = [dataset.records[i]["style"] for i in rows]
    references = [Image.fromarray(dataset.images[i]) for i in rows]
    work = Path(tempfile.mkdtemp(prefix="bench-dreambooth-"))
    instance_dir = work / "instance"
    instance_dir.mkdir()
    for style, image in zip(styles, references, strict=True):
        image.save(instance_dir / f"{identity}_{style}.png")

    def series(pipe, prompts, methods=()):
        config = SeriesConfig(prompts=tuple(prompts), seeds=tuple(args.seeds), steps=args.sample_steps,
                              guidance_scale=args.guidance, batch_size=8)
        return generate_series(pipe, config, list(methods), progress=False).images

    token_prompts = [f"{args.instance_prompt}, {style} style" for style in styles]
    name_prompts = [f"{name}, {style} style" for style in styles]
    base = load_model(args.model)
    variants: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def metric(compute):
        """A metric's aggregate, or None where its extractor is not installed (reported as n/a)."""
        try:
            return compute().aggregate
        except ModelNotFoundError as error:
            print(f"metric unavailable: {error}", flush=True)
            return None

    def record(label: str, images, train_seconds: float = 0.0) -> None:
        captions = [p for p in name_prompts for _ in args.seeds]
        variants[label] = {
            "object_consistency": metric(lambda: object_consistency(images, references)),
            "text_alignment": metric(lambda: text_alignment(images, captions)),
            "diversity": metric(lambda: diversity(images)),
            "train_seconds": round(train_seconds, 1),
        }
        grid = work / f"{label.replace(' ', '_')}.png"
        from consistent_diffusion.images import contact_sheet

        contact_sheet(images, columns=len(args.seeds)).save(grid)
        print(label, variants[label], flush=True)

    record("plain prompt", series(base, name_prompts))
    record(f"img2img (strength {args.strength})", series(base, name_prompts, [Img2Img(image=references[0], strength=args.strength)]))

    common = dict(instance_dir=instance_dir, instance_prompt=args.instance_prompt, class_prompt=args.class_prompt,
                  steps=args.steps, checkpoint_every=max(args.steps, 1), progress=False, num_class_images=args.num_class_images,
                  class_steps=args.sample_steps, class_images_dir=work / "class_images")
    for prior in (False, True):
        began = time.perf_counter()
        pipe = load_model(args.model)
        result = train_lora(LoraDreamBoothConfig(out=work / f"lora_{prior}", prior_preservation=prior, rank=args.rank,
                                                 learning_rate=args.lr_lora, **common), pipe)
        timings[f"lora_{prior}"] = time.perf_counter() - began
        record(f"LoRA DreamBooth{' + prior' if prior else ''}",
               series(base, token_prompts, [LoRA(weights=str(result.result))]), timings[f"lora_{prior}"])
    for prior in (False, True):
        began = time.perf_counter()
        pipe = load_model(args.model)
        train_dreambooth(DreamBoothConfig(out=work / f"db_{prior}", prior_preservation=prior,
                                          learning_rate=args.lr_full, **common), pipe)
        seconds = time.perf_counter() - began
        record(f"DreamBooth{' + prior' if prior else ''}", series(pipe, token_prompts), seconds)
        del pipe

    lines = ["| method | object consistency to references | text alignment | diversity | training (s) |",
             "|---|---:|---:|---:|---:|"]
    for label, values in variants.items():
        cells = [("n/a" if values[k] is None else f"{values[k]:.3f}")
                 for k in ("object_consistency", "text_alignment", "diversity")]
        lines.append(f"| {label} | {' | '.join(cells)} | {values['train_seconds']:.0f} |")
    lines += ["", f"Model `{args.model}`; new subject: holdout identity `{identity}` ({name}), references: its "
              f"{', '.join(styles)} images; {len(args.seeds)} seeds x {len(styles)} prompts per method, "
              f"{args.sample_steps} sampling steps, guidance {args.guidance}; fine-tuning {args.steps} steps "
              f"(LoRA rank {args.rank}, lr {args.lr_lora:g}; full lr {args.lr_full:g}; "
              f"{args.num_class_images} class images for prior preservation)."]
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dreambooth.json").write_text(json.dumps({"identity": identity, "name": name,
                                                               "variants": variants, "work": str(work)}, indent=2))
    (args.out / "bench_dreambooth.md").write_text(markdown)
    print(markdown)
    print(f"contact sheets: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
