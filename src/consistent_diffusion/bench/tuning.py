"""Choose each method's options from a tuning-suite report (``suites/tuning.toml``), never from
the suite the options are then scored on, by a rule that cannot pick noise (``RULE``).

The tuning suite runs every candidate value of an option on tasks whose references and subjects
no evaluation suite uses (``bench.suite_identities``). For each option the tuning suite names a
*default* in ``[tuning.defaults]`` (option -> the method stack holding it: the paper's setting, or
the library's where the paper gives none); a cost option (fine-tuning steps) defaults to its
cheapest value. ``choose`` keeps the default unless a variant is measurably better than it:

- the variant's paired gain **over the default** on the option's target metric (image by image on
  the same prompts and seeds, pooled over the tuning tasks by the two-stage bootstrap of
  ``bench.stats``) has a 95% interval above zero, and
- every guard holds for the variant on each task family on its own (the claims judge families
  separately).

Among several such variants a quality option takes the largest mean gain over the default; a cost
option moves up one length at a time (the fewest steps measurably better than the current choice,
until no longer one beats it). A larger mean alone never wins: with 8 images per task every
StyleAligned variant gained within the others' intervals.

**A default that fails its own guards is not kept** (a quality option): a setting that copies the
reference's subject on one family must not be what the evaluation suites run because no variant
out-scored it. Then the candidate whose guards all hold with the largest mean gain over the default
is chosen (a weaker effect that does not copy); when none holds, the default stays and the record
says it fails.

| option | candidates (stack, option) | target | guards |
|---|---|---|---|
| StyleAligned sharing | ``style_aligned`` stacks (their options: data in the suite) | ``reference_style`` | leakage, diversity |
| img2img strength | ``img2img`` strength | ``reference_style`` | leakage, diversity |
| DDPM edit skip | ``ddpm_edit`` skip > 0 | ``reference_object`` | text |
| ControlNet scale | ``controlnet`` scale | ``shape`` | text |
| style adapter scale | ``ip_adapter`` of ``embedded-style``, scale | ``reference_style`` | leakage, diversity |
| subject adapter scale | ``ip_adapter`` of ``embedded-subject``, scale | ``reference_object`` | text, diversity |
| LoRA steps | ``lora`` fine-tuning steps | ``reference_object`` | text |
| DreamBooth steps | ``dreambooth`` fine-tuning steps | ``reference_object`` | text |

Guards: *leakage*, object leakage (similarity to the reference's own subject) may rise over plain
by at most ``claims.IDENTITY_MARGIN`` (the method must carry a style, not copy the subject);
*diversity*, at least half of plain's (``advisor.DIVERSITY_COLLAPSE``); *text*, text alignment at
least ``TEXT_SHARE`` of plain's (the edit or control must not override the prompt).

Fine-tuning lengths are trained with several seeds (``seed`` of ``[training.NAME]``, the training
config's own field): the cells of one length are pooled over its training seeds, each paired with
the default length's cell of the same training seed and task, so the interval includes the
spread between trainings, not only between images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench import stats
from consistent_diffusion.bench.claims import IDENTITY_MARGIN
from consistent_diffusion.bench.records import CellRecord, Report, as_report
from consistent_diffusion.bench.suite import REFERENCE_PLACEHOLDER, trained_name
from consistent_diffusion.core.errors import ConfigError

DIVERSITY_SHARE = 0.5  # a candidate keeps at least this share of plain's diversity
TEXT_SHARE = 0.8  # and of plain's text alignment, where text is guarded
RULE = ("default stays unless measurably better: a variant replaces the tuning suite's default only when its "
        "paired gain over the default has a 95% interval above zero on the tuning tasks and every guard holds on "
        "each family, or when the default itself fails a guard and the variant passes them all "
        "(bench.tuning.RULE; fine-tuning lengths pooled over 3 training seeds)")
PREVIOUS_RULE = ("largest mean gain over plain among the values passing the guards (fine-tuning steps: the fewest "
                 "not measurably worse than the best, one training per length)")


@dataclass(frozen=True)
class Option:
    """One tunable option: which cells are its candidates, what value each has, what it maximises."""

    name: str
    method: str  # registered method whose cells are the candidates (alone in their stack)
    value: Callable[[CellRecord], Any]  # the candidate value of a cell (None: not a candidate)
    target: str
    guards: tuple[str, ...]
    cheapest: bool = False  # a cost: the default is the smallest value, longer ones must beat it


def _literal_options(method: str) -> Callable[[CellRecord], Any]:
    """The stack entry's options written in the suite (placeholders left out): the candidates are
    whatever the tuning suite lists, so a method's new options need no change here."""

    def value(cell: CellRecord) -> Any:
        use = next((u for u in cell.stack if u["method"] == method), None)
        if use is None:
            return None
        return {key: v for key, v in sorted(use.items())
                if key != "method" and v != REFERENCE_PLACEHOLDER and not trained_name(v)
                and not (isinstance(v, str) and "{" in v)}

    return value


