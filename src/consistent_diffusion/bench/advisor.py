"""Rank methods and combinations for a user's need from a measured bench report.

For each method stack and each needed kind (style, object, shape, concept) the advisor takes the
stack's consistency gain over plain generation on that kind's tasks (paired, with its 95%
interval over tasks and seeds: ``bench.stats``), its text alignment, its diversity and its cost.

- **Constraints** drop what the user cannot or will not use: stacks that read reference images
  (``have="text-only"``) or train (``allow_training=False``), text alignment below ``min_text``,
  diversity below ``min_diversity``, more than ``max_seconds`` per image (training amortised over
  the task's images). By default a stack whose diversity falls below half of plain generation's on
  the same tasks is dropped too: it copies rather than varies (img2img at low strength does);
  ``allow_low_diversity`` keeps it. For style, a stack whose object leakage (similarity of its
  outputs to the reference's own subject) rises over plain's by more than ``claims.IDENTITY_MARGIN``
  is dropped as well: it copies the reference instead of carrying its style; ``allow_copying``
  keeps it.
- **Style** is ranked on agreement with the reference's style (``reference_style``), not on how
  alike the outputs are to each other. **Object and concept** are ranked on each cell's target
  metric: identity to the references, or, for a method that claims one subject within its series
  (consistent subject with generated anchors), subject agreement within the series; every line
  quotes both measures.
- **No measurable effect**: a stack whose cells for a need all stay within ``NO_EFFECT_LEVELS`` of
  plain's images (same prompts and seeds) is not recommended for that need (dropped, with why).
- **Ranking**: the Pareto front of (consistency gain, text alignment, diversity, -seconds per
  image) first, each group by total consistency gain; a stack measured on every need comes before
  one that was not.
- Every line quotes the numbers with their intervals, says which metrics are not validated, and
  the advice says when the top choice's gain is inconclusive (its interval contains zero).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench import stats
from consistent_diffusion.bench.cell_records import NO_EFFECT_LEVELS, WITHIN_SERIES
from consistent_diffusion.bench.claims import IDENTITY_MARGIN, NO_EFFECT
from consistent_diffusion.bench.records import CellRecord, Report, as_report
from consistent_diffusion.bench.suite import KINDS
from consistent_diffusion.core.errors import ConfigError

HAVE_CHOICES = ("reference-images", "text-only")
DIVERSITY_COLLAPSE = 0.5  # below this share of plain's diversity a stack copies rather than varies


@dataclass
class Constraints:
    """What the user asks of a method (None: no limit)."""

    have: str = "reference-images"
    allow_training: bool = True
    min_text: float | None = None
    min_diversity: float | None = None
    max_seconds: float | None = None
    allow_low_diversity: bool = False
    allow_copying: bool = False

    def __post_init__(self) -> None:
        if self.have not in HAVE_CHOICES:
            raise ConfigError(f"--have must be one of {', '.join(HAVE_CHOICES)}, got {self.have!r}")
        for name in ("min_text", "min_diversity", "max_seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{name} must be a number, got {value!r}")


@dataclass
class Recommendation:
    method: str
    stack: list[str]
    score: float  # total mean consistency gain over plain on the needs it was measured on
    covered: int = 0  # how many of the needs this method was measured on
    reasons: list[str] = field(default_factory=list)
    unvalidated: list[str] = field(default_factory=list)
    gains: dict[str, stats.Interval] = field(default_factory=dict)  # need -> paired gain interval
    text: float | None = None
    diversity: float | None = None
    seconds: float = 0.0  # per image, training amortised over the images generated
    pareto: bool = False
    leakage: stats.Interval | None = None  # style: rise of similarity to the reference's subject over plain
    no_effect: list[str] = field(default_factory=list)  # needs on which every cell has no measurable effect

    @property
    def inconclusive_needs(self) -> list[str]:
        return [need for need, interval in self.gains.items() if not interval.low > 0]


def parse_needs(text: str) -> list[str]:
    needs = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in needs if n not in KINDS]
    if not needs or unknown:
        raise ConfigError(f"--need takes a comma list of {', '.join(KINDS)}; got {text!r}")
    return needs


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _measured(cells: list[CellRecord], metric: str) -> list[float]:
    return [value for value in (cell.aggregate(metric) for cell in cells) if value is not None]


def _usable(cell: CellRecord, constraints: Constraints) -> bool:
    """Whether the user can run the cell's stack: has the references it reads, may train."""
    if constraints.have == "text-only" and cell.needs_reference:
        return False
    return constraints.allow_training or not cell.needs_training


def _seconds_per_image(cells: list[CellRecord]) -> float:
    """Generation seconds per image plus training seconds spread over the images made with it."""
    images = sum(max(1, cell.num_images) for cell in cells)
    return sum(cell.cost.seconds_per_image * max(1, cell.num_images) + cell.cost.train_seconds for cell in cells) / images


