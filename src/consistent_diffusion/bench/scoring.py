"""The bench's scorer: one cell's images through ``consistent_diffusion.metrics.score.score``.

Every cell gets its task kind's consistency metric, the reference scores where the task has
references, text alignment and diversity (so "all images identical" never reads as success);
``score`` chooses the extractors (the validated emoji heads on the embedded model; elsewhere the
extractor sets the user chose, e.g. DreamBooth's DINO / CLIP-I / CLIP-T, or "not measured") and says
whether each score's validation applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from consistent_diffusion.bench.suite import Cell


def make_scorer(extractors: Mapping[str, Any] | None = None, device: str = "cpu",
                extractor_sets: Sequence[str] | None = None,
                extractor_options: Mapping[str, Mapping[str, Any]] | None = None):
    """A scorer ``(cell, images, references, model=None) -> {metric: MetricResult dict}``.

    extractors: optional override per axis ("style", "object", "concept", "text", "diversity",
    "clip_i"); None for "text" skips text alignment. extractor_sets / extractor_options: as
    ``score`` takes them (default: the model's own set). model: the ``ModelIdentity`` of the
    pipeline that made the images (None: unknown, treated as not the embedded model).
    """
    from consistent_diffusion.metrics.score import resolve_extractors, score

    resolve_extractors(extractors, sets=extractor_sets)  # unknown axes and sets fail now, not at the first cell

    def scorer(cell: Cell, images: list, references: list[str], model: Any = None) -> dict[str, Any]:
        prompts = [prompt for prompt in cell.task.prompts for _ in cell.task.seeds]
        results = score(images, kind=cell.task.kind, prompts=prompts, references=list(references) or None,
                        concept_text=cell.task.description or None, extractors=extractors,
                        extractor_sets=extractor_sets, extractor_options=extractor_options, model=model,
                        device=device)
        return {name: result.to_dict() for name, result in results.items()}

    return scorer
