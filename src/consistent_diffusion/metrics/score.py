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

``score_series`` reads a series folder, runs ``score`` and writes ``scores.json`` beside the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ImageInputError, ModelNotFoundError
from consistent_diffusion.core.images import IMAGE_SUFFIXES, list_images, load_image
from consistent_diffusion.metrics import consistency as m
from consistent_diffusion.metrics.common import ImagesLike, MetricResult, as_batch
from consistent_diffusion.metrics.consistency import DEFAULT_EXTRACTORS, ExtractorLike

SCORES_FORMAT = "consistent-diffusion/scores/v1"
METRIC_NAMES = ("style", "object", "text", "diversity", "shape", "fidelity", "concept")
DEFAULT_METRICS = ("style", "object", "text", "diversity")
TASK_KINDS = ("style", "object", "concept", "shape")  # the bench's task kinds (``score(kind=...)``)
EXTRACTOR_AXES = ("style", "object", "concept", "text", "diversity", "clip_i")  # what ``extractors`` may set
EMBEDDED = "embedded"  # ModelIdentity.kind of the embedded model, whose world (emoji) the defaults fit


@dataclass(frozen=True)
class ExtractorSet:
    """Extractors for some axes, and the protocol they reproduce."""

    extractors: Mapping[str, str]
    protocol: str
    foreground: bool | None = None  # object / concept on foreground crops (None: as each extractor was validated)


EXTRACTOR_SETS: dict[str, ExtractorSet] = {
    "emoji": ExtractorSet({k: v for k, v in DEFAULT_EXTRACTORS.items() if k != "diversity"},
                          "heads validated on held-out real emoji (docs/metrics.md)"),
    "dreambooth": ExtractorSet({"object": "dino", "clip_i": "clip", "text": "clip", "concept": "dino"},
                               "DreamBooth (Ruiz et al. 2023): DINO ViT-S/16 and CLIP-I (mean cosine to the real "
                               "images), CLIP-T (image-prompt cosine), whole images", foreground=False),
    "consistory": ExtractorSet({"object": "dreamsim", "concept": "dreamsim"},
                               "ConsiStory (Tewel et al. 2024): DreamSim similarity on foreground crops",
                               foreground=True),
    "csd": ExtractorSet({"style": "csd"}, "CSD (Somepalli et al. 2024): cosine of CSD ViT-L style descriptors"),
}


class NotChosen(str):
    """An axis no extractor was chosen for (off the embedded model, without a set or an override)."""


NOT_CHOSEN = NotChosen("")
NOT_CHOSEN_REASON = ("no extractor chosen for this model's images (the emoji heads are validated on the embedded "
                     "model's only): pick a published protocol with --metrics dreambooth / consistory / csd "
                     "(weights from local folders, --feature-model NAME=PATH), --metrics emoji to use the emoji "
                     "heads anyway, or an extractor (--style-features ...)")
RESULT_NAMES = {"style": "style_consistency", "object": "object_consistency", "text": "text_alignment",
                "diversity": "diversity", "shape": "shape_consistency", "concept": "concept_consistency",
                "fidelity": "fidelity"}
OUT_OF_DOMAIN = "validated on held-out real emoji (the embedded model's images) only, not on this model's"


# ----------------------------------------------------------------------------- extractor choice


def model_kind(model: Any) -> str | None:
    """The kind ("embedded", "folder", "single_file", "hub", "in_memory") of ``model``: a
    ``ModelIdentity``, a manifest's model record (a mapping with "kind"), a kind string, a pipeline
    (its recorded identity), or None (unknown)."""
    if model is None or isinstance(model, str):
        return model
    if isinstance(model, Mapping):
        return model.get("kind")
    if hasattr(model, "kind") and hasattr(model, "spec"):  # a ModelIdentity
        return model.kind
    from consistent_diffusion.models.loading import model_identity

    return model_identity(model).kind


