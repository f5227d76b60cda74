"""Typed records of one bench cell: a metric's score, a prepared training, a cell's cost, the cell.

They read (``from_dict``) and write (``to_dict``) exactly the JSON the bench writes (``cell.json``,
``prepared.json``): same keys, same order, values passed through unchanged; ``from_dict`` tolerates
missing keys (they take their defaults). ``bench.records`` re-exports them with the report's records.
Plain Python (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench.suite import REFERENCE_PLACEHOLDER, trained_name

PREPARED_FORMAT = "consistent-diffusion/bench-prepared/v1"
TRAINING_METHODS = frozenset({"dreambooth", "lora_dreambooth", "lora_training"})  # methods that load trained weights
WITHIN_SERIES = "within_series"  # subject agreement between a cell's own images (object and concept cells)
PLAIN_DISTANCE = "plain_distance"  # mean absolute pixel difference to plain's image of the same prompt and seed
# Registered methods that claim one subject *within a series* (not likeness to the task's references):
# judged on WITHIN_SERIES, unless the named option (a real anchor image) ties them to the reference.
WITHIN_SERIES_METHODS = {"consistent_subject": "reference_image"}
# A cell whose images differ from plain's by less than this mean absolute difference (levels of 255,
# averaged over its images) has no measurable effect: below the embedded model's own re-rendering
# noise, a VAE round trip of real emoji (docs/bench.md, "No measurable effect").
NO_EFFECT_LEVELS = 15.0
_SCORE_KEYS = ("name", "extractor", "aggregate", "per_image", "higher_is_better", "range", "validated", "validation",
               "details")


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
        (``reference_style``) on a style task that has it; subject agreement within the series
        (``within_series``) for a method that claims it (``judged_within_series``); else the kind's own
        consistency (a style task without a reference, or a report made before these were scored)."""
        if self.kind == "style" and self.aggregate("reference_style") is not None:
            return "reference_style"
        if self.judged_within_series and self.aggregate(WITHIN_SERIES) is not None:
            return WITHIN_SERIES
        return self.kind

    @property
    def judged_within_series(self) -> bool:
        """Whether the stack claims one subject across its own series (``WITHIN_SERIES_METHODS``, e.g.
        consistent subject with generated anchors) rather than likeness to the task's references."""
        return any(use["method"] in WITHIN_SERIES_METHODS and not use.get(WITHIN_SERIES_METHODS[use["method"]])
                   for use in self.stack)

    @property
    def no_effect(self) -> bool:
        """Whether the cell's images stay within ``NO_EFFECT_LEVELS`` of plain's on the same prompts
        and seeds (mean absolute difference over its images); False where that was not measured."""
        distance = self.aggregate(PLAIN_DISTANCE)
        return distance is not None and distance < NO_EFFECT_LEVELS

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
