"""Pixel descriptors (CPU, no weights): foreground palette, Canny edges, silhouettes, style statistics."""

from __future__ import annotations

import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.metrics.extractors.registry import FeatureExtractor, register_features


class PixelExtractor(FeatureExtractor):
    """Pixel descriptors (CPU, no weights). ``grid``: side of the density grid ``embed`` returns for
    maps (edges, silhouette)."""

    batch_size = 64

    def __init__(self, kind: str, device="cpu", dtype=torch.float32, grid: int = 16, bins: int = 8,
                 statistics: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__("cpu", torch.float32)
        self.kind, self.grid, self.bins = kind, grid, bins
        self.statistics = statistics

    def _maps(self, batch):
        if self.kind == "edges":
            return {"edges": pixel.canny(batch).float()}
        if self.kind == "silhouette":
            return {"silhouette": pixel.foreground_mask(batch).float()}
        raise NotImplementedError(f"{self.kind} has no maps")

    def _embed(self, batch):
        if self.kind == "palette":
            return pixel.palette_histogram(batch, bins=self.bins).sqrt()
        if self.kind == "style-stats":
            stats = pixel.style_statistics(batch)
            if self.statistics is not None:
                stats = (stats - self.statistics["mean"]) / self.statistics["std"]
            return stats
        (value,) = self._maps(batch).values()
        return torch.nn.functional.adaptive_avg_pool2d(value, self.grid).flatten(1)


for _kind, _text in (("palette", "foreground colour histogram (sqrt; cosine = Bhattacharyya coefficient)"),
                     ("edges", "Canny edges (maps) and their 16x16 density grid"),
                     ("silhouette", "foreground mask (non-background / alpha) and its 16x16 grid")):
    register_features(_kind, _text)(
        lambda device="cpu", dtype=torch.float32, _kind=_kind, **options: PixelExtractor(_kind, **options))

