"""Score a series folder (``consistent-diffusion score DIR``): read its manifest and images, run the
chosen metrics, write ``scores.json`` beside the manifest (atomically)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ImageInputError, ModelNotFoundError
from consistent_diffusion.core.images import IMAGE_SUFFIXES, list_images, load_image
from consistent_diffusion.metrics import consistency as m
from consistent_diffusion.metrics.common import MetricResult, as_batch

SCORES_FORMAT = "consistent-diffusion/scores/v1"
METRIC_NAMES = ("style", "object", "text", "diversity", "shape", "fidelity", "concept")
DEFAULT_METRICS = ("style", "object", "text", "diversity")


@dataclass
class ScoreConfig:
    """What to score and with which extractors."""

    series: Path  # a folder written by `consistent-diffusion generate` (holds manifest.json)
    metrics: tuple[str, ...] = DEFAULT_METRICS  # any of METRIC_NAMES
    reference: Path | None = None  # image or folder: style/object reference, fidelity source
    control: Path | None = None  # control image (shape); default: the reference
    control_kind: str = "image"  # "image": extract edges/silhouette; "map": already a ControlNet map
    shape_mode: str = "edges"  # edges | silhouette
    concept_text: str | None = None  # concept definition as text (concept metric)
    extractors: dict[str, str] = field(default_factory=dict)  # metric -> extractor name overrides
    device: str = "cpu"
    skip_unavailable: bool = True  # a metric whose weights are missing (e.g. CLIP offline) is skipped, noted

    def __post_init__(self) -> None:
        self.series = Path(self.series)
        self.metrics = tuple(self.metrics)
        unknown = [name for name in self.metrics if name not in METRIC_NAMES]
        if unknown:
            raise ConfigError(f"unknown metrics {unknown}; accepted: {', '.join(METRIC_NAMES)}")
        if not self.metrics:
            raise ConfigError("no metrics chosen")
        self.reference = Path(self.reference) if self.reference else None
        self.control = Path(self.control) if self.control else None
        if self.shape_mode not in ("edges", "silhouette"):
            raise ConfigError(f"shape mode must be edges or silhouette, got {self.shape_mode!r}")


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
    """Run the metrics on a series; returns the scores document (also written as scores.json)."""
    from consistent_diffusion.core.outputs import library_versions, utc_now, write_json_atomic

    manifest, records, images = read_series(config.series)
    size = (images.shape[-1], images.shape[-2])
    reference = read_reference(config.reference, size) if config.reference else None
    control = read_reference(config.control, size) if config.control else reference
    prompts = [str(r.get("prompt", "")) for r in records]
    kind = (manifest.get("model") or {}).get("kind")
    extractors = {**m.DEFAULT_EXTRACTORS, "text": "emoji-text" if kind == "embedded" else "clip",
                  **config.extractors}
    results: dict[str, MetricResult] = {}
    skipped: dict[str, str] = {}
    diversity_value = m.diversity(images)
    for name in config.metrics:
        try:
            _score_one(name, config, images, prompts, reference, control, extractors, results, diversity_value)
        except ModelNotFoundError as error:
            if not config.skip_unavailable:
                raise
            skipped[name] = str(error)
            log(f"skipped {name}: {error}")
            continue
        log(f"scored {name}")
    for res in results.values():
        if res.name != "diversity" and "diversity" not in res.details:
            res.details["diversity"] = diversity_value.aggregate
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


def _score_one(name: str, config: ScoreConfig, images: torch.Tensor, prompts: list[str],
               reference: torch.Tensor | None, control: torch.Tensor | None, extractors: dict[str, str],
               results: dict[str, MetricResult], diversity_value: MetricResult) -> None:
    """Run one metric into ``results`` (raises ConfigError for missing inputs)."""
    if name == "style":
        results["style"] = m.style_consistency(images, extractors["style"], reference=reference,
                                               device=config.device)
    elif name == "object":
        results["object"] = m.object_consistency(images, reference, extractors["object"], device=config.device)
    elif name == "text":
        results["text"] = m.text_alignment(images, prompts, extractors["text"], device=config.device)
    elif name == "diversity":
        results["diversity"] = diversity_value
        if extractors.get("diversity") not in (None, "pixel"):
            results["diversity_features"] = m.diversity(images, extractors["diversity"], config.device)
    elif name == "shape":
        if control is None:
            raise ConfigError("the shape metric needs a control image: pass --control IMG (or --reference)")
        if control.shape[0] not in (1, images.shape[0]):
            raise ConfigError(f"give one control image or one per series image ({images.shape[0]}), "
                              f"got {control.shape[0]}")
        results["shape"] = m.shape_consistency(images, control, mode=config.shape_mode,
                                               control_kind=config.control_kind)
    elif name == "fidelity":
        if reference is None:
            raise ConfigError("the fidelity metric needs its source image: pass --reference IMG")
        if reference.shape[0] not in (1, images.shape[0]):
            raise ConfigError(f"fidelity: give one source image or one per series image ({images.shape[0]})")
        for key, value in m.fidelity(images, reference, extractors["object"], device=config.device).items():
            results[f"fidelity_{key}"] = value
    elif name == "concept":
        if reference is None and not config.concept_text:
            raise ConfigError("the concept metric needs the concept: --reference exemplars and/or --concept-text")
        results["concept"] = m.concept_consistency(
            images, reference, config.concept_text, extractors["concept"], extractors["text"],
            device=config.device)


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


def parse_metric_list(values: Sequence[str] | None) -> tuple[str, ...]:
    """--metrics a b,c -> ("a", "b", "c"); None: the defaults; "all": every metric."""
    if not values:
        return DEFAULT_METRICS
    names = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
    return METRIC_NAMES if names == ("all",) else names
