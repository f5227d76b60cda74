"""Small trained heads on frozen features, shipped in ``assets/metrics/emoji_heads.safetensors``.

Both heads read frozen ImageNet EfficientNet-Lite0 features at 128 px (``HEAD_IMAGE_SIZE``) and are
trained on the *train* split of the emoji dataset, trained styles only (val and holdout identities
and the held-out styles are never seen):

- ``style``: CSD-like style descriptor. Input: mean/std statistics of EfficientNet-Lite0 block maps
  plus the palette+stroke ``style_statistics``; a 2-layer MLP to 64-d, trained with a supervised
  contrastive loss on house-style labels where every batch holds each of its emoji in *every* style,
  so the same emoji in another style is always a negative: the descriptor must ignore content.
- ``object``: the mirror of ``style``, an identity descriptor: the same inputs as ``text`` (pooled
  features + block statistics), a 2-layer MLP to 128-d trained with the supervised contrastive loss
  on *identity* labels, every batch holding each of its emoji in every trained style, so the same
  emoji in another style is always a positive: the descriptor must ignore style.
- ``text``: an image encoder aligned to frozen all-MiniLM-L6-v2 sentence embeddings (mean-pooled,
  L2-normalised, 384-d) of the captions ``"<name>, <style> style"`` with a symmetric InfoNCE loss
  (CLIP's): a linear map of pooled features + block statistics, with input dropout and strong weight
  decay. Image-text cosine similarity in that space is the embedded world's CLIP-T.

Inference only: the heads' training (losses, loop, dataset features, writer) lives in
``consistent_diffusion.training.recipes.heads``. Registers ``emoji-style``, ``emoji-object``,
``emoji-text`` and ``style-stats`` (the pixel statistics standardised with the heads file's train-split statistics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.metrics.common import as_batch, normalize
from consistent_diffusion.metrics.extractors.pixel import PixelExtractor
from consistent_diffusion.metrics.extractors.pretrained import EfficientNetLite0, channel_statistics
from consistent_diffusion.metrics.extractors.registry import FeatureExtractor, register_features

HEAD_IMAGE_SIZE = 128
ASSET_DIR = ASSETS_DIR / "metrics"
HEADS_FILE = ASSET_DIR / "emoji_heads.safetensors"
HEAD_KINDS = ("style", "object", "text")


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
    """Frozen inputs of the heads: {"pooled": (N, 1280), "maps": (N, 1152) block mean/std, "grid":
    (N, 3072) the layout (block 8 average-pooled to 4x4, block 15 to 2x2), "pixel": (N, 36)}."""
    batch = as_batch(images)
    pooled, maps, grids, pixels = [], [], [], []
    with torch.inference_mode():
        for start in range(0, batch.shape[0], batch_size):
            chunk = batch[start: start + batch_size]
            p, m = backbone._run(chunk)
            pooled.append(p.float().cpu())
            maps.append(channel_statistics(m).float().cpu())
            grids.append(layout_grid(m).float().cpu())
            if pixel_stats:
                pixels.append(pixel.style_statistics(chunk))
    out = {"pooled": torch.cat(pooled), "maps": torch.cat(maps), "grid": torch.cat(grids)}
    if pixel_stats:
        out["pixel"] = torch.cat(pixels)
    return out


def layout_grid(maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where things are: block 8 (N, 112, h, w) average-pooled to 4x4 and block 15 (N, 320, h, w) to
    2x2, flattened (N, 3072). Pooled and block statistics average the layout away, which is what
    tells look-alike emoji apart (eye shapes, a hand's position)."""
    return torch.cat([torch.nn.functional.adaptive_avg_pool2d(maps["block8"], 4).flatten(1),
                      torch.nn.functional.adaptive_avg_pool2d(maps["block15"], 2).flatten(1)], dim=1)


