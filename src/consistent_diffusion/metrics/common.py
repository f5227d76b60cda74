"""Shared pieces of the metrics: image batches, similarity matrices, results, AUC.

Images enter every metric as a float tensor ``(N, 3, H, W)`` in pixel space [-1, 1]; ``as_batch``
turns PIL images, file paths, ``uint8`` arrays ``(N, H, W, 3)`` or tensors into that form.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.core.images import load_image, pil_to_tensor

ImagesLike = Any  # torch.Tensor | np.ndarray | Sequence[PIL.Image | path]


def as_batch(images: ImagesLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Images -> float32 tensor (N, 3, H, W) in [-1, 1] on CPU.

    Accepts a tensor (N, 3, H, W) in [-1, 1] (or (3, H, W)), a uint8 array (N, H, W, 3) or
    (H, W, 3), or a sequence of PIL images / file paths. ``size`` resizes + centre-crops PIL and
    path inputs; without it every image must already have the same size (else ImageInputError).
    """
    if isinstance(images, torch.Tensor):
        batch = images.detach().float().cpu()
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ImageInputError(f"expected an image tensor (N, 3, H, W), got shape {tuple(batch.shape)}")
        return batch
    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ImageInputError(f"expected a uint8 array (N, H, W, 3), got shape {array.shape}")
        scale = 127.5 if array.dtype == np.uint8 else 0.5
        tensor = torch.from_numpy(np.ascontiguousarray(array)).float()
        return (tensor / scale - 1.0).permute(0, 3, 1, 2).contiguous()
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    tensors = []
    for image in images:
        tensors.append(pil_to_tensor(load_image(image, size=size)))
    if not tensors:
        raise ImageInputError("no images given")
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ImageInputError(
            f"images have different sizes {sorted((w, h) for h, w in sizes)} (width, height); "
            "give images of one size or pass a size to resize them"
        )
    return torch.cat(tensors)


def resize_batch(batch: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (N, 3, H, W) batch (antialiased when shrinking)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(batch.shape[-2:]) == size:
        return batch
    return torch.nn.functional.interpolate(batch, size=size, mode="bicubic", align_corners=False, antialias=True)


def normalize(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities (N, M) between rows of ``a`` (N, D) and ``b`` (M, D) (b defaults to a)."""
    a = normalize(a)
    b = a if b is None else normalize(b)
    return (a @ b.T).clamp(-1.0, 1.0)


def mean_off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """Per-row mean of a square (N, N) matrix without its diagonal; (N,). N == 1 gives NaN."""
    n = matrix.shape[0]
    if n < 2:
        return torch.full((n,), float("nan"))
    mask = ~torch.eye(n, dtype=torch.bool)
    return (matrix * mask).sum(dim=1) / (n - 1)


@dataclass
class MetricResult:
    """One metric over one set of images.

    per_image: one value per input image, in input order (permuting the inputs permutes it).
    aggregate: the set's value (the mean of per_image unless the metric says otherwise).
    higher_is_better: direction; range: the values' possible interval.
    validated: True/False from the shipped validation table (AUC vs the metric's bar on held-out
    real emoji), None when this metric+extractor was never validated.
    A metric that could not be measured (``MetricResult.not_measured``) has no values, a NaN
    aggregate (None in JSON) and its reason in ``details["not_measured"]``.
    """

    name: str
    extractor: str | None
    per_image: list[float]
    aggregate: float
    higher_is_better: bool = True
    range: tuple[float, float] = (0.0, 1.0)
    details: dict[str, Any] = field(default_factory=dict)
    validated: bool | None = None
    validation: dict[str, Any] | None = None

    @classmethod
    def not_measured(cls, name: str, reason: str, extractor: str | None = None, **kwargs: Any) -> MetricResult:
        """A result that carries no number: the axis was not measured, for ``reason``."""
        return cls(name=name, extractor=extractor, per_image=[], aggregate=float("nan"),
                   details={"not_measured": reason}, **kwargs)

    @property
    def measured(self) -> bool:
        """False for ``not_measured`` results."""
        return "not_measured" not in self.details

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "extractor": self.extractor,
            "aggregate": _finite(self.aggregate),
            "per_image": [_finite(v) for v in self.per_image],
            "higher_is_better": self.higher_is_better,
            "range": list(self.range),
            "validated": self.validated,
            "validation": self.validation,
            "details": {k: (_finite(v) if isinstance(v, float) else v) for k, v in self.details.items()},
        }


def _finite(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def result(name: str, extractor: str | None, values: torch.Tensor | Sequence[float], aggregate: float | None = None,
           **kwargs: Any) -> MetricResult:
    """MetricResult from per-image values (aggregate: their mean unless given)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if aggregate is None:
        finite = values[torch.isfinite(values)]
        aggregate = float(finite.mean()) if finite.numel() else float("nan")
    return MetricResult(name=name, extractor=extractor, per_image=[float(v) for v in values],
                        aggregate=float(aggregate), **kwargs)


def roc_auc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    The Mann-Whitney U statistic with mid-ranks; equals sklearn's ``roc_auc_score``.
    """
    positive = np.asarray(positive, dtype=np.float64).ravel()
    negative = np.asarray(negative, dtype=np.float64).ravel()
    if positive.size == 0 or negative.size == 0:
        raise ConfigError("roc_auc needs at least one positive and one negative score")
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty_like(scores)
    sorted_scores = scores[order]
    # mid-ranks for ties
    unique, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    del unique
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))
