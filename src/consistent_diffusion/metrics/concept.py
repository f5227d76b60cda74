"""Concept consistency (docs/metrics.md): how well a series renders one concept given by exemplar
images and/or text, as the geometric mean of agreement with the definition and agreement within
the series, with guards against a collapsed series and against copies of the exemplars."""

from __future__ import annotations

from typing import Any

import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics.common import (
    ImagesLike,
    MetricResult,
    as_batch,
    cosine_matrix,
    mean_off_diagonal,
    result,
)
from consistent_diffusion.metrics.consistency import (
    DEFAULT_EXTRACTORS,
    ExtractorLike,
    diversity,
    extractor_name,
    finish_result,
    foreground_crop,
    get_extractor,
    text_alignment,
)

COLLAPSE_DIVERSITY = 0.02  # pixel diversity (1 - SSIM) under this: the series is (near) one image
COPY_SSIM = 0.95  # an image this close to an exemplar (SSIM) is a copy, not a rendering of the concept


def concept_values(definition: torch.Tensor, series: torch.Tensor) -> torch.Tensor:
    """C_i = sqrt(max(A_i, 0) * max(S_i, 0)) (N,) in [0, 1] from definition agreement A (N,) and
    series agreement S (N,), both cosine similarities."""
    return (definition.clamp_min(0) * series.clamp_min(0)).sqrt()


def concept_scores(series: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
    """C_i (N,) of a series given as features (N, D) against exemplar features (K, D): A_i the mean
    cosine to the exemplars, S_i the mean cosine to the other images of the series."""
    return concept_values(cosine_matrix(series, exemplars).mean(dim=1), mean_off_diagonal(cosine_matrix(series)))


def concept_consistency(images: ImagesLike, exemplars: ImagesLike | None = None, text: str | None = None,
                        extractor: ExtractorLike = DEFAULT_EXTRACTORS["concept"],
                        text_extractor: ExtractorLike = DEFAULT_EXTRACTORS["text"], foreground: bool | None = None,
                        device: str = "cpu") -> MetricResult:
    """Concept consistency (defined in docs/metrics.md): per image, the geometric mean of

    - definition agreement A_i: mean cosine similarity of the image's subject to the exemplars (object
      space, foreground-cropped) and/or of the image to the concept's text (image-text space), averaged
      when both are given;
    - series agreement S_i: mean cosine similarity of the image's subject to the other images' subjects;

    C_i = sqrt(max(A_i, 0) * max(S_i, 0)) in [0, 1]. A series that agrees with itself but drifts from the
    definition, or matches the definition only image by image while varying, scores low. Guard: the
    series' pixel diversity is reported, and ``details["guard"]`` says "collapsed" when it is under
    COLLAPSE_DIVERSITY (near-identical images) or "copies_exemplars" when some image has SSIM >=
    COPY_SSIM to an exemplar; a guarded score must not be read as success.
    """
    if exemplars is None and not text:
        raise ConfigError("concept_consistency needs the concept as exemplar images and/or text")
    batch = as_batch(images)
    if batch.shape[0] < 2:
        raise ConfigError("concept_consistency needs a series of at least 2 images")
    ext = get_extractor(extractor, device)
    foreground = ext.foreground if foreground is None else foreground
    prepared = foreground_crop(batch) if foreground else batch
    embeddings = ext.embed(prepared)
    series = mean_off_diagonal(cosine_matrix(embeddings))
    parts = []
    details: dict[str, Any] = {}
    guard = None
    if exemplars is not None:
        ex = as_batch(exemplars)
        ex_prepared = foreground_crop(ex) if foreground else ex
        to_exemplars = cosine_matrix(embeddings, ext.embed(ex_prepared)).mean(dim=1)
        parts.append(to_exemplars)
        details["to_exemplars"] = float(to_exemplars.mean())
        if tuple(ex.shape[-2:]) == tuple(batch.shape[-2:]):
            closest = torch.stack([pixel.ssim(batch, e[None].expand_as(batch)) for e in ex]).amax(0)
            details["max_ssim_to_exemplar"] = float(closest.max())
            if float(closest.max()) >= COPY_SSIM:
                guard = "copies_exemplars"
    if text:
        text_res = text_alignment(batch, [text] * batch.shape[0], text_extractor, device)
        to_text = torch.tensor(text_res.per_image)
        parts.append(to_text)
        details["to_text"] = float(to_text.mean())
    definition = torch.stack(parts).mean(0)
    values = concept_values(definition, series)
    div = diversity(batch).aggregate
    if div < COLLAPSE_DIVERSITY:
        guard = "collapsed"
    details.update({"definition_agreement": float(definition.mean()), "series_agreement": float(series.mean()),
                    "guard": guard})
    res = result("concept_consistency", extractor_name(ext), values, range=(0.0, 1.0), details=details)
    return finish_result(res, "concept", div)