def _strength(cell: CellRecord) -> Any:
    return cell.option("img2img", "strength")


def _skip(cell: CellRecord) -> Any:
    skip = cell.option("ddpm_edit", "skip")
    return skip if skip else None  # skip 0 is a reconstruction, not an edit


def _scales(cell: CellRecord, method: str) -> list[Any]:
    """The ``scales`` option of the cell's ``method`` use as a list (absent: the method's 1.0)."""
    scales = cell.option(method, "scales")
    return (list(scales) if isinstance(scales, (list, tuple)) else [scales]) if scales is not None else [1.0]


def _scale(cell: CellRecord) -> Any:
    return _scales(cell, "controlnet") if cell.components == ["controlnet"] else None


def _ip_adapter_scale(adapter: str) -> Callable[[CellRecord], Any]:
    """The scale of a cell whose stack is one ``ip_adapter`` use of ``adapter`` (a shipped name)."""

    def value(cell: CellRecord) -> Any:
        adapters = cell.option("ip_adapter", "adapters")
        if cell.components != ["ip_adapter"] or adapters not in (adapter, [adapter]):
            return None
        return _scales(cell, "ip_adapter")

    return value


def _training_steps(kind: str) -> Callable[[CellRecord], Any]:
    def value(cell: CellRecord) -> Any:
        return next((training.steps for training in cell.trainings if training.kind == kind), None)

    return value


OPTIONS = (
    Option("style_aligned", "style_aligned", _literal_options("style_aligned"), "reference_style",
           ("leakage", "diversity")),
    Option("img2img_strength", "img2img", _strength, "reference_style", ("leakage", "diversity")),
    Option("ddpm_edit_skip", "ddpm_edit", _skip, "reference_object", ("text",)),
    Option("controlnet_scale", "controlnet", _scale, "shape", ("text",)),
    Option("ip_adapter_style_scale", "ip_adapter", _ip_adapter_scale("embedded-style"), "reference_style",
           ("leakage", "diversity")),
    Option("ip_adapter_subject_scale", "ip_adapter", _ip_adapter_scale("embedded-subject"), "reference_object",
           ("text", "diversity")),
    Option("lora_steps", "lora", _training_steps("lora"), "reference_object", ("text",), cheapest=True),
    Option("dreambooth_steps", "dreambooth", _training_steps("dreambooth"), "reference_object", ("text",),
           cheapest=True),
)


