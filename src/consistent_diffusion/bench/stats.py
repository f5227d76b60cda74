"""Uncertainty of bench numbers: samples, bootstrap intervals, paired differences, verdicts.

- **Samples.** A cell's per-image values, in the series' order (prompt-major: prompt p, seed s is
  image ``p * len(seeds) + s``). Each image is one sample, except for a method whose output does
  not depend on the seed (``SEED_INDEPENDENT``: a DDPM edit's noise maps fix its output): its seeds
  are not independent draws, so each prompt is one sample (the mean over its seeds).
- **Intervals** (``bootstrap_interval``): the percentile 95% interval of the mean under a two-stage
  (cluster) bootstrap: draw tasks with replacement, then samples within each drawn task with
  replacement; with one task only the second stage runs. 2,000 draws from a generator with a fixed
  seed, in float64 with numpy: the same numbers on every machine and thread count.
- **Paired differences** (``paired_samples``): method minus plain generation on the same prompts
  and seeds, image by image (or prompt by prompt as above), so what the prompts and seeds share
  cancels out.
- **Verdicts** (``verdict``): a claim is *held* when the interval of every comparison it rests on
  lies strictly on the side it predicts, *not held* when every interval excludes zero and one lies
  on the other side, and *inconclusive* otherwise (some interval contains zero).

Plain Python + numpy (no torch): a report loads and is summarised cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
DRAWS = 2000
SEED = 0
SEED_INDEPENDENT = frozenset({"ddpm_edit"})  # registered methods whose output the seed does not change
HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% bootstrap interval; ``samples`` is how many independent values it rests on."""

    mean: float
    low: float
    high: float
    samples: int = 0

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": round(self.mean, 6), "low": round(self.low, 6), "high": round(self.high, 6),
                "samples": self.samples}

    def text(self, digits: int = 3, signed: bool = False) -> str:
        """``0.154 [0.088, 0.220]`` (``+0.050 [-0.021, +0.113]`` when signed)."""
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def samples(values: Sequence[float | None], seeds: int, seed_independent: bool = False) -> list[float]:
    """The independent samples of one cell's per-image ``values`` (None and non-finite dropped):
    the values themselves, or one mean per prompt when the method ignores the seed."""
    array = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if seed_independent and seeds > 1 and array.size % seeds == 0:
        with np.errstate(invalid="ignore"):
            array = np.nanmean(array.reshape(-1, seeds), axis=1)
    return [float(v) for v in array if np.isfinite(v)]


def paired_samples(method: Sequence[float | None], plain: Sequence[float | None], seeds: int,
                   seed_independent: bool = False) -> list[float]:
    """Method minus plain, image by image (same prompts, same seeds); per prompt for a method that
    ignores the seed. Images missing on either side are dropped. Raises ValueError when the two
    cells have different numbers of images (they are not paired)."""
    if len(method) != len(plain):
        raise ValueError(f"cells of {len(method)} and {len(plain)} images are not paired")
    diffs = [None if a is None or b is None else float(a) - float(b) for a, b in zip(method, plain, strict=True)]
    return samples(diffs, seeds, seed_independent)


def bootstrap_interval(groups: Sequence[Sequence[float]], confidence: float = CONFIDENCE, draws: int = DRAWS,
                       seed: int = SEED) -> Interval | None:
    """The mean of all samples and its two-stage bootstrap interval; ``groups`` holds each task's
    samples (empty groups are dropped). None when there is no sample."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return None
    everything = np.concatenate(groups)
    rng = np.random.default_rng(seed)
    count = len(groups)
    chosen = rng.integers(0, count, (draws, count)) if count > 1 else np.zeros((draws, 1), dtype=np.int64)
    sums, sizes = np.zeros(draws), np.zeros(draws)
    for index, group in enumerate(groups):  # every occurrence of a task in a draw gets its own resample
        rows = np.nonzero(chosen == index)[0]
        if rows.size:
            resampled = group[rng.integers(0, group.size, (rows.size, group.size))].sum(axis=1)
            np.add.at(sums, rows, resampled)
            np.add.at(sizes, rows, group.size)
    means = sums / sizes
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(mean=float(everything.mean()), low=float(low), high=float(high), samples=int(everything.size))


def verdict(intervals: Sequence[Interval | None], expected_sign: Sequence[int] | int = 1) -> str:
    """Three-way verdict over the comparisons a claim rests on. ``expected_sign``: +1 where the claim
    predicts a positive difference, -1 a negative one (one value for all, or one per interval).
    A missing interval makes the verdict inconclusive."""
    signs = [expected_sign] * len(intervals) if isinstance(expected_sign, int) else list(expected_sign)
    if not intervals or any(i is None for i in intervals) or len(signs) != len(intervals):
        return INCONCLUSIVE
    if not all(i.excludes_zero() for i in intervals):
        return INCONCLUSIVE
    agrees = [(i.low > 0) == (sign > 0) for i, sign in zip(intervals, signs, strict=True)]
    return HELD if all(agrees) else NOT_HELD


# -- a report's intervals ------------------------------------------------------------------------


def _seeds(report: Any, task: str) -> int:
    """How many seeds the task's prompts were generated with (1 if the report does not say)."""
    summary = next((t for t in report.suite.tasks if t.name == task), None)
    return max(1, len(summary.seeds)) if summary is not None and summary.seeds else 1


