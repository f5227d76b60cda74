"""Typed records of a bench run: one metric's score, a cell, a prepared training (``cell_records``,
re-exported here), the suite and the report.

Each record reads (``from_dict``) and writes (``to_dict``) exactly the JSON the bench has always
written (``cell.json``, ``prepared.json``, ``report.json``): same keys, same order, values passed
through unchanged, so a report written before these classes existed loads, and a report written
with them is byte-identical in scores and structure. ``from_dict`` tolerates missing keys (a
hand-written cell in a test, an old report without ``train_seconds``): they take their defaults.

The advisor, the claims and the rendered report read these records only; nothing else in the
bench walks the JSON dicts. Plain Python (no torch): loading a report is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consistent_diffusion.bench.cell_records import (  # noqa: F401 - re-exported: records of one cell
    PREPARED_FORMAT,
    TRAINING_METHODS,
    CellCost,
    CellRecord,
    Score,
    TrainingRecord,
)

REPORT_FORMAT = "consistent-diffusion/bench-report/v1"
Table = dict[str, dict[str, dict[str, float]]]  # method -> kind -> metric (or "seconds_per_image") -> mean


@dataclass(frozen=True)
class TaskSummary:
    """A suite task as the report records it (no reference paths)."""

    name: str
    kind: str
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    description: str = ""
    family: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSummary:
        return cls(name=data["name"], kind=data["kind"], prompts=tuple(data.get("prompts", ())),
                   seeds=tuple(data.get("seeds", ())), methods=tuple(data.get("methods", ())),
                   description=data.get("description", ""), family=data.get("family", data["kind"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "family": self.family or self.kind, "prompts": list(self.prompts),
                "seeds": list(self.seeds), "methods": list(self.methods), "description": self.description}


@dataclass(frozen=True)
class SuiteSummary:
    """The suite a report measured: name, where it came from, sampling settings, tasks."""

    name: str = "?"
    source: str = ""
    steps: int = 0
    guidance: float = 0.0
    tasks: tuple[TaskSummary, ...] = ()
    tuning: dict[str, Any] = field(default_factory=dict)  # how the methods' options were chosen (``Suite.tuning``)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteSummary:
        return cls(name=data.get("name", "?"), source=data.get("source", ""), steps=data.get("steps", 0),
                   guidance=data.get("guidance", 0.0),
                   tasks=tuple(TaskSummary.from_dict(task) for task in data.get("tasks", ())),
                   tuning=dict(data.get("tuning", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "steps": self.steps, "guidance": self.guidance,
                "tasks": [task.to_dict() for task in self.tasks], "tuning": self.tuning}


@dataclass(frozen=True)
class Report:
    """A bench run (``report.json``): every finished cell, the method x kind table, and whether
    the run is complete (``missing_cells``: ids of the suite's cells not finished yet).

    model: the benchmarked model's identity (``ModelIdentity.to_dict()``), None if no cell ran;
    table: ``summary_table(cells)``; versions: the libraries that produced the numbers.
    """

    cells: tuple[CellRecord, ...] = ()
    suite: SuiteSummary = field(default_factory=SuiteSummary)
    model: dict[str, Any] | None = None
    complete: bool = True
    missing_cells: tuple[str, ...] = ()
    table: Table = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format: str = REPORT_FORMAT
    intervals: dict[str, Any] = field(default_factory=dict)  # ``bench.stats.report_intervals`` (absent in old reports)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        cells = tuple(CellRecord.from_dict(cell) for cell in data.get("cells", ()))
        missing = tuple(data.get("missing_cells", ()))
        return cls(
            cells=cells, suite=SuiteSummary.from_dict(data.get("suite", {})), model=data.get("model"),
            complete=data.get("complete", not missing), missing_cells=missing,
            table=data["table"] if "table" in data else summary_table(cells),
            created=data.get("created", ""), versions=dict(data.get("versions", {})),
            format=data.get("format", REPORT_FORMAT), intervals=dict(data.get("intervals", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "suite": self.suite.to_dict(),
            "model": self.model,
            "complete": self.complete,
            "missing_cells": list(self.missing_cells),
            "cells": [cell.to_dict() for cell in self.cells],
            "table": self.table,
            "created": self.created,
            "versions": self.versions,
        }
        if self.intervals:
            data["intervals"] = self.intervals
        return data

    def cell_interval(self, cell_id: str, metric: str, key: str = "interval") -> Any:
        """The stored 95% interval of ``metric`` in a cell (``key``: "interval" or "vs_plain"), or None."""
        from consistent_diffusion.bench.stats import interval_from

        return interval_from(self.intervals.get("cells", {}).get(cell_id, {}).get(metric), key)

    def select(self, components: Sequence[str] | None = None, kind: str | None = None,
               task: str | None = None) -> list[CellRecord]:
        """Cells whose stack is exactly ``components`` (registered method names; [] = plain),
        of task ``kind`` and task ``task`` (None: any)."""
        return [cell for cell in self.cells
                if (components is None or cell.components == list(components))
                and (kind is None or cell.kind == kind) and (task is None or cell.task == task)]

    def plain(self, task: str) -> CellRecord | None:
        """The task's plain-generation cell (empty stack), if measured."""
        return next((cell for cell in self.cells if cell.task == task and cell.is_plain), None)

    @property
    def validation_status(self) -> dict[str, bool | None]:
        """metric key -> False if it failed validation in any cell, else None if some cell's
        score was never validated, else True (validated wherever it was scored)."""
        status: dict[str, bool | None] = {}
        for cell in self.cells:
            for metric, score in cell.scores.items():
                previous = status.get(metric, True)
                if previous is False or score.validated is False:
                    status[metric] = False
                elif previous is None or score.validated is None:
                    status[metric] = None
                else:
                    status[metric] = True
        return status


def by_task(cells: Sequence[CellRecord]) -> dict[str, list[CellRecord]]:
    """Cells grouped by task name, in first-seen order."""
    grouped: dict[str, list[CellRecord]] = {}
    for cell in cells:
        grouped.setdefault(cell.task, []).append(cell)
    return grouped


def summary_table(cells: Sequence[CellRecord]) -> Table:
    """method -> kind -> mean of each scored aggregate over that kind's tasks (+ seconds_per_image),
    rounded to 4 decimals; methods sorted by name."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for cell in cells:
        row = table.setdefault(cell.method, {}).setdefault(cell.kind, {})
        for metric, score in cell.scores.items():
            if score.measured:
                row.setdefault(metric, []).append(float(score.aggregate))
        row.setdefault("seconds_per_image", []).append(cell.cost.seconds_per_image)
    return {
        method: {kind: {metric: round(sum(v) / len(v), 4) for metric, v in metrics.items()} for kind, metrics in kinds.items()}
        for method, kinds in sorted(table.items())
    }


def as_report(report: Report | Mapping[str, Any]) -> Report:
    """``report`` as a Report (a dict, e.g. loaded ``report.json``, is parsed once)."""
    return report if isinstance(report, Report) else Report.from_dict(report)


def load_report(path: str | Path) -> Report:
    """A ``report.json`` file (or a bench output folder holding one) as a Report."""
    path = Path(path)
    path = path / "report.json" if path.is_dir() else path
    return Report.from_dict(json.loads(path.read_text(encoding="utf-8")))
