"""One function per axis of ``score``: each reads ``AxisInputs`` and returns {name: MetricResult}.

``AXES`` maps the axis names of ``METRIC_NAMES`` to them; ``measure`` runs one and turns a missing
extractor into a not-measured result (unless strict).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.metrics import consistency as m
from consistent_diffusion.metrics.common import ImagesLike, MetricResult
from consistent_diffusion.metrics.concept import concept_consistency
from consistent_diffusion.metrics.consistency import ExtractorLike
from consistent_diffusion.metrics.extractor_sets import NOT_CHOSEN_REASON, NotChosen

RESULT_NAMES = {"style": "style_consistency", "object": "object_consistency", "text": "text_alignment",
                "diversity": "diversity", "shape": "shape_consistency", "concept": "concept_consistency",
                "fidelity": "fidelity", "within_series": "within_series"}



@dataclass(frozen=True)
class AxisInputs:
    """What the axes read: images (N, 3, H, W) in [-1, 1] and their counterparts, as given."""

    images: torch.Tensor
    prompts: Sequence[str] | None
    references: ImagesLike | None
    controls: ImagesLike | None
    concept_text: str | None
    extractors: dict[str, ExtractorLike | None]
    default_text: ExtractorLike  # the model's own text extractor (concept's text part when "text" is None)
    device: str
    shape_mode: str
    control_kind: str
    strict: bool  # raise ModelNotFoundError instead of returning not-measured results
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # extractor name -> load options
    foreground: bool | None = None  # object / concept on foreground crops (None: each extractor's own)

    def extractor(self, axis: str, chosen: ExtractorLike | None = None):
        """The axis' extractor, loaded with its options (``chosen`` instead of the axis' own);
        ModelNotFoundError when none was chosen or its weights are missing."""
        chosen = self.extractors[axis] if chosen is None else chosen
        if isinstance(chosen, NotChosen):
            raise ModelNotFoundError(NOT_CHOSEN_REASON)
        if isinstance(chosen, str):
            return m.get_extractor(chosen, self.device, options=self.options.get(chosen))
        return chosen


def image_count(images: ImagesLike) -> int:
    """How many images ``images`` holds (a batch's first dimension or a list's length)."""
    return images.shape[0] if hasattr(images, "shape") else len(images)


def image_set(images: ImagesLike | None) -> ImagesLike | None:
    """One image (PIL, path, (3, H, W) tensor, (H, W, 3) array) as a set of one; an empty set as None."""
    if images is None:
        return None
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 3:
        return images[None]
    return images if image_count(images) else None


def first_images(images: ImagesLike, n: int = 1) -> ImagesLike:
    """The set's first image, ``n`` times (a list for lists, a batch for tensors and arrays)."""
    if isinstance(images, torch.Tensor):
        return images[:1].expand(n, *images.shape[1:])
    if isinstance(images, np.ndarray):
        return np.repeat(images[:1], n, axis=0)
    return [images[0]] * n


def score_style(inp: AxisInputs, to_reference: bool = True) -> dict[str, MetricResult]:
    reference = inp.references if to_reference else None
    return {"style": m.style_consistency(inp.images, inp.extractor("style"), reference=reference,
                                         device=inp.device)}


def score_object(inp: AxisInputs) -> dict[str, MetricResult]:
    results = {"object": m.object_consistency(inp.images, inp.references, inp.extractor("object"),
                                              foreground=inp.foreground, device=inp.device)}
    if inp.extractors.get("clip_i") is not None:  # DreamBooth's second object score
        results["object_clip_i"] = measure("clip_i", lambda: m.object_consistency(
            inp.images, inp.references, inp.extractor("clip_i"), foreground=inp.foreground, device=inp.device), inp)
    return results


def score_text(inp: AxisInputs) -> dict[str, MetricResult]:
    if inp.extractors["text"] is None:
        return {}
    if inp.prompts is None:
        raise ConfigError("text alignment needs the images' prompts (prompts=, one per image)")
    return {"text": m.text_alignment(inp.images, inp.prompts, inp.extractor("text"), device=inp.device)}


def score_diversity(inp: AxisInputs) -> dict[str, MetricResult]:
    chosen = inp.extractors["diversity"]
    extractor = chosen if chosen in (None, "pixel") else inp.extractor("diversity")
    return {"diversity": m.diversity(inp.images, extractor=extractor, device=inp.device)}


def score_shape(inp: AxisInputs) -> dict[str, MetricResult]:
    controls = inp.controls if inp.controls is not None else inp.references
    if controls is None:
        raise ConfigError("the shape metric needs a control image: give controls (CLI: --control) or references")
    if image_count(controls) not in (1, inp.images.shape[0]):
        raise ConfigError(f"give one control image or one per series image ({inp.images.shape[0]}), "
                          f"got {image_count(controls)}")
    return {"shape": m.shape_consistency(inp.images, controls, mode=inp.shape_mode, control_kind=inp.control_kind,
                                         resize=True)}


