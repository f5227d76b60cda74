"""Columns computed from the cells' images on disk when a report is merged (or re-scored).

- ``plain_distance`` (every non-plain cell with a plain cell of the same size on its task): each
  image's mean absolute pixel difference, in levels of 255, to plain's image of the same prompt and
  seed. It needs two cells, so no cell can score it alone. A cell whose mean stays under
  ``NO_EFFECT_LEVELS`` has *no measurable effect* (``CellRecord.no_effect``).
- ``within_series`` (object and concept cells): subject agreement between the cell's own images
  (``metrics.axes.score_within_series``). New runs score it with the cell; here it is added to
  cells of an older report that lack it, with the report model's default extractor set.

``rescore(out_dir)`` adds both to an existing bench folder (``cells/<id>/series`` with a manifest)
and rewrites ``report.json``, ``report.md`` and ``report.html``; the numbers are pure functions of
the PNGs on disk (deterministic).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from consistent_diffusion.bench.cell_records import PLAIN_DISTANCE, WITHIN_SERIES, CellRecord, Score
from consistent_diffusion.bench.records import Report, load_report, summary_table

LEVELS = 127.5  # images in [-1, 1] -> levels of 255
WITHIN_SERIES_KINDS = ("object", "concept")


def series_folder(out_dir: Path, cell_id: str) -> Path:
    return Path(out_dir) / "cells" / cell_id / "series"


def read_cell_images(out_dir: Path, cell_id: str) -> Any:
    """The cell's images (N, 3, H, W) in [-1, 1], in manifest order; None where the series is not on disk."""
    from consistent_diffusion.metrics.series_scores import read_series

    folder = series_folder(out_dir, cell_id)
    if not (folder / "manifest.json").is_file():
        return None
    return read_series(folder)[2]


def plain_distances(images: Any, plain: Any) -> list[float]:
    """Per image: mean absolute difference to plain's image of the same index (same prompt and seed),
    in levels of 255, over pixels and channels. images, plain: (N, 3, H, W) in [-1, 1]. Summed in
    float64 by numpy on integer levels: the same number at any thread count."""
    if images.shape != plain.shape:
        raise ValueError(f"cells of shapes {tuple(images.shape)} and {tuple(plain.shape)} are not paired")
    ours, theirs = (np.rint((np.asarray(x, dtype=np.float64) + 1) * LEVELS) for x in (images, plain))
    return [round(float(value), 4) for value in np.abs(ours - theirs).mean(axis=(1, 2, 3))]


def plain_distance_score(distances: list[float]) -> Score:
    return Score(name=PLAIN_DISTANCE, extractor="pixel", aggregate=round(sum(distances) / len(distances), 4),
                 per_image=tuple(distances), higher_is_better=False, range=(0.0, 255.0), validated=None,
                 details={"unit": "levels of 255, mean absolute difference to plain's image of the same prompt "
                                  "and seed"})


def within_series_score(images: Any, model: Any) -> Score | None:
    """``within_series`` of one cell's images with the model's default extractor set; None when not measured."""
    from consistent_diffusion.metrics.score import score

    result = score(images, metrics=(WITHIN_SERIES,), model=model)[WITHIN_SERIES]
    return Score.from_dict(result) if result.measured else None


def add_image_columns(report: Report, out_dir: str | Path, threads: int = 1) -> Report:
    """``report`` with ``plain_distance`` and (where missing) ``within_series`` added to its cells
    from the images under ``out_dir``; cells whose series is not on disk are left as they are.
    Feature extraction runs at ``threads`` torch threads (the bench's own count: the same numbers
    whatever ``OMP_NUM_THREADS`` the merging process has)."""
    from consistent_diffusion.bench.prepare import torch_threads

    with torch_threads(threads):
        return _add_image_columns(report, Path(out_dir))


def _add_image_columns(report: Report, out_dir: Path) -> Report:
    cache: dict[str, Any] = {}

    def images_of(cell: CellRecord) -> Any:
        if cell.id not in cache:
            cache[cell.id] = read_cell_images(out_dir, cell.id)
        return cache[cell.id]

    cells = []
    for cell in report.cells:
        added: dict[str, Score] = {}
        images = images_of(cell)
        if images is not None and cell.kind in WITHIN_SERIES_KINDS and WITHIN_SERIES not in cell.scores:
            within = within_series_score(images, report.model)
            if within is not None:
                added[WITHIN_SERIES] = within
        plain = report.plain(cell.task)
        if images is not None and plain is not None and not cell.is_plain:
            plain_images = images_of(plain)
            if plain_images is not None and plain_images.shape == images.shape:
                added[PLAIN_DISTANCE] = plain_distance_score(plain_distances(images, plain_images))
        cells.append(dataclasses.replace(cell, scores={**cell.scores, **added}) if added else cell)
    return dataclasses.replace(report, cells=tuple(cells))


def with_image_columns(report: Report, out_dir: str | Path, threads: int = 1) -> Report:
    """``add_image_columns``, then the table and the intervals recomputed over every score."""
    from consistent_diffusion.bench.stats import report_intervals

    report = add_image_columns(report, out_dir, threads)
    report = dataclasses.replace(report, table=summary_table(report.cells))
    return dataclasses.replace(report, intervals=report_intervals(report))


def rescore(out_dir: str | Path) -> Report:
    """Add the image columns to the bench folder ``out_dir`` and rewrite its report.json, .md, .html."""
    from consistent_diffusion.bench.report import write_reports
    from consistent_diffusion.core.outputs import write_json_atomic

    out_dir = Path(out_dir)
    report = with_image_columns(load_report(out_dir), out_dir)
    write_json_atomic(report.to_dict(), out_dir / "report.json")
    write_reports(report, out_dir)
    return report
