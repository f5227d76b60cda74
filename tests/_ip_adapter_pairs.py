"""A tiny emoji-shaped dataset (4 trained + 2 held-out styles, train / val / holdout identities) and a
tiny deterministic image encoder, for the embedded IP-Adapter recipe's tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TRAINED = ("google", "twitter", "openmoji", "fluent-flat")
HELDOUT = ("openmoji-line", "fluent-contrast")
NAMES = ("red heart", "grinning face", "pizza", "rocket", "cat face", "guitar", "onion", "lizard", "battery")
SPLITS = ("train",) * 6 + ("val", "val", "holdout")
ENCODER_DIM = 320  # methods.ip_adapter.embedded.ENCODER_DIM


def write_dataset(folder: Path, size: int = 32) -> Path:
    """images.npy (N, size, size, 3) uint8 + labels.json: every identity in every style; the style sets
    the background colour, the identity the shape, so both are visible to an encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    records, images = [], []
    for s, style in enumerate(TRAINED + HELDOUT):
        for k, (name, split) in enumerate(zip(NAMES, SPLITS, strict=True)):
            image = np.full((size, size, 3), 40 * s + 20, dtype=np.uint8)
            side = 3 + k
            image[size // 2 - side : size // 2 + side, size // 2 - side // 2 : size // 2 + side // 2] = (200, 30 * k, 90)
            images.append(image)
            records.append({"style": style, "identity": f"id{k}", "name": name, "caption": f"{name}, {style} style",
                            "split": split, "style_split": "heldout" if style in HELDOUT else "trained",
                            "category": "Objects"})
    meta = {"styles": list(TRAINED + HELDOUT), "heldout_styles": list(HELDOUT), "categories": ["Objects"]}
    (folder / "labels.json").write_text(json.dumps({"meta": meta, "records": records}), encoding="utf-8")
    np.save(folder / "images.npy", np.stack(images))
    return folder


class TinyEncoder:
    """Deterministic features (n, 320), the real encoder's width: per-channel means and stds of two
    image quadrants (12 numbers) times a fixed random (12, 320) matrix."""

    def __init__(self) -> None:
        self.matrix = torch.randn(12, ENCODER_DIM, generator=torch.Generator().manual_seed(0))

    def encode(self, images) -> torch.Tensor:
        from consistent_diffusion.metrics.common import as_batch

        batch = as_batch(images if hasattr(images, "shape") else list(images), size=None if hasattr(images, "shape") else 32)
        h = batch.shape[-1] // 2
        parts = [batch[..., :h, :h], batch[..., h:, h:]]
        stats = torch.cat([torch.cat([p.mean((2, 3)), p.std((2, 3))], 1) for p in parts], 1)
        return stats @ self.matrix


def tiny_encoder(device=None) -> TinyEncoder:
    return TinyEncoder()
