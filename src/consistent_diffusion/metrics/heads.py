"""Small trained heads on frozen features, shipped in ``assets/metrics/emoji_heads.safetensors``.

Both heads read frozen ImageNet EfficientNet-Lite0 features at 128 px (``HEAD_IMAGE_SIZE``) and are
trained on the *train* split of the emoji dataset only (val and holdout identities are never seen):

- ``style``: CSD-like style descriptor. Input: mean/std statistics of EfficientNet-Lite0 block maps
  plus the palette+stroke ``style_statistics``; a 2-layer MLP to 64-d, trained with a supervised
  contrastive loss on house-style labels where every batch holds each of its emoji in *every* style,
  so the same emoji in another style is always a negative: the descriptor must ignore content.
- ``text``: an image encoder aligned to frozen all-MiniLM-L6-v2 sentence embeddings (mean-pooled,
  L2-normalised, 384-d) of the captions ``"<name>, <style> style"`` with a symmetric InfoNCE loss
  (CLIP's): a linear map of pooled features + block statistics, with input dropout and strong weight
  decay. Image-text cosine similarity in that space is the embedded world's CLIP-T.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.metrics.common import as_batch, normalize
from consistent_diffusion.metrics.features import EfficientNetLite0, FeatureExtractor, channel_statistics

HEAD_IMAGE_SIZE = 128
ASSET_DIR = ASSETS_DIR / "metrics"
HEADS_FILE = ASSET_DIR / "emoji_heads.safetensors"


class MLPHead(nn.Module):
    """Standardise -> Linear -> GELU -> Dropout -> Linear (``hidden`` 0: Dropout -> Linear, a linear
    probe with input dropout); output L2-normalised."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, out_dim))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(self.net((x - self.mean) / self.std))


# ----------------------------------------------------------------------------- inputs


def head_inputs(images, backbone: EfficientNetLite0, pixel_stats: bool = True, batch_size: int = 64
                ) -> dict[str, torch.Tensor]:
    """Frozen inputs of both heads: {"pooled": (N, 1280), "maps": (N, 1152), "pixel": (N, 36)}."""
    batch = as_batch(images)
    pooled, maps, pixels = [], [], []
    with torch.inference_mode():
        for start in range(0, batch.shape[0], batch_size):
            chunk = batch[start: start + batch_size]
            p, m = backbone._run(chunk)
            pooled.append(p.float().cpu())
            maps.append(channel_statistics(m).float().cpu())
            if pixel_stats:
                pixels.append(pixel.style_statistics(chunk))
    out = {"pooled": torch.cat(pooled), "maps": torch.cat(maps)}
    if pixel_stats:
        out["pixel"] = torch.cat(pixels)
    return out


