"""Probes: small image classifiers trained on real emoji, used to measure generated images.

- ``style``: which house style drew an image (google / twitter ...).
- ``content``: which category (Smileys & Emotion, Animals & Nature ...), through a unit-norm
  embedding trained with an identity head too, so nearest neighbours in it share identity across
  styles (``embed``).

Both take images (B, 3, 64, 64) in [-1, 1] (pixel space) or PIL images. Weights ship in
``assets/probes/<name>.safetensors`` with ``<name>.json`` (labels, sizes, held-out accuracy).
Trained on the dataset's train split only; accuracies are measured on the val split, whose
identities the probes never saw.

Inference only: training (augmentation, loop, held-out evaluation, writer) lives in
``consistent_diffusion.training.recipes.probes``. Registers ``probe-style`` and ``probe-content``:
the probe's unit embedding as a feature extractor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ModelNotFoundError
from consistent_diffusion.metrics.extractors.registry import FeatureExtractor, register_features

PROBES_DIR = ASSETS_DIR / "probes"
PROBE_NAMES = ("style", "content")
PROBE_SIZE = 64


class ConvEncoder(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> (B, width * 4) features: 4 stride-2 conv stages, global pool."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width, width * 2, width * 4, width * 4]
        for cin, cout in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out_features = channels[-1] * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


class Probe(nn.Module):
    """Encoder -> unit embedding (B, embed_dim) -> logits (B, num_labels) (+ optional identity logits)."""

    def __init__(self, num_labels: int, width: int = 32, embed_dim: int = 64, num_identities: int = 0) -> None:
        super().__init__()
        self.encoder = ConvEncoder(width)
        self.project = nn.Linear(self.encoder.out_features, embed_dim)
        self.head = nn.Linear(embed_dim, num_labels)
        self.identity_head = nn.Linear(embed_dim, num_identities) if num_identities else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, embed_dim), L2-normalised."""
        return F.normalize(self.project(self.encoder(x)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> label logits (B, num_labels)."""
        return self.head(self.embed(x) * 8.0)


def to_probe_input(images: torch.Tensor | list[Image.Image]) -> torch.Tensor:
    """PIL images or (B, 3, H, W) in [-1, 1] -> (B, 3, 64, 64) float32 in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        arrays = [np.asarray(im.convert("RGB").resize((PROBE_SIZE, PROBE_SIZE), Image.Resampling.BICUBIC))
                  for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != PROBE_SIZE or x.shape[-2] != PROBE_SIZE:
        x = F.interpolate(x, size=(PROBE_SIZE, PROBE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_probe(name: str, folder: str | os.PathLike | None = None) -> tuple[Probe, dict]:
    """(model in eval mode, float32; metadata with ``labels``) of a shipped probe."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder else PROBES_DIR
    weights, meta_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ModelNotFoundError(
            f"probe {name!r} is not present in {folder}; train it with: "
            "consistent-diffusion train probes --data DIR"
        )
    meta = json.loads(meta_path.read_text())
    config = meta["config"]
    model = Probe(len(meta["labels"]), config["width"], config["embed_dim"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return model.eval(), meta


@torch.no_grad()
def predict(model: Probe, images: torch.Tensor | list[Image.Image], batch: int = 256) -> torch.Tensor:
    """Class probabilities (B, num_labels) for images (B, 3, H, W) in [-1, 1] or PIL images."""
    x = to_probe_input(images)
    return torch.cat([model(x[s:s + batch]).softmax(1) for s in range(0, len(x), batch)])


@torch.no_grad()
def embed(model: Probe, images: torch.Tensor | list[Image.Image], batch: int = 256) -> torch.Tensor:
    """Unit embeddings (B, embed_dim) for images (B, 3, H, W) in [-1, 1] or PIL images."""
    x = to_probe_input(images)
    return torch.cat([model.embed(x[s:s + batch]) for s in range(0, len(x), batch)])


class ProbeExtractor(FeatureExtractor):
    """``probe-<name>``: a shipped probe's unit embedding (B, embed_dim) of 64 px inputs."""

    def __init__(self, probe: str, device="cpu", dtype=torch.float32, **options) -> None:
        super().__init__(device, dtype)
        self.model, self.meta = load_probe(probe, **options)
        self.model = self.model.to(self.device)

    def _embed(self, batch):
        return embed(self.model, batch.to(self.device))


for _probe in PROBE_NAMES:
    register_features(f"probe-{_probe}", f"the embedded model's {_probe} probe (unit embedding, 64 px)")(
        lambda device="cpu", dtype=torch.float32, _probe=_probe, **options: ProbeExtractor(
            _probe, device, dtype, **options))