def _evaluate(report: Report, method: str, cells: list[CellRecord], needs: list[str]) -> Recommendation:
    recommendation = Recommendation(method=method, stack=cells[0].components or ["plain"], score=0.0)
    used: list[CellRecord] = []
    for need in needs:
        pairs = [(cell, cell.target_metric) for cell in cells if cell.kind == need]
        pairs = [(cell, metric) for cell, metric in pairs if cell.aggregate(metric) is not None]
        if not pairs:
            recommendation.reasons.append(f"{need}: not measured for this method")
            continue
        relevant = [cell for cell, _ in pairs]
        used += relevant
        recommendation.covered += 1
        own = stats.bootstrap_interval([stats.cell_samples(report, cell, metric) for cell, metric in pairs])
        gain = stats.bootstrap_interval([stats.paired_cell_samples(report, cell, metric) for cell, metric in pairs])
        mean_value = own.mean if own is not None else _mean([cell.aggregate(metric) for cell, metric in pairs])
        label = SUBJECT_LABELS.get(pairs[0][1], f"{need} consistency")
        reason = f"{label} {own.text() if own is not None else f'{mean_value:.3f}'}"
        if gain is not None:
            recommendation.gains[need] = gain
            recommendation.score += gain.mean
            reason += f", {gain.text(signed=True)} vs plain"
        recommendation.reasons.append(reason)
        recommendation.reasons += _other_subject_measures(report, pairs)
        flagged = [cell.task for cell in relevant if cell.no_effect]
        if flagged:
            recommendation.reasons.append(f"{NO_EFFECT} on {', '.join(flagged)}: images within {NO_EFFECT_LEVELS:g} "
                                          "levels of plain's on the same prompts and seeds")
            if len(flagged) == len(relevant):
                recommendation.no_effect.append(need)
        if any(not cell.scores[metric].validated for cell, metric in pairs):
            recommendation.unvalidated.append(need)
        if need == "style":
            recommendation.leakage = stats.bootstrap_interval(
                [stats.paired_cell_samples(report, cell, "reference_object") for cell in relevant])
            if recommendation.leakage is not None:
                recommendation.reasons.append(f"object leakage {recommendation.leakage.text(signed=True)} vs plain "
                                              "(similarity to the reference's own subject)")
    recommendation.text = _mean(_measured(used, "text"))
    recommendation.diversity = _mean(_measured(used, "diversity"))
    recommendation.seconds = _seconds_per_image(used) if used else 0.0
    return recommendation


SUBJECT_LABELS = {"reference_style": "style agreement with the reference", "object": "identity to the references",
                  WITHIN_SERIES: "subject agreement within the series", "concept": "concept consistency"}


def _other_subject_measures(report: Report, pairs: list[tuple[CellRecord, str]]) -> list[str]:
    """Object and concept: the subject measures the need is not ranked on (identity to the references,
    agreement within the series), each with its interval and paired gain over plain."""
    lines = []
    for metric in (pairs[0][0].kind, WITHIN_SERIES):
        cells = [cell for cell, target in pairs if target != metric and cell.aggregate(metric) is not None]
        if pairs[0][0].kind not in ("object", "concept") or not cells:
            continue
        own = stats.bootstrap_interval([stats.cell_samples(report, cell, metric) for cell in cells])
        gain = stats.bootstrap_interval([stats.paired_cell_samples(report, cell, metric) for cell in cells])
        if own is not None:
            line = f"also {SUBJECT_LABELS[metric]} {own.text()}"
            lines.append(line + (f", {gain.text(signed=True)} vs plain" if gain is not None else ""))
    return lines


def _guards(recommendation: Recommendation, cells: list[CellRecord]) -> str:
    """The text/diversity/cost line of a recommendation."""
    parts = []
    if recommendation.text is not None:
        parts.append(f"text alignment {recommendation.text:.3f}")
    if recommendation.diversity is not None:
        parts.append(f"diversity {recommendation.diversity:.3f}")
    parts.append(f"{recommendation.seconds:.2f} s/image")
    training = _mean([cell.cost.train_seconds for cell in cells if cell.cost.train_seconds])
    if training:
        params = max(cell.cost.trainable_parameters for cell in cells)
        parts.append(f"after {training:.0f} s of training per subject ({params:,} trainable parameters)")
    return ", ".join(parts)


def _plain_diversity(report: Report, cells: list[CellRecord]) -> float | None:
    plains = [report.plain(cell.task) for cell in cells]
    return _mean(_measured([p for p in plains if p is not None], "diversity"))


