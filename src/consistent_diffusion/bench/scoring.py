"""The bench's scorer: one cell's images through ``consistent_diffusion.metrics.score.score``.

Every cell gets its task kind's consistency metric, the reference scores where the task has
references, text alignment and diversity (so "all images identical" never reads as success);
``score`` chooses the extractors (the validated emoji defaults on the embedded model; CLIP or "not
measured" for text elsewhere) and says whether each score's validation applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consistent_diffusion.bench.suite import Cell


def make_scorer(extractors: Mapping[str, Any] | None = None, device: str = "cpu"):
    """A scorer ``(cell, images, references, model=None) -> {metric: MetricResult dict}``.

    extractors: optional override per axis ("style", "object", "concept", "text", "diversity");
    None for "text" skips text alignment. model: the ``ModelIdentity`` of the pipeline that made
    the images (None: unknown, treated as not the embedded model).
    """
    from consistent_diffusion.metrics.score import resolve_extractors, score

    resolve_extractors(extractors)  # unknown axes fail now, not at the first cell

    def scorer(cell: Cell, images: list, references: list[str], model: Any = None) -> dict[str, Any]:
        prompts = [prompt for prompt in cell.task.prompts for _ in cell.task.seeds]
        results = score(images, kind=cell.task.kind, prompts=prompts, references=list(references) or None,
                        concept_text=cell.task.description or None, extractors=extractors, model=model,
                        device=device)
        return {name: result.to_dict() for name, result in results.items()}

    return scorer