def style_input(inputs: dict[str, torch.Tensor], pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    return torch.cat([inputs["maps"], (inputs["pixel"] - pixel_mean) / pixel_std], dim=1)


def text_input(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([inputs["pooled"], inputs["maps"]], dim=1)


# ----------------------------------------------------------------------------- MiniLM


@lru_cache(maxsize=2)
def _minilm(device: str = "cpu"):
    from transformers import AutoTokenizer, BertModel

    from consistent_diffusion.models.embedded import default_text_encoder_path

    path = default_text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval().requires_grad_(False).to(device)
    return tokenizer, model


@torch.inference_mode()
def minilm_sentence_embeddings(texts: Sequence[str], device: str = "cpu", batch: int = 256) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (N, 384): mean of token states over the attention mask,
    L2-normalised (sentence-transformers' recipe for this model)."""
    tokenizer, model = _minilm(str(device))
    out = []
    texts = list(texts)
    for start in range(0, len(texts), batch):
        tokens = tokenizer(texts[start: start + batch], padding=True, truncation=True, max_length=64,
                           return_tensors="pt").to(device)
        states = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[0]
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        out.append(normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 384)


# ----------------------------------------------------------------------------- shipped heads


@dataclass
class Heads:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def head(self, kind: str) -> MLPHead:
        config = self.meta["heads"][kind]
        head = MLPHead(config["in_dim"], config["hidden"], config["out_dim"], dropout=0.0)
        state = {k[len(kind) + 1:]: v.float() for k, v in self.tensors.items() if k.startswith(kind + ".")}
        head.load_state_dict(state)
        return head.eval().requires_grad_(False)


def load_heads(path: str | os.PathLike | None = None) -> Heads:
    """Read the heads file (default: the one shipped in the package) and its JSON metadata."""
    from safetensors.torch import load_file

    path = Path(path) if path else HEADS_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"metric heads not found: {path}; train them with `consistent-diffusion metrics train-heads "
            "--data EMOJI_DATASET --out FILE`"
        )
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Heads(tensors=load_file(str(path)), meta=meta)


class HeadExtractor(FeatureExtractor):
    """``emoji-style`` / ``emoji-text``: EfficientNet-Lite0 (frozen, 128 px) + a shipped head."""

    def __init__(self, kind: str, device="cpu", dtype=torch.float32, heads: str | os.PathLike | None = None) -> None:
        super().__init__(device, dtype)
        if kind not in ("style", "text"):
            raise ConfigError(f"unknown head {kind!r}")
        self.kind = kind
        self.heads = load_heads(heads)
        self.head = self.heads.head(kind).to(self.device)
        self.backbone = EfficientNetLite0(device, dtype, image_size=self.heads.meta.get("image_size", HEAD_IMAGE_SIZE))
        self.has_text = kind == "text"

    def _embed(self, batch):
        inputs = head_inputs(batch, self.backbone, pixel_stats=self.kind == "style")
        if self.kind == "style":
            x = style_input(inputs, self.heads.tensors["pixel_mean"], self.heads.tensors["pixel_std"])
        else:
            x = text_input(inputs)
        return self.head(x.to(self.device))

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        if self.kind != "text":
            raise NotImplementedError("emoji-style has no text tower")
        return minilm_sentence_embeddings(texts)


# ----------------------------------------------------------------------------- training


@dataclass
class HeadTrainingConfig:
    """How the heads are trained (fixed in advance; val/holdout are only used for the report)."""

    style_steps: int = 1500  # optimiser steps of the style head
    text_steps: int = 1000  # optimiser steps of the text head
    identities_per_batch: int = 64  # style: each batch holds these emoji in every style
    text_batch: int = 256  # text: image-caption pairs per batch
    hidden: int = 512  # hidden width of the style head
    text_hidden: int = 0  # hidden width of the text head (0: linear; generalised best to unseen emoji)
    style_dim: int = 64  # style descriptor size
    lr: float = 1e-3
    weight_decay: float = 0.05  # style head
    text_weight_decay: float = 0.5  # text head (strong: 1,775 training emoji only)
    text_dropout: float = 0.3  # input dropout of the text head
    temperature: float = 0.1  # style SupCon temperature
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("style_steps", "text_steps", "identities_per_batch", "text_batch", "hidden", "style_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer")
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
    """Train both heads on the train-split rows of ``inputs`` (computed at ``image_size``);
    return (tensors, metadata)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train = np.array([i for i, r in enumerate(records) if r["split"] == "train"])
    styles = sorted({r["style"] for r in records})
    style_ids = torch.tensor([styles.index(r["style"]) for r in records])

    pixel_mean = inputs["pixel"][train].mean(0)
    pixel_std = inputs["pixel"][train].std(0).clamp_min(1e-3)
    x_style = style_input(inputs, pixel_mean, pixel_std)
    x_text = text_input(inputs)

    # --- style head: batches of identities drawn in every style
    by_identity: dict[str, list[int]] = {}
    for i in train:
        by_identity.setdefault(records[i]["identity"], []).append(int(i))
    identities = [k for k, v in by_identity.items() if len(v) == len(styles)]
    style_head = MLPHead(x_style.shape[1], config.hidden, config.style_dim)
    style_head.mean.copy_(x_style[train].mean(0))
    style_head.std.copy_(x_style[train].std(0).clamp_min(1e-4))
    optimiser = torch.optim.AdamW(style_head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.style_steps)
    style_head.train()
    for step in range(config.style_steps):
        chosen = rng.choice(len(identities), size=min(config.identities_per_batch, len(identities)), replace=False)
        rows = torch.tensor([i for c in chosen for i in by_identity[identities[c]]])
        loss = supcon_loss(style_head(x_style[rows]), style_ids[rows], config.temperature)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == config.style_steps - 1:
            log(f"style step {step}: loss {loss.item():.4f}")
    style_head.eval()

    # --- text head: image <-> MiniLM caption embeddings
    captions = [r["caption"] for r in records]
    text_targets = minilm_sentence_embeddings(captions)
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
        loss = clip_loss(image, text_targets[rows], scale)
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
    for kind, head in (("style", style_head), ("text", text_head)):
        for key, value in head.state_dict().items():
            tensors[f"{kind}.{key}"] = value.detach().clone().contiguous()
    meta = {
        "format": "consistent-diffusion/metric-heads/v1",
        "image_size": int(image_size),
        "backbone": "efficientnet-lite0 (ImageNet, frozen)",
        "styles": styles,
        "heads": {
            "style": {"in_dim": x_style.shape[1], "hidden": config.hidden, "out_dim": config.style_dim},
            "text": {"in_dim": x_text.shape[1], "hidden": config.text_hidden, "out_dim": text_targets.shape[1]},
        },
        "training": {**config.__dict__, "train_images": len(train), "train_identities": len(by_identity)},
    }
    return tensors, meta


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
    """Head inputs of every image of an emoji dataset folder (cached in ``cache`` as inputs.pt)."""
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(data)
    cache_file = Path(cache) / f"head_inputs_{image_size}.pt" if cache else None
    if cache_file is not None and cache_file.is_file():
        stored = torch.load(cache_file, weights_only=True)
        if int(stored["pooled"].shape[0]) == len(dataset.records):
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


def save_heads(tensors: dict[str, torch.Tensor], meta: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``out`` (.safetensors, fp16 weights, fp32 statistics) and ``out`` with .json metadata."""
    from safetensors.torch import save_file

    from consistent_diffusion.core.outputs import atomic_path, write_json_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: (v.half() if ("net." in k and v.is_floating_point()) else v.float()).contiguous()
              for k, v in tensors.items()}
    with atomic_path(out) as temp:
        save_file(stored, str(temp))
    write_json_atomic(meta, out.with_suffix(".json"))
    return out
