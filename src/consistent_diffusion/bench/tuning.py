"""Choose each method's options from a tuning-suite report (``suites/tuning.toml``), never from
the suite the options are then scored on.

The tuning suite runs every candidate value of an option on tasks whose references and subjects
the quick suite does not use. For each option, ``choose`` keeps the candidates that pass the
guards, then takes the one with the largest paired gain over plain on its target metric, averaged
over the tuning tasks (``bench.stats``, with its 95% interval):

| option | candidates (stack, option) | target | guards |
|---|---|---|---|
| StyleAligned sharing | ``style_aligned`` variants | ``reference_style`` | leakage, diversity |
| img2img strength | ``img2img`` strength | ``reference_style`` | leakage, diversity |
| DDPM edit skip | ``ddpm_edit`` skip > 0 | ``reference_object`` | text |
| ControlNet scale | ``controlnet`` scale | ``shape`` | text |
| LoRA steps | ``lora`` fine-tuning steps | ``reference_object`` | text |
| DreamBooth steps | ``dreambooth`` fine-tuning steps | ``reference_object`` | text |

Guards, each checked on every task family on its own (the claims judge families separately):
*leakage*, object leakage (similarity to the reference's own subject) may rise over plain
by at most ``claims.IDENTITY_MARGIN`` (the method must carry a style, not copy the subject);
*diversity*, at least half of plain's (``advisor.DIVERSITY_COLLAPSE``); *text*, text alignment at
least ``TEXT_SHARE`` of plain's (the edit or control must not override the prompt). Where no
value passes, the one failing the fewest guards (then with the largest gain) is the *fallback*,
marked as such: the suite still needs a value, and the record says it failed.

A *cost* option (fine-tuning steps) does not take the largest gain: among the passing values whose
mean gain reaches the lower end of the best one's 95% interval (not measurably worse than the best),
it takes the cheapest (the fewest steps), since each step costs every bench run its time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench import stats
from consistent_diffusion.bench.claims import IDENTITY_MARGIN
from consistent_diffusion.bench.records import CellRecord, Report, as_report

DIVERSITY_SHARE = 0.5  # a candidate keeps at least this share of plain's diversity
TEXT_SHARE = 0.8  # and of plain's text alignment, where text is guarded


@dataclass(frozen=True)
class Option:
    """One tunable option: which cells are its candidates, what value each has, what it maximises."""

    name: str
    method: str  # registered method whose cells are the candidates (alone in their stack)
    value: Callable[[CellRecord], Any]  # the candidate value of a cell (None: not a candidate)
    target: str
    guards: tuple[str, ...]
    cheapest: bool = False  # a cost: the smallest value not measurably worse than the best


def _option_values(method: str, keys: tuple[str, ...], defaults: Mapping[str, Any]) -> Callable[[CellRecord], Any]:
    def value(cell: CellRecord) -> Any:
        use = next((u for u in cell.stack if u["method"] == method), None)
        if use is None:
            return None
        chosen = {key: use.get(key, defaults.get(key)) for key in keys}
        return chosen if len(keys) > 1 else chosen[keys[0]]

    return value


def _skip(cell: CellRecord) -> Any:
    skip = cell.option("ddpm_edit", "skip")
    return skip if skip else None  # skip 0 is a reconstruction, not an edit


def _scale(cell: CellRecord) -> Any:
    if cell.components != ["controlnet"]:
        return None
    scales = cell.option("controlnet", "scales")
    return (list(scales) if isinstance(scales, (list, tuple)) else [scales]) if scales is not None else [1.0]


def _training_steps(kind: str) -> Callable[[CellRecord], Any]:
    def value(cell: CellRecord) -> Any:
        return next((training.steps for training in cell.trainings if training.kind == kind), None)

    return value


OPTIONS = (
    Option("style_aligned", "style_aligned",
           _option_values("style_aligned", ("shared_score_shift", "adain_values"),
                          {"shared_score_shift": 0.0, "adain_values": False}),
           "reference_style", ("leakage", "diversity")),
    Option("img2img_strength", "img2img", _option_values("img2img", ("strength",), {}), "reference_style",
           ("leakage", "diversity")),
    Option("ddpm_edit_skip", "ddpm_edit", _skip, "reference_object", ("text",)),
    Option("controlnet_scale", "controlnet", _scale, "shape", ("text",)),
    Option("lora_steps", "lora", _training_steps("lora"), "reference_object", ("text",), cheapest=True),
    Option("dreambooth_steps", "dreambooth", _training_steps("dreambooth"), "reference_object", ("text",),
           cheapest=True),
)


@dataclass
class Candidate:
    value: Any
    cells: list[CellRecord]
    gain: stats.Interval | None = None
    failed: list[str] = field(default_factory=list)


@dataclass
class Choice:
    option: str
    target: str
    chosen: Candidate | None
    candidates: list[Candidate]
    fallback: bool = False  # no candidate passed its guards; ``chosen`` failed the fewest
    cheapest: bool = False  # a cost option: ``chosen`` is the smallest value not measurably worse

    def summary(self) -> str:
        """One line for a suite's ``[tuning]`` record: the value, its gain, whether it is a fallback."""
        if self.chosen is None:
            return "not measured"
        gain = self.chosen.gain.text(signed=True) if self.chosen.gain is not None else "not measured"
        tasks = ", ".join(cell.task for cell in self.chosen.cells)
        note = f"; fallback, no value passed its guards ({'; '.join(self.chosen.failed)})" if self.fallback else ""
        if self.cheapest and not self.fallback:
            others = [c for c in self.candidates if c is not self.chosen and c.gain is not None]
            note = "; the cheapest value not measurably worse than the best" + (
                f" ({', '.join(f'{c.value}: {c.gain.text(signed=True)}' for c in others)})" if others else "")
        return f"{self.chosen.value}: {self.target} {gain} vs plain on {tasks}{note}"

    def text(self) -> str:
        goal = "the fewest steps not measurably worse in" if self.cheapest else "maximise"
        lines = [f"{self.option} ({goal} {self.target} over plain):"]
        for candidate in self.candidates:
            gain = candidate.gain.text(signed=True) if candidate.gain is not None else "not measured"
            mark = ("  <- chosen" + (" (fallback)" if self.fallback else "")) if candidate is self.chosen else ""
            reason = f"  rejected: {'; '.join(candidate.failed)}" if candidate.failed else ""
            lines.append(f"  {candidate.value}: {gain} on {', '.join(c.task for c in candidate.cells)}{mark}{reason}")
        if self.chosen is None or self.fallback:
            lines.append("  no candidate passed its guards")
        lines.append(f"  record: {self.summary()}")
        return "\n".join(lines)


