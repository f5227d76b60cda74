"""Typed records of a bench run: one metric's score, a cell, a prepared training, a report.

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

from consistent_diffusion.bench.suite import REFERENCE_PLACEHOLDER, trained_name

REPORT_FORMAT = "consistent-diffusion/bench-report/v1"
PREPARED_FORMAT = "consistent-diffusion/bench-prepared/v1"
TRAINING_METHODS = frozenset({"dreambooth", "lora_dreambooth", "lora_training"})  # methods that load trained weights
_SCORE_KEYS = ("name", "extractor", "aggregate", "per_image", "higher_is_better", "range", "validated", "validation",
               "details")
Table = dict[str, dict[str, dict[str, float]]]  # method -> kind -> metric (or "seconds_per_image") -> mean


@dataclass(frozen=True)
class Score:
    """One metric over one cell's images (``MetricResult.to_dict``'s JSON).

    aggregate: the set's value, None where it was not finite; per_image: one value per image;
    validated: True/False from the shipped validation table, None when never validated;
    extra: any other keys of the dict, kept (written after the known ones) so nothing is lost.
    """

    name: str = ""
    extractor: str | None = None
    aggregate: float | None = None
    per_image: tuple[float | None, ...] = ()
    higher_is_better: bool = True
    range: tuple[float, float] = (0.0, 1.0)
    validated: bool | None = None
    validation: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Any) -> Score:
        """From a score dict, or from anything with ``to_dict()`` (a ``MetricResult``)."""
        if not isinstance(data, Mapping) and hasattr(data, "to_dict"):
            data = data.to_dict()
        return cls(
            name=data.get("name", ""),
            extractor=data.get("extractor"),
            aggregate=data.get("aggregate"),
            per_image=tuple(data.get("per_image", ())),
            higher_is_better=data.get("higher_is_better", True),
            range=tuple(data.get("range", (0.0, 1.0))),
            validated=data.get("validated"),
            validation=data.get("validation"),
            details=dict(data.get("details", {})),
            extra={key: value for key, value in data.items() if key not in _SCORE_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "extractor": self.extractor,
            "aggregate": self.aggregate,
            "per_image": list(self.per_image),
            "higher_is_better": self.higher_is_better,
            "range": list(self.range),
            "validated": self.validated,
            "validation": self.validation,
            "details": dict(self.details),
            **self.extra,
        }

    @property
    def measured(self) -> bool:
        """Whether the score has a number (an int or float aggregate)."""
        return isinstance(self.aggregate, (int, float)) and not isinstance(self.aggregate, bool)

    def unvalidated(self, needs_validation: bool = True) -> bool:
        """True when the metric failed validation or, if it ``needs_validation``, never had one."""
        return self.validated is False or (self.validated is None and needs_validation)


@dataclass(frozen=True)
class TrainingRecord:
    """A fine-tuning the prepare stage did (``prepared.json``; in a cell without ``artifact``).

    final_loss: mean loss of the last 20 steps; artifact: where the trained weights are (relative
    to the prepared folder in ``prepared.json``, absolute once loaded, None inside a cell).
    """

    task: str
    training: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    instance_images: int = 0
    steps: int = 0
    final_loss: float | None = None
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    artifact: str | None = None
    format: str = PREPARED_FORMAT

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingRecord:
        return cls(
            task=data["task"], training=data["training"], kind=data["kind"], options=dict(data.get("options", {})),
            instance_images=data.get("instance_images", 0), steps=data.get("steps", 0),
            final_loss=data.get("final_loss"), train_seconds=data.get("train_seconds", 0.0),
            trainable_parameters=data.get("trainable_parameters", 0), artifact=data.get("artifact"),
            format=data.get("format", PREPARED_FORMAT),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict; ``artifact`` only when set."""
        data = {
            "format": self.format, "task": self.task, "training": self.training, "kind": self.kind,
            "options": self.options, "instance_images": self.instance_images, "steps": self.steps,
            "final_loss": self.final_loss, "train_seconds": self.train_seconds,
            "trainable_parameters": self.trainable_parameters,
        }
        if self.artifact is not None:
            data["artifact"] = self.artifact
        return data


