"""Scoring a series folder: ``score_series`` reads it, runs ``score`` and writes ``scores.json``
beside the manifest; ``format_table`` prints it (``consistent-diffusion score DIR``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.core.images import IMAGE_SUFFIXES, list_images, load_image
from consistent_diffusion.metrics import consistency as m
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.metrics.extractor_sets import DEFAULT_METRICS, METRIC_NAMES, chosen_sets

SCORES_FORMAT = "consistent-diffusion/scores/v1"



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
    from consistent_diffusion.metrics.score import score  # imports this module: at call time

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
