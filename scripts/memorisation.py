#!/usr/bin/env python
"""Does the UNet memorise? Seed diversity, copies of training images and novel names, per hand-off.

    python scripts/memorisation.py --data DATA --run RUN --handoff A.pt [--handoff B.pt ...] \\
        --out stages/embedded-v2/memorisation.json [--identities 24] [--seeds 4] [--threads 2]

RUN is a `train base` UNet run folder (its caches and pipeline/ give the text encoder, the VAE,
the UNet's shape and the validation latents); each hand-off's EMA weights replace the UNet in turn
(raw weights where a hand-off has no EMA). Every checkpoint is sampled with the same prompts and
seeds (30 DDIM steps, guidance 5, rescale 0.7) on three prompt sets of ``--identities`` each:

- ``named``: train-split identities as "<name>, <style> style" (a trained style, in turn);
- ``unnamed``: the same identities as "<name>" (the 25% of captions without a style word);
- ``novel``: validation identities (never trained on) as "<name>, <style> style".

Per set, with a 95% bootstrap interval over prompts (``bench.stats.bootstrap_interval``):

- ``diversity``: mean pairwise RMS pixel distance (images in [0, 1]) between the seeds of a prompt;
  0 when every seed gives the same picture;
- ``nearest_rms``: RMS distance of each image to its nearest training image (trainable rows of the
  train split); ``copy_rate``: the share of images nearer than ``COPY_RMS`` (0.05 RMS, about 26 dB
  PSNR: the same picture up to VAE-level detail);
- ``unnamed`` adds ``styles_per_prompt``: distinct styles of the seeds' nearest training images
  (1 when every seed takes one style; up to the seed count);
- ``novel`` adds ``closer_to_truth``: the share of images nearer to the real image of their own
  (never trained) identity and style than to any training image: a name generalised, not a
  training image recalled.

Also the validation loss of the EMA and raw weights (the training loop's protocol: min-SNR v-MSE
on 64 validation latents, fixed noise and timesteps). Writes OUT (json) and OUT's .png sibling:
the first four named, unnamed and novel prompts, one row of seeds per checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

COPY_RMS = 0.05
PROMPT_SEED = 9100  # seeds: PROMPT_SEED + k for seed k of every prompt (the same across checkpoints)


def _prompt_sets(dataset, identities: int) -> dict[str, list[dict]]:
    from consistent_diffusion.training.recipes.evaluation.prompts import eligible_identities

    styles = dataset.trained_styles
    rng = np.random.default_rng(0)
    pool = [r for records in eligible_identities(dataset).values() for r in records]
    train = [pool[i] for i in rng.permutation(len(pool))[:identities]]
    val_rows = dataset.trainable("val")
    seen, novel = set(), []
    for i in rng.permutation(len(val_rows)):
        record = dataset.records[int(val_rows[i])]
        if record["identity"] not in seen:
            seen.add(record["identity"])
            novel.append(record)
        if len(novel) == identities:
            break
    named = [{"prompt": f"{r['name']}, {styles[k % len(styles)]} style", "identity": r["identity"],
              "style": styles[k % len(styles)]} for k, r in enumerate(train)]
    unnamed = [{"prompt": r["name"], "identity": r["identity"], "style": None} for r in train]
    truth = [{"prompt": f"{r['name']}, {r['style']} style", "identity": r["identity"], "style": r["style"]}
             for r in novel]
    return {"named": named, "unnamed": unnamed, "novel": truth}


def _flat(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 3*H*W) in [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1).flatten(1)


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise RMS distance (len(a), len(b)) of flat images in [0, 1]."""
    return (torch.cdist(a.double(), b.double()) / a.shape[1] ** 0.5).float()


def _interval(values: list[float] | np.ndarray) -> dict:
    from consistent_diffusion.bench.stats import bootstrap_interval

    interval = bootstrap_interval([list(map(float, values))])
    return {"mean": round(interval.mean, 4), "low": round(interval.low, 4), "high": round(interval.high, 4),
            "n": interval.samples}