def resolve_extractors(overrides: Mapping[str, ExtractorLike | None] | None = None, model: Any = None,
                       sets: Sequence[str] | None = None) -> dict[str, ExtractorLike | None]:
    """The extractor of each axis in ``EXTRACTOR_AXES``: the ``EXTRACTOR_SETS`` named in ``sets``
    (default: "emoji" on the embedded model, none elsewhere; ``model`` as ``model_kind`` takes it,
    None counts as not embedded), then ``overrides``. An axis left without one is ``NOT_CHOSEN``
    (scored as not measured); an explicit None skips "text" and "clip_i"; diversity is pixel by default."""
    unknown = sorted(set(overrides or {}) - set(EXTRACTOR_AXES))
    if unknown:
        raise ConfigError(f"unknown extractor axes {unknown}; accepted: {', '.join(EXTRACTOR_AXES)}")
    chosen: dict[str, ExtractorLike | None] = {axis: NOT_CHOSEN for axis in ("style", "object", "concept", "text")}
    chosen.update({"diversity": DEFAULT_EXTRACTORS["diversity"], "clip_i": None})
    for name in chosen_sets(sets, model):
        chosen.update(EXTRACTOR_SETS[name].extractors)
    chosen.update(overrides or {})
    return chosen


def chosen_sets(sets: Sequence[str] | None, model: Any = None) -> tuple[str, ...]:
    """``sets`` checked, or the model's default ("emoji" on the embedded model, none elsewhere)."""
    if sets:
        unknown = [name for name in sets if name not in EXTRACTOR_SETS]
        if unknown:
            raise ConfigError(f"unknown extractor sets {unknown}; accepted: {', '.join(EXTRACTOR_SETS)}")
        return tuple(sets)
    return ("emoji",) if model_kind(model) == EMBEDDED else ()


# ----------------------------------------------------------------------------- one axis each


@dataclass(frozen=True)
class _Inputs:
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


def _count(images: ImagesLike) -> int:
    return images.shape[0] if hasattr(images, "shape") else len(images)


def _image_set(images: ImagesLike | None) -> ImagesLike | None:
    """One image (PIL, path, (3, H, W) tensor, (H, W, 3) array) as a set of one; an empty set as None."""
    if images is None:
        return None
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 3:
        return images[None]
    return images if _count(images) else None


def _first(images: ImagesLike, n: int = 1) -> ImagesLike:
    """The set's first image, ``n`` times (a list for lists, a batch for tensors and arrays)."""
    if isinstance(images, torch.Tensor):
        return images[:1].expand(n, *images.shape[1:])
    if isinstance(images, np.ndarray):
        return np.repeat(images[:1], n, axis=0)
    return [images[0]] * n


def _style(inp: _Inputs, to_reference: bool = True) -> dict[str, MetricResult]:
    reference = inp.references if to_reference else None
    return {"style": m.style_consistency(inp.images, inp.extractor("style"), reference=reference,
                                         device=inp.device)}


def _object(inp: _Inputs) -> dict[str, MetricResult]:
    results = {"object": m.object_consistency(inp.images, inp.references, inp.extractor("object"),
                                              foreground=inp.foreground, device=inp.device)}
    if inp.extractors.get("clip_i") is not None:  # DreamBooth's second object score
        results["object_clip_i"] = _measure("clip_i", lambda: m.object_consistency(
            inp.images, inp.references, inp.extractor("clip_i"), foreground=inp.foreground, device=inp.device), inp)
    return results


def _text(inp: _Inputs) -> dict[str, MetricResult]:
    if inp.extractors["text"] is None:
        return {}
    if inp.prompts is None:
        raise ConfigError("text alignment needs the images' prompts (prompts=, one per image)")
    return {"text": m.text_alignment(inp.images, inp.prompts, inp.extractor("text"), device=inp.device)}


def _diversity(inp: _Inputs) -> dict[str, MetricResult]:
    chosen = inp.extractors["diversity"]
    extractor = chosen if chosen in (None, "pixel") else inp.extractor("diversity")
    return {"diversity": m.diversity(inp.images, extractor=extractor, device=inp.device)}


def _shape(inp: _Inputs) -> dict[str, MetricResult]:
    controls = inp.controls if inp.controls is not None else inp.references
    if controls is None:
        raise ConfigError("the shape metric needs a control image: give controls (CLI: --control) or references")
    if _count(controls) not in (1, inp.images.shape[0]):
        raise ConfigError(f"give one control image or one per series image ({inp.images.shape[0]}), "
                          f"got {_count(controls)}")
    return {"shape": m.shape_consistency(inp.images, controls, mode=inp.shape_mode, control_kind=inp.control_kind,
                                         resize=True)}