def score_fidelity(inp: AxisInputs, features: bool = True) -> dict[str, MetricResult]:
    """PSNR, SSIM and (``features``) the object extractor's feature distance to the source images."""
    if inp.references is None:
        raise ConfigError("the fidelity metric needs its source image: give references (CLI: --reference)")
    if image_count(inp.references) not in (1, inp.images.shape[0]):
        raise ConfigError(f"fidelity: give one source image or one per series image ({inp.images.shape[0]})")
    try:
        extractor = inp.extractor("object") if features else None
        results = m.fidelity(inp.images, inp.references, extractor, resize=True, device=inp.device)
    except ModelNotFoundError as error:
        if inp.strict:
            raise
        results = m.fidelity(inp.images, inp.references, None, resize=True, device=inp.device)
        results["feature_distance"] = MetricResult.not_measured("fidelity_feature_distance", str(error),
                                                                extractor_name(inp.extractors["object"]))
    return {f"fidelity_{key}": value for key, value in results.items()}


def score_concept(inp: AxisInputs) -> dict[str, MetricResult]:
    """Concept consistency; its text part uses the text extractor (the model's own when "text" is
    None) and is left out, noted in ``details["text_not_measured"]``, where that extractor is missing
    and exemplars define the concept."""
    if inp.references is None and not inp.concept_text:
        raise ConfigError("the concept metric needs the concept: exemplar references and/or concept_text")
    chosen_text = inp.extractors["text"] if inp.extractors["text"] is not None else inp.default_text
    text, missing, text_extractor = inp.concept_text, None, None
    if text:
        try:
            text_extractor = inp.extractor("text", chosen_text)
        except ModelNotFoundError as error:
            if inp.strict or inp.references is None:
                raise
            text, missing = None, str(error)
    result = concept_consistency(inp.images, inp.references, text, inp.extractor("concept"),
                                   text_extractor if text_extractor is not None else m.DEFAULT_EXTRACTORS["text"],
                                   foreground=inp.foreground, device=inp.device)
    if missing is not None:
        result.details["text_not_measured"] = missing
    return {"concept": result}


def jackknife_pseudo_values(similarity_to_others: Sequence[float]) -> list[float]:
    """Per-image jackknife pseudo-values of a set's mean pairwise similarity U (a U-statistic):
    ``p_i = N U - (N - 1) U_(-i) = U + 2 (N - 1) / (N - 2) (r_i - U)``, r_i = image i's mean
    similarity to the others. Their mean is U; unlike the r_i (which share every pair twice, so a
    bootstrap over them gives about half U's standard error) their spread gives U's own. N <= 2: r."""
    values = [float(v) for v in similarity_to_others]
    count = len(values)
    if count <= 2:
        return values
    mean = sum(values) / count
    return [mean + 2 * (count - 1) / (count - 2) * (value - mean) for value in values]


def score_within_series(inp: AxisInputs) -> dict[str, MetricResult]:
    """Subject agreement *within* the set, ConsiStory's subject consistency (Tewel et al. 2024): the
    object extractor's mean pairwise cosine between the set's images, on foreground crops (each image
    cropped to its foreground's bounding box on white, so the subject and not the background or
    layout is compared); aggregate in [-1, 1]. Per image: its jackknife pseudo-value
    (``jackknife_pseudo_values``; mean = the aggregate), so intervals and paired differences over
    images have the set statistic's spread; each image's own mean cosine to the others is kept in
    ``details["similarity_to_others"]``. Carries the object extractor's validation (docs/metrics.md)."""
    result = m.object_consistency(inp.images, None, inp.extractor("object"), foreground=True, device=inp.device)
    result.name = RESULT_NAMES["within_series"]
    result.details["similarity_to_others"] = list(result.per_image)
    result.details["per_image"] = "jackknife pseudo-values of the mean pairwise similarity"
    result.details["protocol_note"] = "within the series, foreground crops (ConsiStory's subject consistency)"
    result.per_image = jackknife_pseudo_values(result.per_image)
    return {"within_series": result}


AXES: dict[str, Callable[[AxisInputs], dict[str, MetricResult]]] = {
    "style": score_style, "object": score_object, "text": score_text, "diversity": score_diversity, "shape": score_shape,
    "fidelity": score_fidelity, "concept": score_concept, "within_series": score_within_series,
}


def extractor_name(extractor: ExtractorLike | None) -> str | None:
    if isinstance(extractor, NotChosen):
        return None
    return extractor if extractor is None or isinstance(extractor, str) else extractor.name


def measure(axis: str, run: Callable[[], Any], inputs: AxisInputs) -> Any:
    """``run()``, or a not-measured result when the axis has no extractor or its weights are missing
    (unless strict): {axis: result}, or the bare result for "clip_i" (an extra object score)."""
    extractor = inputs.extractors.get("object" if axis in ("fidelity", "within_series") else axis)
    try:
        return run()
    except ModelNotFoundError as error:
        if inputs.strict:
            raise
        result = MetricResult.not_measured(RESULT_NAMES.get(axis, axis), str(error), extractor_name(extractor))
        return result if axis == "clip_i" else {axis: result}