def _excluded(recommendation: Recommendation, cells: list[CellRecord], report: Report, c: Constraints) -> str | None:
    """Why the constraints drop this stack (None: kept)."""
    if recommendation.no_effect:
        return (f"{NO_EFFECT} on {', '.join(recommendation.no_effect)}: its images stay within {NO_EFFECT_LEVELS:g} "
                "levels of plain's on the same prompts and seeds")
    if c.min_text is not None and (recommendation.text is None or recommendation.text < c.min_text):
        return f"text alignment {recommendation.text} below {c.min_text}"
    if c.min_diversity is not None and (recommendation.diversity is None or recommendation.diversity < c.min_diversity):
        return f"diversity {recommendation.diversity} below {c.min_diversity}"
    if c.max_seconds is not None and recommendation.seconds > c.max_seconds:
        return f"{recommendation.seconds:.2f} s/image over {c.max_seconds}"
    if not c.allow_copying and recommendation.leakage is not None and recommendation.leakage.mean > IDENTITY_MARGIN:
        return (f"object leakage {recommendation.leakage.mean:+.3f} over plain (more than {IDENTITY_MARGIN}): it copies "
                "the reference's subject rather than its style (allow_copying keeps it)")
    plain = _plain_diversity(report, cells)
    if (not c.allow_low_diversity and plain and recommendation.diversity is not None
            and recommendation.diversity < DIVERSITY_COLLAPSE * plain):
        return (f"diversity {recommendation.diversity:.3f} is below half of plain's {plain:.3f}: it copies "
                "(allow_low_diversity keeps it)")
    return None


def _dominates(a: Recommendation, b: Recommendation) -> bool:
    """a is at least as good as b on gain, text, diversity and cost, and better on one."""
    def axes(r: Recommendation) -> tuple[float, ...]:
        return (r.score, r.text if r.text is not None else -1.0, r.diversity if r.diversity is not None else -1.0,
                -r.seconds)

    pa, pb = axes(a), axes(b)
    return all(x >= y for x, y in zip(pa, pb, strict=True)) and any(x > y for x, y in zip(pa, pb, strict=True))


def advise(report: Report | Mapping[str, Any], needs: list[str], have: str = "reference-images",
           allow_training: bool = True, top: int = 5, constraints: Constraints | None = None,
           dropped: list[tuple[str, str]] | None = None) -> list[Recommendation]:
    """Ranked recommendations (best first) for ``needs`` from ``report`` (a Report or its dict).
    ``dropped``, when given, receives (method, why) for each measured stack a constraint removed."""
    constraints = constraints or Constraints(have=have, allow_training=allow_training)
    report = as_report(report)
    by_method: dict[str, list[CellRecord]] = {}
    for cell in report.cells:
        if _usable(cell, constraints):
            by_method.setdefault(cell.method, []).append(cell)
    kept: list[Recommendation] = []
    for method, cells in by_method.items():
        recommendation = _evaluate(report, method, cells, needs)
        if not recommendation.covered:
            continue
        relevant = [cell for cell in cells if cell.kind in needs]
        why = _excluded(recommendation, relevant, report, constraints)
        if why is not None:
            if dropped is not None:
                dropped.append((method, why))
            continue
        recommendation.reasons.append(_guards(recommendation, relevant))
        kept.append(recommendation)
    for recommendation in kept:
        recommendation.pareto = not any(_dominates(other, recommendation) for other in kept if other is not recommendation)
    kept.sort(key=lambda rec: (rec.covered, rec.pareto, rec.score), reverse=True)
    return kept[:top]


def format_advice(recommendations: list[Recommendation], needs: list[str],
                  dropped: list[tuple[str, str]] = ()) -> str:
    """The ranked advice as text, then the stacks the constraints dropped, with why."""
    drops = [f"dropped {method}: {why}" for method, why in dropped]
    if not recommendations:
        return "\n".join([f"no measured method fits {', '.join(needs)} with these constraints", *drops])
    lines = [f"for {', '.join(needs)} (measured on every need first, then the Pareto front of consistency gain, "
             "text alignment, diversity and cost, then by gain over plain; 95% intervals):"]
    for rank, rec in enumerate(recommendations, 1):
        front = "" if rec.pareto else "  (dominated)"
        lines.append(f"{rank}. {rec.method} [{' + '.join(rec.stack)}]  gain {rec.score:+.3f}{front}")
        lines.extend(f"     {reason}" for reason in rec.reasons)
        if rec.unvalidated:
            lines.append(f"     † {', '.join(rec.unvalidated)} metric not validated on real data: read with care")
    best = recommendations[0]
    if best.inconclusive_needs:
        lines.append(f"note: the evidence for {best.method} is inconclusive on {', '.join(best.inconclusive_needs)}: "
                     "its gain over plain is not above zero at 95% (more tasks or seeds would tell)")
    return "\n".join(lines + drops)