def _fidelity(inp: _Inputs, features: bool = True) -> dict[str, MetricResult]:
    """PSNR, SSIM and (``features``) the object extractor's feature distance to the source images."""
    if inp.references is None:
        raise ConfigError("the fidelity metric needs its source image: give references (CLI: --reference)")
    if _count(inp.references) not in (1, inp.images.shape[0]):
        raise ConfigError(f"fidelity: give one source image or one per series image ({inp.images.shape[0]})")
    try:
        extractor = inp.extractor("object") if features else None
        results = m.fidelity(inp.images, inp.references, extractor, resize=True, device=inp.device)
    except ModelNotFoundError as error:
        if inp.strict:
            raise
        results = m.fidelity(inp.images, inp.references, None, resize=True, device=inp.device)
        results["feature_distance"] = MetricResult.not_measured("fidelity_feature_distance", str(error),
                                                                _extractor_name(inp.extractors["object"]))
    return {f"fidelity_{key}": value for key, value in results.items()}


def _concept(inp: _Inputs) -> dict[str, MetricResult]:
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
    result = m.concept_consistency(inp.images, inp.references, text, inp.extractor("concept"),
                                   text_extractor if text_extractor is not None else m.DEFAULT_EXTRACTORS["text"],
                                   foreground=inp.foreground, device=inp.device)
    if missing is not None:
        result.details["text_not_measured"] = missing
    return {"concept": result}


AXES: dict[str, Callable[[_Inputs], dict[str, MetricResult]]] = {
    "style": _style, "object": _object, "text": _text, "diversity": _diversity, "shape": _shape,
    "fidelity": _fidelity, "concept": _concept,
}


def _extractor_name(extractor: ExtractorLike | None) -> str | None:
    if isinstance(extractor, NotChosen):
        return None
    return extractor if extractor is None or isinstance(extractor, str) else extractor.name