@dataclass(frozen=True)
class CellCost:
    """What a cell cost: generation wall time, and the fine-tunings it needed (summed)."""

    seconds: float = 0.0
    seconds_per_image: float = 0.0
    trainable_parameters: int = 0
    train_seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellCost:
        return cls(seconds=data.get("seconds", 0.0), seconds_per_image=data.get("seconds_per_image", 0.0),
                   trainable_parameters=data.get("trainable_parameters", 0), train_seconds=data.get("train_seconds", 0))

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "seconds_per_image": self.seconds_per_image,
                "trainable_parameters": self.trainable_parameters, "train_seconds": self.train_seconds}


@dataclass(frozen=True)
class CellRecord:
    """One finished cell (``cell.json``): a task generated with one method stack, scored.

    stack: the suite's unresolved ``uses`` entries ({"method": name, **options}, with
    ``"{reference}"`` / ``"{trained:NAME}"`` left in, so no local paths); scores: metric name ->
    Score (the kind's own metric is keyed by the kind); reference_vae_psnr: dB of the first
    reference after a VAE round trip (the ceiling of any latent-space reconstruction), or None.
    """

    id: str
    task: str
    kind: str
    method: str
    stack: tuple[dict[str, Any], ...] = ()
    prompt_template: str = "{prompt}"
    trainings: tuple[TrainingRecord, ...] = ()
    num_images: int = 0
    scores: dict[str, Score] = field(default_factory=dict)
    reference_vae_psnr: float | None = None
    cost: CellCost = field(default_factory=CellCost)
    family: str = ""  # the task's family (``Task.family``; default its kind)

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.kind)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellRecord:
        return cls(
            id=data.get("cell", f"{data['task']}__{data['method']}"),
            task=data["task"],
            kind=data["kind"],
            family=data.get("family", ""),
            method=data["method"],
            stack=tuple(dict(use) for use in data.get("stack", ())),
            prompt_template=data.get("prompt_template", "{prompt}"),
            trainings=tuple(TrainingRecord.from_dict(t) for t in data.get("trainings", ())),
            num_images=data.get("num_images", 0),
            scores={name: Score.from_dict(value) for name, value in data.get("scores", {}).items()},
            reference_vae_psnr=data.get("reference_vae_psnr"),
            cost=CellCost.from_dict(data.get("cost", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.id,
            "task": self.task,
            "kind": self.kind,
            "family": self.family,
            "method": self.method,
            "stack": [dict(use) for use in self.stack],
            "prompt_template": self.prompt_template,
            "trainings": [training.to_dict() for training in self.trainings],
            "num_images": self.num_images,
            "scores": {name: score.to_dict() for name, score in self.scores.items()},
            "reference_vae_psnr": self.reference_vae_psnr,
            "cost": self.cost.to_dict(),
        }

    def aggregate(self, metric: str) -> float | None:
        """The aggregate of ``metric`` (None where not scored or not finite)."""
        score = self.scores.get(metric)
        return score.aggregate if score is not None and score.measured else None

    @property
    def target_metric(self) -> str:
        """The metric this cell's task is judged on: agreement with the reference's style
        (``reference_style``) on a style task that has it, else the kind's own consistency (a style
        task without a reference, or a report made before ``reference_style`` was scored: within-set)."""
        if self.kind == "style" and self.aggregate("reference_style") is not None:
            return "reference_style"
        return self.kind

    @property
    def consistency(self) -> Score | None:
        """The score of the task's target metric (``target_metric``)."""
        return self.scores.get(self.target_metric)

    @property
    def components(self) -> list[str]:
        """The registered method names of the stack, in order ([] for plain generation)."""
        return [use["method"] for use in self.stack]

    @property
    def is_plain(self) -> bool:
        return not self.stack

    def option(self, method: str, key: str) -> Any:
        """Option ``key`` of the first ``method`` entry of the stack (None if absent)."""
        for use in self.stack:
            if use["method"] == method:
                return use.get(key)
        return None

    @property
    def needs_reference(self) -> bool:
        """Whether the stack reads a reference image or was fine-tuned on the task's references."""
        values = [value for use in self.stack for value in use.values()]
        return any(value == REFERENCE_PLACEHOLDER or trained_name(value) for value in values)

    @property
    def needs_training(self) -> bool:
        return self.cost.trainable_parameters > 0 or any(name in TRAINING_METHODS for name in self.components)


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
