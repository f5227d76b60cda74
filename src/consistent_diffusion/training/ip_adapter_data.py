"""Paired training data for the embedded model's IP-Adapters, from the emoji dataset, and its caches.

The emoji dataset draws every identity in several styles, so a pair can carry one factor only:

- ``style`` pairs: prompt image emoji A in style S, target emoji B (B != A) in style S, caption the
  target's name WITHOUT a style word ("red heart"): the text gives the subject, the image must give
  the style.
- ``subject`` pairs: prompt image emoji A in style S1, target emoji A in style S2 (S2 != S1), caption
  ``"S2 style"`` WITHOUT the emoji's name: the text gives the style, the image must give the subject.

Only ``trainable`` rows take part (train split, trained styles): held-out styles (line art, high
contrast) and holdout / val identities are never a prompt image nor a target. Validation pairs are
made the same way from the val identities in trained styles (measured, never trained on).

Caches (computed once per dataset, reused by both adapters and on resume): the VAE posterior of
every row used (mean, std (N, 4, 16, 16)), the encoder's features (N, 320); the text
embeddings of the few thousand distinct captions are made by the task (seconds).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.data.emoji import EmojiDataset, is_trainable

CACHE_FORMAT = "consistent-diffusion/ip-adapter-cache/v1"


@dataclass(frozen=True)
class PairPools:
    """Targets and, for each, the rows that may be its prompt image, with the target's caption.

    targets: (T,) dataset rows; partners[i]: (k_i,) rows pairable with targets[i] (k_i >= 1);
    captions[i]: the caption of targets[i] under the pairing's rule."""

    pairing: str
    targets: np.ndarray
    partners: tuple[np.ndarray, ...]
    captions: tuple[str, ...]

    def sample(self, count: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``count`` random pairs: (target rows, prompt-image rows, captions); draws ``count`` target
        indices, then one partner index per pair, from ``generator``."""
        picks = torch.randint(0, len(self.targets), (count,), generator=generator).numpy()
        choice = torch.rand(count, generator=generator).numpy()
        partners = np.asarray([self.partners[i][int(c * len(self.partners[i]))] for i, c in zip(picks, choice, strict=True)])
        return self.targets[picks], partners, [self.captions[i] for i in picks]


def pair_caption(record: dict, pairing: str) -> str:
    """The target's caption: its name (style pairs) or ``"<style> style"`` (subject pairs)."""
    if pairing == "style":
        return str(record["name"])
    if pairing == "subject":
        return f"{record['style']} style"
    raise ConfigError(f"unknown pairing {pairing!r}; choose style or subject")


def usable_rows(records: list[dict], split: str) -> list[int]:
    """Rows of ``split`` in trained styles (``data.emoji.is_trainable``): never a held-out style."""
    return [i for i, r in enumerate(records) if is_trainable(r, split)]


def pair_pools(records: list[dict], pairing: str, split: str = "train") -> PairPools:
    """Every target of ``split`` (trained styles) with its possible prompt images under ``pairing``."""
    rows = usable_rows(records, split)
    if pairing == "style":
        key, other = "style", "identity"
    elif pairing == "subject":
        key, other = "identity", "style"
    else:
        raise ConfigError(f"unknown pairing {pairing!r}; choose style or subject")
    groups: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        groups[records[row][key]].append(row)
    targets, partners, captions = [], [], []
    for row in rows:
        mates = [m for m in groups[records[row][key]] if records[m][other] != records[row][other]]
        if mates:
            targets.append(row)
            partners.append(np.asarray(mates, dtype=np.int64))
            captions.append(pair_caption(records[row], pairing))
    if not targets:
        raise ConfigError(f"no {pairing} pairs in split {split!r} (each needs two rows that share the {key})")
    return PairPools(pairing, np.asarray(targets, dtype=np.int64), tuple(partners), tuple(captions))


def fixed_pairs(pools: PairPools, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` pairs drawn once with ``seed`` (the validation set: the same at every checkpoint)."""
    return pools.sample(count, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- caches


def dataset_fingerprint(folder: Path) -> str:
    """Hash of the dataset's labels (the rows' order and captions): a cache is valid for it only."""
    return hashlib.sha256((Path(folder) / "labels.json").read_bytes()).hexdigest()[:16]


def cached_rows(records: list[dict]) -> np.ndarray:
    """Rows the caches hold: train and val identities in trained styles."""
    return np.asarray(usable_rows(records, "train") + usable_rows(records, "val"), dtype=np.int64)


@torch.no_grad()
def build_cache(pipe: Any, dataset: EmojiDataset, fingerprint: str, encoder: Any, log: Any = print,
                batch: int = 64) -> dict[str, Any]:
    """VAE posteriors and encoder features of ``cached_rows``: {"format", "dataset", "rows" (N,),
    "mean", "std" (N, 4, h, w), "scaling_factor", "features" (N, D)}."""
    from PIL import Image

    from consistent_diffusion.training.diffusion import encode_images

    rows = cached_rows(dataset.records)
    means, stds, features = [], [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pixels = np.asarray(dataset.images[chunk])
        latents = encode_images(pipe, [Image.fromarray(p) for p in pixels])
        means.append(latents.mean)
        stds.append(latents.std)
        features.append(encoder.encode(pixels))
        if log is not None and (start // batch) % 20 == 0:
            log(f"ip-adapter cache: {start + len(chunk)}/{len(rows)} rows")
    return {"format": CACHE_FORMAT, "dataset": fingerprint, "rows": torch.from_numpy(rows),
            "mean": torch.cat(means), "std": torch.cat(stds), "scaling_factor": latents.scaling_factor,
            "features": torch.cat(features)}


def load_or_build_cache(path: Path, pipe: Any, data: Path, dataset: EmojiDataset, encoder_factory: Any,
                        log: Any = print) -> dict[str, Any]:
    """The cache at ``path`` when it was made from this dataset, else built and saved (atomic)."""
    from consistent_diffusion.core.outputs import atomic_torch_save

    fingerprint = dataset_fingerprint(data)
    if path.is_file():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache.get("format") == CACHE_FORMAT and cache.get("dataset") == fingerprint:
            return cache
        raise ConsistentDiffusionError(f"{path} was made from another dataset; delete it or give another --cache")
    cache = build_cache(pipe, dataset, fingerprint, encoder_factory(), log=log)
    atomic_torch_save(cache, path)
    return cache