def _measure_set(name: str, prompts: list[dict], images: torch.Tensor, seeds: int, gallery: torch.Tensor,
                 gallery_styles: np.ndarray, truth: torch.Tensor | None) -> dict:
    flat = _flat(images).view(len(prompts), seeds, -1)
    diversity = []
    for group in flat:
        d = _rms(group, group)
        diversity.append(float(d[~torch.eye(seeds, dtype=torch.bool)].mean()))
    distances = torch.cat([_rms(chunk, gallery) for chunk in flat.flatten(0, 1).split(64)])
    nearest, index = distances.min(dim=1)
    result = {"diversity": _interval(diversity), "nearest_rms": _interval(nearest.numpy()),
              "copy_rate": _interval((nearest < COPY_RMS).float().numpy())}
    if name == "unnamed":
        styles = gallery_styles[index.numpy()].reshape(len(prompts), seeds)
        result["styles_per_prompt"] = _interval([len(set(row)) for row in styles])
    if truth is not None:
        own = (flat - truth[:, None]).pow(2).mean(-1).sqrt().flatten()
        result["closer_to_truth"] = _interval((own < nearest).float().numpy())
    return result


def _load_weights(unet, handoff: dict, kind: str) -> None:
    """A hand-off's ``kind`` weights (trainable | ema; float16) into ``unet`` as float32."""
    unet.load_state_dict({k: v.float() for k, v in handoff[kind]["unet"].items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the emoji dataset the run trains on")
    parser.add_argument("--run", required=True, type=Path, help="a `train base` UNet run folder (caches, pipeline/)")
    parser.add_argument("--vae-from", type=Path, default=Path("stages/embedded-v2/vae"))
    parser.add_argument("--handoff", required=True, type=Path, action="append", help="a UNet hand-off (repeat)")
    parser.add_argument("--out", required=True, type=Path, help="the results json (a .png sheet beside it)")
    parser.add_argument("--identities", type=int, default=24, help="prompts per set")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from consistent_diffusion.core.images import contact_sheet, save_png_atomic, tensor_to_pil
    from consistent_diffusion.core.outputs import write_json_atomic
    from consistent_diffusion.data.emoji import load_emoji_dataset
    from consistent_diffusion.metrics.common import as_batch
    from consistent_diffusion.models.embedded import load_embedded_pipeline
    from consistent_diffusion.training.checkpoints import load_handoff
    from consistent_diffusion.training.recipes.embedded import UNetTask, preset
    from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate

    start = time.perf_counter()
    dataset = load_emoji_dataset(args.data)
    sets = _prompt_sets(dataset, args.identities)
    rows = dataset.trainable("train")
    gallery = _flat(as_batch(dataset.images[rows]))
    gallery_styles = np.asarray([dataset.records[i]["style"] for i in rows])
    position = {(r["identity"], r["style"]): i for i, r in enumerate(dataset.records)}
    truth = _flat(as_batch(dataset.images[[position[(p["identity"], p["style"])] for p in sets["novel"]]]))
    pipe = load_embedded_pipeline(folder=args.run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    task = UNetTask(preset("cpu", args.data, args.run, pretrained_vae=args.vae_from), args.run / "cache")
    sampling = Sampling(30, 5.0, 0.7)
    results = {"sampling": {"steps": 30, "guidance": 5.0, "rescale": 0.7}, "seeds": args.seeds,
               "identities": args.identities, "copy_rms": COPY_RMS, "checkpoints": []}
    sheet_rows = []
    for path in args.handoff:
        handoff = load_handoff(path, "embedded-unet")
        entry = {"step": int(handoff["step"])}
        for kind in ("trainable", "ema"):
            if handoff.get(kind):
                _load_weights(task.modules["unet"], handoff, kind)
                entry[f"validation_loss_{'raw' if kind == 'trainable' else 'ema'}"] = task.validate(0, path)["loss"]
        entry["weights"] = "ema" if handoff.get("ema") else "raw"
        _load_weights(pipe.unet, handoff, "ema" if handoff.get("ema") else "trainable")
        for name, prompts in sets.items():
            items = [{"prompt": p["prompt"], "seed": PROMPT_SEED + s} for p in prompts for s in range(args.seeds)]
            images = generate(pipe, items, sampling)
            entry[name] = _measure_set(name, prompts, images, args.seeds, gallery, gallery_styles,
                                       truth if name == "novel" else None)
            sheet_rows.append(images.view(len(prompts), args.seeds, *images.shape[1:])[:4].flatten(0, 1))
        results["checkpoints"].append(entry)
        print(entry["step"], {k: entry[k] for k in entry if k.startswith("validation")},
              {n: {m: entry[n][m]["mean"] for m in entry[n]} for n in sets}, flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(results, args.out)
    columns = 4 * args.seeds
    grid = torch.cat([torch.cat(sheet_rows[i:i + len(sets)]) for i in range(0, len(sheet_rows), len(sets))])
    labels = [f"{entry['step']} {name}" for entry in results["checkpoints"] for name in sets for _ in range(columns)]
    save_png_atomic(contact_sheet(tensor_to_pil(grid), columns, labels), args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
