"""Training of the metric heads shipped in ``assets/metrics/emoji_heads.safetensors``
(``consistent-diffusion metrics train-heads``); the heads themselves (inference) are
``consistent_diffusion.metrics.extractors.heads``.

- style head: supervised contrastive loss (Khosla et al. 2020, L_out) on house-style labels, every
  batch holding each of its emoji in every trained style (content varied: CSD's recipe);
- object head: the same loss on identity labels, the same batches (style varied);
- text head: symmetric InfoNCE (CLIP, Radford et al. 2021) against frozen MiniLM caption embeddings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.data.emoji import trainable_rows
from consistent_diffusion.metrics.common import normalize
from consistent_diffusion.metrics.extractors.heads import (
    HEAD_IMAGE_SIZE,
    INT8_SCALE_SUFFIX,
    MLPHead,
    content_input,
    head_inputs,
    minilm_sentence_embeddings,
    quantize_rows_int8,
    style_input,
)
from consistent_diffusion.metrics.extractors.pretrained import EfficientNetLite0


@dataclass
class HeadTrainingConfig:
    """How the heads are trained (fixed in advance; val/holdout are only used for the report)."""

    style_steps: int = 1500  # optimiser steps of the style head
    object_steps: int = 1500  # optimiser steps of the object head
    text_steps: int = 1000  # optimiser steps of the text head
    identities_per_batch: int = 64  # style: each batch holds these emoji in every style
    text_batch: int = 256  # text: image-caption pairs per batch
    hidden: int = 512  # hidden width of the style head
    text_hidden: int = 0  # hidden width of the text head (0: linear; generalised best to unseen emoji)
    style_dim: int = 64  # style descriptor size
    object_dim: int = 128  # object descriptor size
    object_hidden: int = 512  # hidden width of the object head
    object_hard_batches: float = 0.5  # share of object batches filled subcategory by subcategory (hard negatives)
    object_layout: bool = True  # the object head also reads the layout grid (``layout_grid``)
    text_layout: bool = False  # the text head too (measured: no gain, +2.4 MB)
    lr: float = 1e-3
    weight_decay: float = 0.05  # style head
    text_weight_decay: float = 0.5  # text head (strong: 1,775 training emoji only)
    text_dropout: float = 0.3  # input dropout of the text head
    text_name_fraction: float = 0.5  # share of text targets replaced by the bare name (no style word)
    temperature: float = 0.1  # style SupCon temperature
    object_temperature: float = 0.1  # object SupCon temperature
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("style_steps", "object_steps", "text_steps", "identities_per_batch", "text_batch", "hidden",
                     "style_dim", "object_dim", "object_hidden"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer")
        if not 0 <= self.object_hard_batches <= 1 or not 0 <= self.text_name_fraction <= 1:
            raise ConfigError("object_hard_batches and text_name_fraction must be in [0, 1]")
        if self.text_hidden < 0 or not 0 <= self.text_dropout < 1:
            raise ConfigError("text_hidden must be >= 0 and text_dropout in [0, 1)")


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of unit vectors z (N, D)."""
    logits = z @ z.T / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    logits = logits.masked_fill(eye, -1e9)
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    return -((log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) of matched unit vectors: row i of ``image`` belongs to row i of ``text``."""
    logits = scale.exp() * image @ text.T
    targets = torch.arange(image.shape[0])
    return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2


def train_heads(inputs: dict[str, torch.Tensor], records: list[dict], config: HeadTrainingConfig,
                log=print, image_size: int = HEAD_IMAGE_SIZE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the style, object and text heads on the train-split rows of trained styles of ``inputs``
    (computed at ``image_size`` on whole images: foreground crops measured worse for the object head,
    val AUC 0.91 vs 0.95); return (tensors, metadata)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train = trainable_rows(records)  # train split, never a held-out style
    styles = sorted({records[i]["style"] for i in train})  # the trained styles: held-out ones are never a class
    style_index = {style: k for k, style in enumerate(styles)}
    style_ids = torch.tensor([style_index.get(r["style"], -1) for r in records])  # -1: a held-out style (unused)

    pixel_mean = inputs["pixel"][train].mean(0)
    pixel_std = inputs["pixel"][train].std(0).clamp_min(1e-3)
    x_style = style_input(inputs, pixel_mean, pixel_std)

    # --- style and object heads: batches of identities drawn in every trained style
    by_identity: dict[str, list[int]] = {}
    for i in train:
        by_identity.setdefault(records[i]["identity"], []).append(int(i))
    identities = [k for k, v in by_identity.items() if len(v) == len(styles)]
    identity_ids = _identity_ids(records, identities)
    x_object = content_input(inputs, layout=config.object_layout)
    x_text = content_input(inputs, layout=config.text_layout)
    style_head = _train_supcon_head("style", x_style, style_ids, identities, by_identity, train, config,
                                    config.style_dim, config.style_steps, rng, log, temperature=config.temperature)
    subcategory = {r["identity"]: r.get("subcategory", "") for r in records}
    object_head = _train_supcon_head("object", x_object, identity_ids, identities, by_identity, train, config,
                                     config.object_dim, config.object_steps, rng, log,
                                     groups=subcategory, hard_batches=config.object_hard_batches,
                                     temperature=config.object_temperature, hidden=config.object_hidden)

    # --- text head: image <-> MiniLM caption embeddings
    captions = [r["caption"] for r in records]
    text_targets = minilm_sentence_embeddings(captions)
    name_targets = minilm_sentence_embeddings([r.get("name", r["caption"]) for r in records])
    text_head = MLPHead(x_text.shape[1], config.text_hidden, text_targets.shape[1], dropout=config.text_dropout)
    text_head.mean.copy_(x_text[train].mean(0))
    text_head.std.copy_(x_text[train].std(0).clamp_min(1e-4))
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimiser = torch.optim.AdamW([*text_head.parameters(), scale], lr=config.lr,
                                  weight_decay=config.text_weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.text_steps)
    text_head.train()
    for step in range(config.text_steps):
        rows = torch.from_numpy(rng.choice(train, size=min(config.text_batch, len(train)), replace=False))
        image = text_head(x_text[rows])
        by_name = torch.from_numpy(rng.random(len(rows)) < config.text_name_fraction)[:, None]
        loss = clip_loss(image, torch.where(by_name, name_targets[rows], text_targets[rows]), scale)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            scale.clamp_(0, math.log(100))
        if step % 500 == 0 or step == config.text_steps - 1:
            log(f"text step {step}: loss {loss.item():.4f} scale {scale.exp().item():.1f}")
    text_head.eval()

    tensors = {"pixel_mean": pixel_mean, "pixel_std": pixel_std}
    for kind, head in (("style", style_head), ("object", object_head), ("text", text_head)):
        for key, value in head.state_dict().items():
            tensors[f"{kind}.{key}"] = value.detach().clone().contiguous()
    meta = {
        "format": "consistent-diffusion/metric-heads/v1",
        "image_size": int(image_size),
        "backbone": "efficientnet-lite0 (ImageNet, frozen)",
        "styles": styles,
        "heads": {
            "style": {"in_dim": x_style.shape[1], "hidden": config.hidden, "out_dim": config.style_dim},
            "object": {"in_dim": x_object.shape[1], "hidden": config.object_hidden, "out_dim": config.object_dim,
                       "foreground": False, "layout": config.object_layout},
            "text": {"in_dim": x_text.shape[1], "hidden": config.text_hidden, "out_dim": text_targets.shape[1],
                     "layout": config.text_layout},
        },
        "training": {**config.__dict__, "train_images": len(train), "train_identities": len(by_identity),
                     "identities_in_every_style": len(identities)},
    }
    return tensors, meta


def _identity_ids(records: list[dict], identities: list[str]) -> torch.Tensor:
    """Row -> index of its identity in ``identities`` (-1: not a training identity)."""
    index = {identity: k for k, identity in enumerate(identities)}
    return torch.tensor([index.get(r["identity"], -1) for r in records])


def _grouped_batch(by_group: dict[str, list[int]], names: list[str], size: int, rng: np.random.Generator
                   ) -> list[int]:
    """``size`` distinct identity indices taken group after random group (each group shuffled)."""
    chosen: list[int] = []
    for g in rng.permutation(len(names)):
        members = by_group[names[g]]
        chosen.extend(int(members[k]) for k in rng.permutation(len(members))[: size - len(chosen)])
        if len(chosen) >= size:
            break
    return chosen


def _train_supcon_head(kind: str, x: torch.Tensor, labels: torch.Tensor, identities: list[str],
                       by_identity: dict[str, list[int]], train: np.ndarray, config: HeadTrainingConfig,
                       out_dim: int, steps: int, rng: np.random.Generator, log,
                       groups: dict[str, str] | None = None, hard_batches: float = 0.0,
                       temperature: float = 0.1, hidden: int | None = None) -> MLPHead:
    """A ``MLPHead`` (x (N, D) -> unit (N, out_dim)) trained with ``supcon_loss`` on ``labels``, each
    batch holding ``identities_per_batch`` identities in every trained style; a ``hard_batches``
    share of batches is filled group by group (``groups``: identity -> subcategory), so look-alike
    emoji meet as negatives."""
    by_group: dict[str, list[int]] = {}
    for k, identity in enumerate(identities):
        by_group.setdefault((groups or {}).get(identity, ""), []).append(k)
    group_names = sorted(by_group)
    head = MLPHead(x.shape[1], hidden or config.hidden, out_dim)
    head.mean.copy_(x[train].mean(0))
    head.std.copy_(x[train].std(0).clamp_min(1e-4))
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    head.train()
    size = min(config.identities_per_batch, len(identities))
    for step in range(steps):
        if groups and rng.random() < hard_batches:
            chosen = _grouped_batch(by_group, group_names, size, rng)
        else:
            chosen = rng.choice(len(identities), size=size, replace=False)
        rows = torch.tensor([i for c in chosen for i in by_identity[identities[c]]])
        loss = supcon_loss(head(x[rows]), labels[rows], temperature)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"{kind} step {step}: loss {loss.item():.4f}")
    return head.eval()


@torch.inference_mode()
def retrieval_accuracy(image_emb: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)
                       ) -> dict[str, float]:
    """Image -> caption retrieval among the distinct captions of the set: top-k accuracy."""
    distinct = sorted(set(captions))
    text = minilm_sentence_embeddings(distinct)
    sims = normalize(image_emb) @ text.T
    truth = torch.tensor([distinct.index(c) for c in captions])
    ranks = (sims > sims.gather(1, truth[:, None])).sum(1)
    return {f"top{k}": float((ranks < k).float().mean()) for k in ks} | {"candidates": len(distinct)}


def dataset_head_inputs(data: str | os.PathLike, cache: str | os.PathLike | None = None, log=print,
                        image_size: int = HEAD_IMAGE_SIZE) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Head inputs of every image of an emoji dataset folder (cached in ``cache``)."""
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(data)
    cache_file = Path(cache) / f"head_inputs_{image_size}.pt" if cache else None
    if cache_file is not None and cache_file.is_file():
        stored = torch.load(cache_file, weights_only=True)
        if int(stored["pooled"].shape[0]) == len(dataset.records) and "grid" in stored:
            return stored, dataset.records
    backbone = EfficientNetLite0(image_size=image_size)
    parts: list[dict[str, torch.Tensor]] = []
    step = 256
    for start in range(0, len(dataset.records), step):
        parts.append(head_inputs(dataset.images[start: start + step], backbone))
        log(f"features {min(start + step, len(dataset.records))}/{len(dataset.records)}")
    inputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(inputs, cache_file)
    return inputs, dataset.records


def save_heads(tensors: dict[str, torch.Tensor], meta: dict[str, Any], out: str | os.PathLike,
               int8: bool = True) -> Path:
    """Write ``out`` (.safetensors) and ``out`` with .json metadata. The MLPs' weight matrices are
    stored as per-row int8 (``quantize_rows_int8``; ``int8=False``: float16), their biases in
    float16, the standardisation statistics in float32; ``load_heads`` reads either."""
    from safetensors.torch import save_file

    from consistent_diffusion.core.outputs import atomic_path, write_json_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = {}
    for name, value in tensors.items():
        if "net." in name and value.is_floating_point() and value.dim() == 2 and int8:
            stored[name], stored[name + INT8_SCALE_SUFFIX] = quantize_rows_int8(value)
        elif "net." in name and value.is_floating_point():
            stored[name] = value.half()
        else:
            stored[name] = value.float()
    stored = {name: value.contiguous() for name, value in stored.items()}
    meta = {**meta, "storage": "int8 weight matrices (per-row float32 scales), float16 biases" if int8 else "float16"}
    with atomic_path(out) as temp:
        save_file(stored, str(temp))
    write_json_atomic(meta, out.with_suffix(".json"))
    return out