def _paired(report: Report, cells: list[CellRecord], metric: str) -> stats.Interval | None:
    return stats.bootstrap_interval([stats.paired_cell_samples(report, cell, metric) for cell in cells])


def _share(report: Report, cells: list[CellRecord], metric: str) -> float | None:
    """Mean of ``metric`` over the cells divided by its mean over their plain cells."""
    plains = [report.plain(cell.task) for cell in cells]
    mine = [c.aggregate(metric) for c in cells]
    theirs = [p.aggregate(metric) if p is not None else None for p in plains]
    pairs = [(a, b) for a, b in zip(mine, theirs, strict=True) if a is not None and b is not None]
    if not pairs or sum(b for _, b in pairs) <= 0:
        return None
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs)


def _failures(report: Report, candidate: Candidate, guards: tuple[str, ...]) -> list[str]:
    """The guards a candidate fails, each checked on every task family of its cells on its own (as
    the claims judge each family): a value that copies the subject on unseen styles must not pass
    because it copies less than plain on named ones."""
    families: dict[str, list[CellRecord]] = {}
    for cell in candidate.cells:
        families.setdefault(cell.family, []).append(cell)
    failed = []
    for family, cells in sorted(families.items()):
        where = f" on {family}" if len(families) > 1 else ""
        if "leakage" in guards:
            leakage = _paired(report, cells, "reference_object")
            if leakage is not None and leakage.mean > IDENTITY_MARGIN:
                failed.append(f"object leakage {leakage.text(signed=True)} over plain{where} exceeds {IDENTITY_MARGIN}")
        for guard, metric, share in (("diversity", "diversity", DIVERSITY_SHARE), ("text", "text", TEXT_SHARE)):
            if guard in guards:
                ratio = _share(report, cells, metric)
                if ratio is not None and ratio < share:
                    failed.append(f"{metric} {ratio:.0%} of plain's{where}, below {share:.0%}")
    return failed


def choose(report: Report | Mapping[str, Any], options: tuple[Option, ...] = OPTIONS) -> list[Choice]:
    """Every option's candidates in ``report`` (a tuning-suite report), judged, and the choice."""
    report = as_report(report)
    choices = []
    for option in options:
        grouped: dict[str, Candidate] = {}
        for cell in report.cells:
            if cell.components != [option.method]:
                continue
            value = option.value(cell)
            if value is None:
                continue
            grouped.setdefault(repr(value), Candidate(value=value, cells=[])).cells.append(cell)
        candidates = list(grouped.values())
        for candidate in candidates:
            candidate.gain = _paired(report, candidate.cells, option.target)
            candidate.failed = _failures(report, candidate, option.guards)
        measured = [c for c in candidates if c.gain is not None]
        passing = [c for c in measured if not c.failed]
        if passing:
            choices.append(Choice(option.name, option.target, _pick(passing, option.cheapest), candidates,
                                  cheapest=option.cheapest))
        else:
            fallback = min(measured, key=lambda c: (len(c.failed), -c.gain.mean)) if measured else None
            choices.append(Choice(option.name, option.target, fallback, candidates, fallback=fallback is not None,
                                  cheapest=option.cheapest))
    return choices


def _pick(passing: list[Candidate], cheapest: bool) -> Candidate:
    """The largest mean gain; for a cost, the smallest value whose gain reaches the best's lower bound."""
    best = max(passing, key=lambda c: c.gain.mean)
    if not cheapest:
        return best
    return min((c for c in passing if c.gain.mean >= best.gain.low), key=lambda c: c.value)


def format_choices(choices: list[Choice]) -> str:
    return "\n\n".join(choice.text() for choice in choices)