def show(value: Any) -> str:
    """A candidate value as the record writes it (a stack's options: ``shared_score_shift 2.0``)."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {v}" for key, v in value.items()) or "the method's defaults"
    return str(value)


@dataclass
class Candidate:
    value: Any
    cells: list[CellRecord]
    gain: stats.Interval | None = None  # over plain (the evidence the report has always shown)
    over_default: stats.Interval | None = None  # over the default candidate, paired by task and training seed
    failed: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return sorted({cell.method for cell in self.cells})

    @property
    def training_seeds(self) -> int:
        return len({_training_seed(cell) for cell in self.cells})


@dataclass
class Choice:
    option: str
    target: str
    chosen: Candidate | None
    candidates: list[Candidate]
    default: Candidate | None = None
    cheapest: bool = False  # a cost option: the default is the fewest steps

    @property
    def kept_default(self) -> bool:
        return self.chosen is not None and self.chosen is self.default

    def summary(self) -> str:
        """One line for a suite's ``[tuning]`` record: the value, why, and the evidence."""
        if self.chosen is None:
            return "not measured"
        tasks = ", ".join(sorted({cell.task for cell in self.chosen.cells}))
        plain = self.chosen.gain.text(signed=True) if self.chosen.gain is not None else "not measured"
        seeds = f" ({self.chosen.training_seeds} training seeds pooled)" if self.chosen.training_seeds > 1 else ""
        others = "; ".join(f"{show(c.value)}: {c.over_default.text(signed=True)} over the default"
                           + (f", fails {'; '.join(c.failed)}" if c.failed else "")
                           for c in self.candidates if c is not self.default and c.over_default is not None)
        if self.kept_default:
            why = "the default, kept: no variant measurably better with its guards holding"
            if self.default.failed:
                why += f" (the default itself fails {'; '.join(self.default.failed)})"
        elif self.default is not None and self.default.failed and self.chosen.over_default.low <= 0:
            why = (f"the default fails {'; '.join(self.default.failed)}, this passes every guard "
                   f"({self.chosen.over_default.text(signed=True)} over the default)")
        else:
            why = f"measurably better than the default ({self.chosen.over_default.text(signed=True)})"
        return (f"{show(self.chosen.value)}: {why}; {self.target} {plain} vs plain on {tasks}{seeds}"
                + (f" [{others}]" if others else ""))

    def text(self) -> str:
        lines = [f"{self.option} (default {show(self.default.value) if self.default else '?'}; {self.target}):"]
        for candidate in self.candidates:
            plain = candidate.gain.text(signed=True) if candidate.gain is not None else "not measured"
            over = candidate.over_default.text(signed=True) if candidate.over_default is not None else "-"
            mark = "  <- chosen" if candidate is self.chosen else ""
            reason = f"  guards fail: {'; '.join(candidate.failed)}" if candidate.failed else ""
            lines.append(f"  {show(candidate.value)}: vs plain {plain}, vs default {over} "
                         f"on {', '.join(c.id for c in candidate.cells)}{mark}{reason}")
        lines.append(f"  record: {self.summary()}")
        return "\n".join(lines)


def _training_seed(cell: CellRecord) -> tuple[int, ...]:
    return tuple(int(training.options.get("seed", 0)) for training in cell.trainings)


def _paired_plain(report: Report, cells: list[CellRecord], metric: str) -> stats.Interval | None:
    return stats.bootstrap_interval([stats.paired_cell_samples(report, cell, metric) for cell in cells])


def paired_gain(report: Report, variant: Candidate, base: Candidate, metric: str) -> stats.Interval | None:
    """``metric`` of ``variant`` minus ``base``, image by image on each (task, training seed) both
    measured, pooled by the two-stage bootstrap (the outer stage resamples tasks and trainings)."""
    base_cells = {(cell.task, _training_seed(cell)): cell for cell in base.cells}
    groups = []
    for cell in variant.cells:
        other = base_cells.get((cell.task, _training_seed(cell)))
        if other is not None:
            groups.append(stats.paired_between(report, cell, other, metric))
    return stats.bootstrap_interval(groups)


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
            leakage = _paired_plain(report, cells, "reference_object")
            if leakage is not None and leakage.mean > IDENTITY_MARGIN:
                failed.append(f"object leakage {leakage.text(signed=True)} over plain{where} exceeds {IDENTITY_MARGIN}")
        for guard, metric, share in (("diversity", "diversity", DIVERSITY_SHARE), ("text", "text", TEXT_SHARE)):
            if guard in guards:
                ratio = _share(report, cells, metric)
                if ratio is not None and ratio < share:
                    failed.append(f"{metric} {ratio:.0%} of plain's{where}, below {share:.0%}")
    return failed


