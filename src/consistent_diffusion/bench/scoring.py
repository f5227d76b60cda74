"""Score one cell's images with the metrics its task's kind calls for.

Every cell gets its kind's consistency metric, text alignment (where an extractor with a text
tower is configured) and diversity, so "all images identical" never reads as success. Each
score carries the metric's validation status from the metrics issue's table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consistent_diffusion.bench.suite import Cell

KIND_METRIC = {"style": "style", "object": "object", "concept": "concept", "shape": "shape"}


def make_scorer(extractors: Mapping[str, str | None] | None = None, device: str = "cpu"):
    """A scorer ``(cell, images, references) -> {metric: MetricResult dict}``.

    extractors: optional override per metric ("style", "object", "concept", "text", "diversity");
    None for "text" skips text alignment. Defaults are the metrics' validated defaults.
    """
    from consistent_diffusion import metrics

    chosen: dict[str, Any] = dict(metrics.DEFAULT_EXTRACTORS)
    chosen.update(extractors or {})

    def score(cell: Cell, images: list, references: list[str]) -> dict[str, Any]:
        prompts = [prompt for prompt in cell.task.prompts for _ in cell.task.seeds]
        kind = cell.task.kind
        scores: dict[str, Any] = {}
        if kind == "style":
            scores["style"] = metrics.style_consistency(images, extractor=chosen["style"], device=device)
        elif kind == "object":
            scores["object"] = metrics.object_consistency(
                images, references=references or None, extractor=chosen["object"], device=device
            )
        elif kind == "concept":
            scores["concept"] = metrics.concept_consistency(
                images, exemplars=references or None, text=cell.task.description or None,
                extractor=chosen["concept"], device=device,
            )
        elif kind == "shape":
            scores["shape"] = metrics.shape_consistency(images, controls=[references[0]] * len(images), resize=True)
        if references:  # shape tasks too: "ControlNet controls shape, not identity" reads it
            scores["reference_object"] = metrics.object_consistency(
                images, references=references, extractor=chosen["object"], device=device
            )
        if references and kind != "shape":
            fidelity = metrics.fidelity(images, sources=[references[0]], resize=True)
            scores["reference_fidelity"], scores["reference_psnr"] = fidelity["ssim"], fidelity["psnr"]
        if chosen.get("text"):
            scores["text"] = metrics.text_alignment(images, prompts, extractor=chosen["text"], device=device)
        scores["diversity"] = metrics.diversity(images, extractor=chosen.get("diversity"), device=device)
        return {name: value.to_dict() for name, value in scores.items()}

    return score
