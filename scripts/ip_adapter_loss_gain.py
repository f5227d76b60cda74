#!/usr/bin/env python
"""What the prompt image contributes to an embedded IP-Adapter's denoising, on three sets of pairs.

    python scripts/ip_adapter_loss_gain.py --data DATA --cache CACHE --state RUN/checkpoints/step_N.pt \\
        --pairing style [--pairs 128] [--noise-draws 4] [--out GAIN.json]

For each set, the training loss (v-MSE, min-SNR-5) of the adapter given the prompt image and given
the zero embedding (the unconditional one), with the same targets, noise and timesteps, averaged over
``--noise-draws`` draws; ``gain`` = zero - image (> 0: the image helps predict the target).

- ``train``: pairs drawn as training draws them (train identities, trained styles);
- ``val``: the same rule on val identities (never trained on);
- ``heldout_styles``: targets of train identities drawn in a held-out style (line art, high contrast),
  prompt images of never-trained identities in the same style (style pairs) or the target's identity
  in another style (subject pairs): neither the adapter nor the base model saw these styles.

The run's own ``val_gain`` (64 pairs, one noise draw) is too noisy to read early on; this is the
measurement to quote. A checkpoint or a hand-off file both work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def heldout_style_pairs(records: list[dict], styles: list[str], pairing: str, count: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(targets, prompt rows, captions) with targets of train identities in held-out styles."""
    rng = np.random.default_rng(seed)
    targets, partners, captions = [], [], []
    for k in range(count):
        style = styles[k % len(styles)]
        target = int(rng.choice([i for i, r in enumerate(records) if r["style"] == style and r["split"] == "train"]))
        if pairing == "style":
            pool = [i for i, r in enumerate(records) if r["style"] == style and r["split"] != "train"]
            caption = records[target]["name"]
        else:
            pool = [i for i, r in enumerate(records)
                    if r["identity"] == records[target]["identity"] and r["style"] != style]
            caption = f"{style} style"
        targets.append(target)
        partners.append(int(rng.choice(pool)))
        captions.append(caption)
    return np.asarray(targets), np.asarray(partners), captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--cache", required=True, type=Path, help="the run's cache (train ip-adapter --cache)")
    parser.add_argument("--state", required=True, type=Path, help="a checkpoint or hand-off of the run")
    parser.add_argument("--pairing", required=True, choices=("style", "subject"))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--noise-draws", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers here (JSON)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    from PIL import Image

    from consistent_diffusion.core.outputs import write_json_atomic
    from consistent_diffusion.data.emoji import load_emoji_dataset
    from consistent_diffusion.methods.ip_adapter.embedded import image_encoder
    from consistent_diffusion.models.embedded import load_embedded_pipeline
    from consistent_diffusion.training.diffusion import encode_images, encode_text
    from consistent_diffusion.training.ip_adapter import IPAdapterTask, IPAdapterTrainConfig
    from consistent_diffusion.training.ip_adapter_data import fixed_pairs, pair_pools

    pipe = load_embedded_pipeline()
    config = IPAdapterTrainConfig(out=Path(tempfile.mkdtemp(prefix="ip-gain-")), data=args.data, pairing=args.pairing,
                                  cache=args.cache, validation_pairs=0, progress=False)
    task = IPAdapterTask(pipe, config)
    state = torch.load(args.state, map_location="cpu", weights_only=args.state.name.endswith(".handoff.pt"))
    task.load_trainable_state({"adapter": {k: v.float() for k, v in state["trainable"]["adapter"].items()}})
    task.adapter.eval()
    dataset = load_emoji_dataset(args.data)
    sets = {"train": fixed_pairs(task.pools, args.pairs, 5),
            "val": fixed_pairs(pair_pools(dataset.records, args.pairing, "val"), args.pairs, 5),
            "heldout_styles": heldout_style_pairs(dataset.records, dataset.heldout_styles, args.pairing, args.pairs, 0)}
    # rows and captions the run's cache does not hold (held-out styles, holdout identities): encoded here
    missing = sorted({int(r) for t, p, _ in sets.values() for r in (*t, *p)} - set(task.position))
    if missing:
        latents = encode_images(pipe, [Image.fromarray(dataset.images[i]) for i in missing])
        features = image_encoder().encode(np.asarray(dataset.images[missing]))
        base = task.mean.shape[0]
        task.mean, task.std = torch.cat([task.mean, latents.mean]), torch.cat([task.std, latents.std])
        task.features = torch.cat([task.features, features])
        task.position.update({row: base + k for k, row in enumerate(missing)})
    captions = sorted({c for _, _, cs in sets.values() for c in cs} - set(task.caption_index))
    if captions:
        base = task.text.shape[0]
        task.text = torch.cat([task.text, encode_text(pipe, captions)[0].detach()])
        task.caption_index.update({c: base + k for k, c in enumerate(captions)})
    report = {"state": args.state.name, "step": int(state["step"]), "pairing": args.pairing, "pairs": args.pairs,
              "noise_draws": args.noise_draws, "sets": {}}
    with torch.no_grad():
        for name, (targets, partners, caps) in sets.items():
            losses = {"image": [], "zero": []}
            for draw in range(args.noise_draws):
                for side in losses:
                    features = task._features(partners)
                    features = features if side == "image" else torch.zeros_like(features)
                    generator = torch.Generator().manual_seed(1000 + draw)
                    latents = task._latents(targets, generator)
                    losses[side].append(float(task._prediction_loss(latents, features, caps, generator, torch.device("cpu"))))
            gains = np.asarray(losses["zero"]) - np.asarray(losses["image"])
            report["sets"][name] = {"image": float(np.mean(losses["image"])), "zero": float(np.mean(losses["zero"])),
                                    "gain": float(gains.mean()), "gain_per_draw": [round(float(g), 4) for g in gains]}
            print(f"step {report['step']} {name:15s} image {np.mean(losses['image']):.4f} zero {np.mean(losses['zero']):.4f} "
                  f"gain {gains.mean():+.4f} (per draw {', '.join(f'{g:+.4f}' for g in gains)})")
    if args.out is not None:
        write_json_atomic(report, args.out)


if __name__ == "__main__":
    main()