def _candidates(report: Report, option: Option) -> list[Candidate]:
    grouped: dict[str, Candidate] = {}
    for cell in report.cells:
        if cell.components != [option.method]:
            continue
        value = option.value(cell)
        if value is not None:
            grouped.setdefault(repr(value), Candidate(value=value, cells=[])).cells.append(cell)
    candidates = list(grouped.values())
    if option.cheapest:
        candidates.sort(key=lambda c: c.value)
    for candidate in candidates:
        candidate.gain = _paired_plain(report, candidate.cells, option.target)
        candidate.failed = _failures(report, candidate, option.guards)
    return candidates


def _default(option: Option, candidates: list[Candidate], defaults: Mapping[str, str]) -> Candidate | None:
    """The candidate holding the suite's default stack (a cost option: the cheapest value)."""
    if not candidates:
        return None
    if option.name not in defaults:
        if option.cheapest:
            return candidates[0]
        raise ConfigError(f"tuning: option {option.name!r} has candidates but [tuning.defaults] names no default "
                          f"stack for it (e.g. {option.name} = \"{candidates[0].methods[0]}\")")
    method = defaults[option.name]
    found = next((c for c in candidates if method in c.methods), None)
    if found is None:
        raise ConfigError(f"tuning: [tuning.defaults] {option.name} = {method!r} is none of its candidates' stacks "
                          f"({', '.join(m for c in candidates for m in c.methods)})")
    return found


def _better(report: Report, option: Option, incumbent: Candidate, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates measurably better than ``incumbent`` (paired interval above zero) whose guards hold."""
    winners = []
    for candidate in candidates:
        if candidate is incumbent or candidate.failed:
            continue
        gain = paired_gain(report, candidate, incumbent, option.target)
        if gain is not None and gain.low > 0:
            winners.append(candidate)
    return winners


def choose_option(report: Report, option: Option, defaults: Mapping[str, str]) -> Choice:
    """One option's candidates judged by ``RULE``, and the choice."""
    candidates = _candidates(report, option)
    default = _default(option, candidates, defaults)
    for candidate in candidates:
        if default is not None and candidate is not default:
            candidate.over_default = paired_gain(report, candidate, default, option.target)
    chosen = default
    if default is not None and option.cheapest:
        while True:  # one length at a time: the fewest steps measurably better than the current choice
            longer = [c for c in candidates if c.value > chosen.value]
            winners = _better(report, option, chosen, longer)
            if not winners:
                break
            chosen = min(winners, key=lambda c: c.value)
    elif default is not None:
        winners = _better(report, option, default, candidates)
        if not winners and default.failed:  # the default copies (or overrides the text): a passing variant
            winners = [c for c in candidates if c is not default and not c.failed and c.over_default is not None]
        if winners:
            chosen = max(winners, key=lambda c: c.over_default.mean)
    return Choice(option.name, option.target, chosen, candidates, default=default, cheapest=option.cheapest)


def choose(report: Report | Mapping[str, Any], options: tuple[Option, ...] = OPTIONS,
           defaults: Mapping[str, str] | None = None) -> list[Choice]:
    """Every option's candidates in ``report`` (a tuning-suite report), judged, and the choice;
    ``defaults`` (option -> method stack) defaults to the suite's ``[tuning.defaults]``."""
    report = as_report(report)
    if defaults is None:
        defaults = report.suite.tuning.get("defaults", {})
    return [choose_option(report, option, defaults) for option in options]


def format_choices(choices: list[Choice]) -> str:
    return f"rule: {RULE}\n\n" + "\n\n".join(choice.text() for choice in choices)