def style_input(inputs: dict[str, torch.Tensor], pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    return torch.cat([inputs["maps"], (inputs["pixel"] - pixel_mean) / pixel_std], dim=1)


def content_input(inputs: dict[str, torch.Tensor], layout: bool = False) -> torch.Tensor:
    """Input of the object and text heads: pooled features and block statistics (N, 2432), and with
    ``layout`` the layout grid (N, 2432 + 3072)."""
    if layout:
        return torch.cat([inputs["pooled"], inputs["maps"], inputs["grid"]], dim=1)
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
        if kind not in self.meta.get("heads", {}):
            raise ModelNotFoundError(
                f"this metric heads file has no {kind} head (it predates it); retrain the heads with "
                "`consistent-diffusion metrics train-heads --data EMOJI_DATASET --out FILE`"
            )
        config = self.meta["heads"][kind]
        head = MLPHead(config["in_dim"], config["hidden"], config["out_dim"], dropout=0.0)
        state = {k[len(kind) + 1:]: v.float() for k, v in self.tensors.items() if k.startswith(kind + ".")}
        head.load_state_dict(state)
        return head.eval().requires_grad_(False)


INT8_SCALE_SUFFIX = ".int8_scale"


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row 8-bit storage of a linear weight: ``weight`` (out, in) ~= ``q`` (out, in)
    int8 in [-127, 127] times ``scale`` (out, 1) float32, each entry off by at most ``scale / 2``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``quantize_rows_int8`` for every tensor stored with a ``<name>.int8_scale`` beside it
    (float32 result); other tensors pass through, so fp16 heads files load as before."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(INT8_SCALE_SUFFIX):
            continue
        scale = tensors.get(name + INT8_SCALE_SUFFIX)
        out[name] = value.float() * scale.float() if scale is not None else value
    return out


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
    return Heads(tensors=dequantize_int8(load_file(str(path))), meta=meta)


class HeadExtractor(FeatureExtractor):
    """``emoji-style`` / ``emoji-object`` / ``emoji-text``: EfficientNet-Lite0 (frozen, 128 px) + a shipped head."""

    def __init__(self, kind: str, device="cpu", dtype=torch.float32, heads: str | os.PathLike | None = None) -> None:
        super().__init__(device, dtype)
        if kind not in HEAD_KINDS:
            raise ConfigError(f"unknown head {kind!r}")
        self.kind = kind
        self.heads = load_heads(heads)
        self.head = self.heads.head(kind).to(self.device)
        self.backbone = EfficientNetLite0(device, dtype, image_size=self.heads.meta.get("image_size", HEAD_IMAGE_SIZE))
        self.has_text = kind == "text"
        if kind == "object":
            self.foreground = False  # compared as it was trained and validated: on whole emoji images

    def _embed(self, batch):
        inputs = head_inputs(batch, self.backbone, pixel_stats=self.kind == "style")
        if self.kind == "style":
            x = style_input(inputs, self.heads.tensors["pixel_mean"], self.heads.tensors["pixel_std"])
        else:
            x = content_input(inputs, layout=bool(self.heads.meta["heads"][self.kind].get("layout")))
        return self.head(x.to(self.device))

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        if self.kind != "text":
            raise NotImplementedError(f"emoji-{self.kind} has no text tower")
        return minilm_sentence_embeddings(texts)


@register_features("style-stats", "palette + stroke statistics, standardised with train-split statistics")
def _style_stats(device="cpu", dtype=torch.float32, **options):
    statistics = options.pop("statistics", None)
    if statistics is None:
        heads = load_heads(options.pop("heads", None))
        statistics = {"mean": heads.tensors["pixel_mean"], "std": heads.tensors["pixel_std"]}
    return PixelExtractor("style-stats", statistics=statistics, **options)


@register_features("emoji-style", "style descriptor trained contrastively, content varied (shipped head)")
def _emoji_style(device="cpu", dtype=torch.float32, **options):
    return HeadExtractor("style", device=device, dtype=dtype, **options)


@register_features("emoji-object", "identity descriptor trained contrastively, style varied (shipped head)")
def _emoji_object(device="cpu", dtype=torch.float32, **options):
    return HeadExtractor("object", device=device, dtype=dtype, **options)


@register_features("emoji-text", "image encoder aligned to frozen MiniLM captions (shipped head)")
def _emoji_text(device="cpu", dtype=torch.float32, **options):
    return HeadExtractor("text", device=device, dtype=dtype, **options)