def _measure(axis: str, run: Callable[[], Any], inputs: _Inputs) -> Any:
    """``run()``, or a not-measured result when the axis has no extractor or its weights are missing
    (unless strict): {axis: result}, or the bare result for "clip_i" (an extra object score)."""
    extractor = inputs.extractors.get("object" if axis == "fidelity" else axis)
    try:
        return run()
    except ModelNotFoundError as error:
        if inputs.strict:
            raise
        result = MetricResult.not_measured(RESULT_NAMES.get(axis, axis), str(error), _extractor_name(extractor))
        return result if axis == "clip_i" else {axis: result}


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
    fidelity_psnr, fidelity_ssim, fidelity_feature_distance, concept (and the ``kind`` names above).
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
    inputs = _Inputs(
        images=as_batch(images), prompts=None if prompts is None else list(prompts),
        references=_image_set(references), controls=_image_set(controls), concept_text=concept_text or None,
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


def _score_metrics(metrics: Sequence[str], inputs: _Inputs) -> dict[str, MetricResult]:
    results: dict[str, MetricResult] = {}
    for axis in metrics:
        results.update(_measure(axis, lambda axis=axis: AXES[axis](inputs), inputs))
    return results


def _score_kind(kind: str, inputs: _Inputs) -> dict[str, MetricResult]:
    """A bench cell's scores: its kind's consistency, then the reference scores, text, diversity."""
    references = inputs.references
    if kind == "shape" and references is None and inputs.controls is None:
        raise ConfigError("a shape task needs a reference image (its control)")
    results = _measure(kind, lambda: _kind_consistency(kind, inputs), inputs)
    if references is not None:  # shape tasks too: "ControlNet controls shape, not identity" reads it
        if kind == "object":  # the same measurement as the kind's own
            results["reference_object"] = _copy(results["object"])
        else:  # on a style task: object leakage (a style method should not copy the reference's subject)
            results["reference_object"] = _measure("object", lambda: _object(inputs), inputs)["object"]
        # agreement with the reference's style (the to-reference protocol): a style task's target,
        # and what a combination with a style method keeps on the other kinds
        results["reference_style"] = _measure("style", lambda: _style(inputs, to_reference=True), inputs)["style"]
        if kind != "shape":
            fidelity = _fidelity(dataclasses.replace(inputs, references=_first(references)), features=False)
            results["reference_fidelity"] = fidelity["fidelity_ssim"]
            results["reference_psnr"] = fidelity["fidelity_psnr"]
    results.update(_measure("text", lambda: _text(inputs), inputs))
    results.update(_measure("diversity", lambda: _diversity(inputs), inputs))
    return results


def _kind_consistency(kind: str, inputs: _Inputs) -> dict[str, MetricResult]:
    """Style: within the set (a style task's series agrees with itself); shape: against the first
    reference (the task's control) unless controls are given; object, concept: as ``metrics``."""
    if kind == "style":
        return _style(inputs, to_reference=False)
    if kind == "shape":
        controls = inputs.controls
        if controls is None:
            controls = _first(inputs.references, inputs.images.shape[0])
        return _shape(dataclasses.replace(inputs, controls=controls))
    return AXES[kind](inputs)


def _copy(result: MetricResult) -> MetricResult:
    return dataclasses.replace(result, per_image=list(result.per_image), details=dict(result.details))


def _outside_validation(result: MetricResult) -> None:
    """Off the embedded model a score is not validated: the table's record stays, marked as not applying."""
    if result.validation is not None:
        result.validation = {**result.validation, "applies": False, "note": OUT_OF_DOMAIN}
    result.validated = None


# ----------------------------------------------------------------------------- series folders


@dataclass
class ScoreConfig:
    """What to score and with which extractors."""

    series: Path  # a folder written by `consistent-diffusion generate` (holds manifest.json)
    metrics: tuple[str, ...] = DEFAULT_METRICS  # any of METRIC_NAMES
    reference: Path | None = None  # image or folder: style/object reference, fidelity source
    control: Path | None = None  # control image (shape); default: the reference
    control_kind: str = "image"  # "image": extract edges/silhouette; "map": already a ControlNet map
    shape_mode: str = "edges"  # edges (chance-corrected F1) | edges-f1 | silhouette
    concept_text: str | None = None  # concept definition as text (concept metric)
    extractors: dict[str, str] = field(default_factory=dict)  # metric -> extractor name overrides
    extractor_sets: tuple[str, ...] = ()  # EXTRACTOR_SETS names; () = the model's default
    feature_models: dict[str, str] = field(default_factory=dict)  # extractor name -> local weights (model=)
    device: str = "cpu"
    skip_unavailable: bool = True  # a metric whose weights are missing (e.g. CLIP offline) is skipped, noted

    def __post_init__(self) -> None:
        self.series = Path(self.series)
        self.metrics = tuple(self.metrics)
        self.extractor_sets = tuple(self.extractor_sets)
        chosen_sets(self.extractor_sets)  # unknown sets fail here
        unknown = [name for name in self.metrics if name not in METRIC_NAMES]
        if unknown:
            raise ConfigError(f"unknown metrics {unknown}; accepted: {', '.join(METRIC_NAMES)}")
        if not self.metrics:
            raise ConfigError("no metrics chosen")
        self.reference = Path(self.reference) if self.reference else None
        self.control = Path(self.control) if self.control else None
        if self.shape_mode not in m.SHAPE_MODES:
            raise ConfigError(f"shape mode must be one of {', '.join(m.SHAPE_MODES)}, got {self.shape_mode!r}")


def read_series(folder: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]], torch.Tensor]:
    """(manifest, image records, images (N, 3, H, W) in [-1, 1]) of a series folder, with clear errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"series folder not found: {folder}")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(
            f"{folder} has no manifest.json, so it is not a series folder; score folders written by "
            "`consistent-diffusion generate`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{manifest_path} is not valid JSON: {error}") from None
    records = manifest.get("images") if isinstance(manifest, dict) else None
    if not records or not isinstance(records, list):
        raise ConfigError(f"{manifest_path} lists no images (no 'images' entries)")
    images = []
    for record in records:
        path = folder / str(record.get("file", ""))
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageInputError(f"manifest entry {record.get('file')!r} is not an image file name")
        images.append(load_image(path))
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        by_size = {size: [r["file"] for r, im in zip(records, images, strict=True) if im.size == size][:3]
                   for size in sizes}
        raise ImageInputError(f"images of the series have different sizes (width, height): {by_size}")
    return manifest, records, as_batch(images)


def read_reference(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Reference image(s) as a batch at the series' (width, height): a file or every image of a folder."""
    files = list_images(path) if path.is_dir() else [path]
    if not files:
        raise ImageInputError(f"no images in reference folder {path}")
    return as_batch([load_image(f, size=size) for f in files])


