"""One score dispatcher: ``score(images, ...) -> {name: MetricResult}`` for the library, the bench
and ``consistent-diffusion score DIR``.

    from consistent_diffusion import score

    results = score(images, metrics=("style", "text"), prompts=prompts, model=pipe)
    results = score(images, kind="object", references=refs, prompts=prompts, model=pipe)  # a bench cell

Extractors are chosen in one place (``resolve_extractors``), as *extractor sets* (``EXTRACTOR_SETS``):
``emoji``, the heads validated on held-out real emoji (``DEFAULT_EXTRACTORS``), is the embedded model's
default; the published protocols ``dreambooth`` (DINO ViT-S/16, CLIP-I, CLIP-T), ``consistory``
(DreamSim on foreground crops) and ``csd`` (CSD style) load their weights from local folders. On any
other model no set is chosen for the user: an axis without a chosen extractor, or whose weights are
missing, comes back ``MetricResult.not_measured`` with the reason, never as a number from a model of
another domain. Off the embedded model no score is ``validated`` (the table was measured on emoji);
scores of a published protocol carry ``validated: null`` and name the protocol.

Modules: ``extractor_sets`` (which extractor reads each axis), ``axes`` (one function per axis),
``series_scores`` (``score_series``: a series folder to ``scores.json``; it calls this dispatcher,
so it is imported from there, not re-exported here). The first two's public names are re-exported
here, so ``from consistent_diffusion.metrics.score import ...`` keeps working for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics import consistency as m
from consistent_diffusion.metrics.axes import (  # noqa: F401 - RESULT_NAMES re-exported
    AXES,
    RESULT_NAMES,
    AxisInputs,
    first_images,
    image_set,
    measure,
    score_diversity,
    score_fidelity,
    score_object,
    score_shape,
    score_style,
    score_text,
    score_within_series,
)
from consistent_diffusion.metrics.common import ImagesLike, MetricResult, as_batch
from consistent_diffusion.metrics.consistency import ExtractorLike
from consistent_diffusion.metrics.extractor_sets import (  # noqa: F401 - re-exported
    DEFAULT_METRICS,
    EMBEDDED,
    EXTRACTOR_AXES,
    EXTRACTOR_SETS,
    METRIC_NAMES,
    NOT_CHOSEN,
    NOT_CHOSEN_REASON,
    TASK_KINDS,
    ExtractorSet,
    NotChosen,
    chosen_sets,
    model_kind,
    parse_feature_models,
    parse_metric_list,
    resolve_extractors,
)

OUT_OF_DOMAIN = "validated on held-out real emoji (the embedded model's images) only, not on this model's"


# ----------------------------------------------------------------------------- the dispatcher


def score(
    images: ImagesLike,
    *,
    metrics: Sequence[str] | None = None,
    kind: str | None = None,
    prompts: Sequence[str] | None = None,
    references: ImagesLike | None = None,
    controls: ImagesLike | None = None,
    concept_text: str | None = None,
    extractors: Mapping[str, ExtractorLike | None] | None = None,
    extractor_sets: Sequence[str] | None = None,
    extractor_options: Mapping[str, Mapping[str, Any]] | None = None,
    model: Any = None,
    device: str = "cpu",
    shape_mode: str = "edges",
    control_kind: str = "image",
    strict: bool = False,
) -> dict[str, MetricResult]:
    """Score a set of images on the chosen axes; {name: MetricResult}, in a fixed order.

    images: anything ``as_batch`` takes (N images of one size). Choose the axes with either
    ``metrics`` (any of ``METRIC_NAMES``; default ``DEFAULT_METRICS``) or a bench task ``kind``
    (``TASK_KINDS``), which scores that kind's consistency, "reference_object" (and, except for
    shape, "reference_fidelity" = SSIM and "reference_psnr" to the first reference) and
    "reference_style" (style agreement with the references) when there are references, "text" and
    "diversity". On a style task "reference_object" is the object leakage.

    prompts: one per image (text alignment). references: style / object references, fidelity
    sources, concept exemplars (with ``kind``, style is scored within the set and shape's control
    is the first reference). controls: the shape metric's control images (default: references);
    ``control_kind`` "image" (edges/silhouette are extracted) or "map"; ``shape_mode`` edges |
    edges-f1 | silhouette. concept_text: the concept as text.
    extractor_sets: names of ``EXTRACTOR_SETS`` (default: "emoji" on the embedded model, none
    elsewhere); extractors: overrides per axis of ``EXTRACTOR_AXES`` (names or ``FeatureExtractor``s;
    see ``resolve_extractors``); extractor_options: load options per extractor name (e.g.
    ``{"csd": {"model": PATH}}``). model: what made the images (``ModelIdentity``, a manifest's model
    record, its kind, or the pipeline): it picks the default set and whether validation applies.
    strict: raise ``ModelNotFoundError`` where an extractor is missing instead of returning that
    axis ``MetricResult.not_measured`` (its reason in ``details["not_measured"]``).
    Output names: style, object (and object_clip_i with the dreambooth set), text, diversity, shape,
    fidelity_psnr, fidelity_ssim, fidelity_feature_distance, concept, within_series (subject agreement
    between the set's own images, object extractor on foreground crops; a bench object or concept
    cell gets it beside identity to the references), and the ``kind`` names above.
    """
    if metrics is not None and kind is not None:
        raise ConfigError("give metrics or a task kind, not both")
    if kind is not None and kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; accepted: {', '.join(TASK_KINDS)}")
    chosen = tuple(DEFAULT_METRICS if metrics is None and kind is None else metrics or ())
    unknown = [name for name in chosen if name not in METRIC_NAMES]
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; accepted: {', '.join(METRIC_NAMES)}")
    if kind is None and not chosen:
        raise ConfigError("no metrics chosen")
    if shape_mode not in m.SHAPE_MODES:
        raise ConfigError(f"shape mode must be one of {', '.join(m.SHAPE_MODES)}, got {shape_mode!r}")
    sets = chosen_sets(extractor_sets, model)
    resolved = resolve_extractors(extractors, model, sets)
    inputs = AxisInputs(
        images=as_batch(images), prompts=None if prompts is None else list(prompts),
        references=image_set(references), controls=image_set(controls), concept_text=concept_text or None,
        extractors=resolved, default_text=resolve_extractors(None, model, sets)["text"],
        device=str(device), shape_mode=shape_mode, control_kind=control_kind, strict=strict,
        options=dict(extractor_options or {}), foreground=_set_foreground(sets),
    )
    results = _score_kind(kind, inputs) if kind is not None else _score_metrics(chosen, inputs)
    _name_protocols(results, sets)
    if model_kind(model) != EMBEDDED:
        for result in results.values():
            _outside_validation(result)
    return results


def _set_foreground(sets: Sequence[str]) -> bool | None:
    """The chosen sets' foreground rule: a published protocol's, else None (each extractor's own)."""
    rules = {EXTRACTOR_SETS[name].foreground for name in sets} - {None}
    if len(rules) > 1:
        raise ConfigError(f"extractor sets {list(sets)} compare objects differently (whole images vs foreground "
                          "crops); score them in separate runs")
    return rules.pop() if rules else None


def _name_protocols(results: dict[str, MetricResult], sets: Sequence[str]) -> None:
    """A score measured with a published protocol's extractor names that protocol in its details."""
    for name in sets:
        if name == "emoji":
            continue
        used = set(EXTRACTOR_SETS[name].extractors.values())
        for result in results.values():
            if result.measured and result.extractor in used:
                result.details["protocol"] = EXTRACTOR_SETS[name].protocol


def _score_metrics(metrics: Sequence[str], inputs: AxisInputs) -> dict[str, MetricResult]:
    results: dict[str, MetricResult] = {}
    for axis in metrics:
        results.update(measure(axis, lambda axis=axis: AXES[axis](inputs), inputs))
    return results


def _score_kind(kind: str, inputs: AxisInputs) -> dict[str, MetricResult]:
    """A bench cell's scores: its kind's consistency, then the reference scores, text, diversity."""
    references = inputs.references
    if kind == "shape" and references is None and inputs.controls is None:
        raise ConfigError("a shape task needs a reference image (its control)")
    results = measure(kind, lambda: _kind_consistency(kind, inputs), inputs)
    if references is not None:  # shape tasks too: "ControlNet controls shape, not identity" reads it
        if kind == "object":  # the same measurement as the kind's own
            results["reference_object"] = _copy(results["object"])
        else:  # on a style task: object leakage (a style method should not copy the reference's subject)
            results["reference_object"] = measure("object", lambda: score_object(inputs), inputs)["object"]
        # agreement with the reference's style (the to-reference protocol): a style task's target,
        # and what a combination with a style method keeps on the other kinds
        results["reference_style"] = measure("style", lambda: score_style(inputs, to_reference=True), inputs)["style"]
        if kind != "shape":
            fidelity = score_fidelity(dataclasses.replace(inputs, references=first_images(references)), features=False)
            results["reference_fidelity"] = fidelity["fidelity_ssim"]
            results["reference_psnr"] = fidelity["fidelity_psnr"]
    if kind in ("object", "concept"):  # what a consistent-subject method claims: one subject across the series
        results.update(measure("within_series", lambda: score_within_series(inputs), inputs))
    results.update(measure("text", lambda: score_text(inputs), inputs))
    results.update(measure("diversity", lambda: score_diversity(inputs), inputs))
    return results


def _kind_consistency(kind: str, inputs: AxisInputs) -> dict[str, MetricResult]:
    """Style: within the set (a style task's series agrees with itself); shape: against the first
    reference (the task's control) unless controls are given; object, concept: as ``metrics``."""
    if kind == "style":
        return score_style(inputs, to_reference=False)
    if kind == "shape":
        controls = inputs.controls
        if controls is None:
            controls = first_images(inputs.references, inputs.images.shape[0])
        return score_shape(dataclasses.replace(inputs, controls=controls))
    return AXES[kind](inputs)


def _copy(result: MetricResult) -> MetricResult:
    return dataclasses.replace(result, per_image=list(result.per_image), details=dict(result.details))


def _outside_validation(result: MetricResult) -> None:
    """Off the embedded model a score is not validated: the table's record stays, marked as not applying."""
    if result.validation is not None:
        result.validation = {**result.validation, "applies": False, "note": OUT_OF_DOMAIN}
    result.validated = None