def seed_independent(cell: Any) -> bool:
    """Whether the cell's stack makes the seed irrelevant (its seeds are not independent samples)."""
    return any(name in SEED_INDEPENDENT for name in cell.components)


def cell_samples(report: Any, cell: Any, metric: str) -> list[float]:
    """The independent samples of ``metric`` in ``cell`` (see ``samples``)."""
    score = cell.scores.get(metric)
    if score is None or not score.per_image:
        return []
    return samples(score.per_image, _seeds(report, cell.task), seed_independent(cell))


def paired_between(report: Any, cell: Any, other: Any, metric: str, other_metric: str | None = None) -> list[float]:
    """``metric`` in ``cell`` minus ``other_metric`` (default the same) in ``other``, a cell of the same
    task, image by image (per prompt when either ignores the seed); empty when either lacks the
    metric or the two were not generated on the same number of images."""
    mine, theirs = cell.scores.get(metric), other.scores.get(other_metric or metric)
    if mine is None or theirs is None or len(mine.per_image) != len(theirs.per_image) or not mine.per_image:
        return []
    return paired_samples(mine.per_image, theirs.per_image, _seeds(report, cell.task),
                          seed_independent(cell) or seed_independent(other))


def paired_cell_samples(report: Any, cell: Any, metric: str) -> list[float]:
    """``metric`` in ``cell`` minus the task's plain cell, paired (empty without a plain cell or for
    the plain cell itself)."""
    plain = report.plain(cell.task)
    if plain is None or cell.is_plain:
        return []
    return paired_between(report, cell, plain, metric)


def _entry(groups: list[list[float]], paired: list[list[float]]) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    interval = bootstrap_interval(groups)
    if interval is not None:
        entry["interval"] = interval.to_dict()
    difference = bootstrap_interval(paired)
    if difference is not None:
        entry["vs_plain"] = difference.to_dict()
    return entry


def report_intervals(report: Any) -> dict[str, Any]:
    """Every cell's and every (method, kind)'s 95% intervals, per metric with per-image values:
    {"confidence", "draws", "cells": {cell id: {metric: {"interval", "vs_plain"}}},
    "table": {method: {kind: {metric: {"interval", "vs_plain"}}}}} (tasks and seeds resampled)."""
    cells: dict[str, Any] = {}
    grouped: dict[tuple[str, str, str], tuple[list[list[float]], list[list[float]]]] = {}
    for cell in report.cells:
        for metric, score in cell.scores.items():
            if not score.per_image:
                continue
            own, paired = cell_samples(report, cell, metric), paired_cell_samples(report, cell, metric)
            entry = _entry([own], [paired])
            if entry:
                cells.setdefault(cell.id, {})[metric] = entry
            groups = grouped.setdefault((cell.method, cell.kind, metric), ([], []))
            groups[0].append(own)
            groups[1].append(paired)
    table: dict[str, Any] = {}
    for (method, kind, metric), (own, paired) in sorted(grouped.items()):
        entry = _entry(own, paired)
        if entry:
            table.setdefault(method, {}).setdefault(kind, {})[metric] = entry
    return {"confidence": CONFIDENCE, "draws": DRAWS, "cells": cells, "table": table}


def interval_from(entry: dict[str, Any] | None, key: str) -> Interval | None:
    """The ``Interval`` stored under ``key`` ("interval" or "vs_plain") of a ``report_intervals`` entry."""
    if not entry or key not in entry:
        return None
    data = entry[key]
    return Interval(mean=data["mean"], low=data["low"], high=data["high"], samples=data.get("samples", 0))