def score_series(config: ScoreConfig, log=print) -> dict[str, Any]:
    """Run the metrics on a series; returns the scores document (also written as scores.json).

    Axes that could not be measured (missing weights) are listed under "skipped" with the reason,
    unless ``config.skip_unavailable`` is False (then the error is raised)."""
    from consistent_diffusion.core.outputs import library_versions, utc_now, write_json_atomic

    manifest, records, images = read_series(config.series)
    size = (images.shape[-1], images.shape[-2])
    reference = read_reference(config.reference, size) if config.reference else None
    control = read_reference(config.control, size) if config.control else reference
    results = score(
        images, metrics=config.metrics, prompts=[str(r.get("prompt", "")) for r in records], references=reference,
        controls=control, concept_text=config.concept_text, extractors=config.extractors,
        extractor_sets=config.extractor_sets or None,
        extractor_options={name: {"model": path} for name, path in config.feature_models.items()},
        model=manifest.get("model") or {}, device=config.device, shape_mode=config.shape_mode,
        control_kind=config.control_kind, strict=not config.skip_unavailable,
    )
    skipped = {key: res.details["not_measured"] for key, res in results.items() if not res.measured}
    results = {key: res for key, res in results.items() if res.measured}
    for key in results:
        log(f"scored {key}")
    for key, reason in skipped.items():
        log(f"skipped {key}: {reason}")
    pixel_diversity = results.get("diversity")
    if pixel_diversity is None or pixel_diversity.extractor != "pixel":
        pixel_diversity = m.diversity(images)
    for res in results.values():
        if res.name != "diversity" and "diversity" not in res.details:
            res.details["diversity"] = pixel_diversity.aggregate
    document = {
        "format": SCORES_FORMAT,
        "series": str(config.series.name),
        "images": [{"file": r.get("file"), "prompt": r.get("prompt"), "seed": r.get("seed")} for r in records],
        "reference": str(config.reference) if config.reference else None,
        "control": str(config.control) if config.control else None,
        "metrics": {key: res.to_dict() for key, res in results.items()},
        "skipped": skipped,
        "created": utc_now(),
        "versions": library_versions(),
    }
    write_json_atomic(document, config.series / "scores.json")
    return document


def format_table(document: dict[str, Any]) -> str:
    """Short text table: metric, extractor, aggregate, diversity beside it, validation status."""
    rows = [("metric", "extractor", "score", "diversity", "status")]
    for key, res in document["metrics"].items():
        value = res["aggregate"]
        div = res["details"].get("diversity")
        if res["validated"] is True:
            status = f"validated (AUC {res['validation']['auc']:.2f})"
        elif res["validated"] is False:
            status = f"validated: false (AUC {res['validation']['auc']:.2f} < {res['validation']['bar']:.2f})"
        elif (res["validation"] or {}).get("applies") is False:
            status = "not validated on this model (validated on emoji only)"
        else:
            status = "not validated"
        guard = res["details"].get("guard")
        if guard:
            status += f"; guard: {guard}"
        rows.append((key, str(res["extractor"]), "n/a" if value is None else f"{value:.4f}",
                     "" if div is None else f"{div:.4f}", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [f"skipped {name}: {reason}" for name, reason in document.get("skipped", {}).items()]
    return "\n".join(lines)


def parse_metric_list(values: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--metrics a b,c -> (metrics, extractor sets): names of ``EXTRACTOR_SETS`` choose sets, the
    others metrics; "all": every metric. Only sets given: the metrics their extractors serve (and
    diversity); nothing: the defaults."""
    names = tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())
    sets = tuple(n for n in names if n in EXTRACTOR_SETS)
    metrics = tuple(n for n in names if n not in EXTRACTOR_SETS)
    if metrics == ("all",):
        return METRIC_NAMES, sets
    if not metrics and sets:
        served = {axis for name in sets for axis in EXTRACTOR_SETS[name].extractors} - {"clip_i", "concept"}
        return tuple(n for n in METRIC_NAMES if n in served or n == "diversity"), sets
    return metrics or DEFAULT_METRICS, sets


def parse_feature_models(values: Sequence[str]) -> dict[str, str]:
    """["dino=DIR", "csd=FILE"] -> {"dino": "DIR", "csd": "FILE"}, with a clear error for a bad item."""
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--feature-model takes NAME=PATH (e.g. dino=weights/dino-vits16), got {value!r}")
        models[name.strip()] = path.strip()
    return models
