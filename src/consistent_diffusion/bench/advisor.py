"""Rank methods and combinations for a user's need from a measured bench report.

For each method stack in the report and each needed kind (style, object, shape, concept) the
advisor takes the stack's mean consistency on that kind's tasks and its gain over plain
generation on the same tasks, plus text alignment and diversity as guards. Stacks that need
what the user lacks (reference images, training) are excluded. Every recommendation quotes the
numbers it rests on; scores from metrics that failed validation are flagged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench.records import CellRecord, Report, as_report
from consistent_diffusion.bench.suite import KINDS
from consistent_diffusion.core.errors import ConfigError

HAVE_CHOICES = ("reference-images", "text-only")


@dataclass
class Recommendation:
    method: str
    stack: list[str]
    score: float
    covered: int = 0  # how many of the needs this method was measured on
    reasons: list[str] = field(default_factory=list)
    unvalidated: list[str] = field(default_factory=list)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _measured(cells: list[CellRecord], metric: str) -> list[float]:
    """The aggregates of ``metric`` in the cells that scored it."""
    return [value for value in (cell.aggregate(metric) for cell in cells) if value is not None]


def parse_needs(text: str) -> list[str]:
    needs = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in needs if n not in KINDS]
    if not needs or unknown:
        raise ConfigError(f"--need takes a comma list of {', '.join(KINDS)}; got {text!r}")
    return needs


def _allowed(cell: CellRecord, have: str, allow_training: bool) -> bool:
    """Whether the user can run the cell's stack: has the references it reads, may train."""
    return not (have == "text-only" and cell.needs_reference) and not (not allow_training and cell.needs_training)


def _reason(need: str, relevant: list[CellRecord], plain: dict[str, CellRecord]) -> tuple[str, float | None]:
    """The evidence line for one need and the mean gain over plain generation (None: no plain cell)."""
    gains = [cell.aggregate(need) - plain[cell.task].aggregate(need)
             for cell in relevant if cell.task in plain and plain[cell.task].aggregate(need) is not None]
    text, diversity = _mean(_measured(relevant, "text")), _mean(_measured(relevant, "diversity"))
    mean_value, mean_gain = _mean([cell.aggregate(need) for cell in relevant]), _mean(gains)
    reason = f"{need} consistency {mean_value:.3f}"
    if mean_gain is not None:
        reason += f" ({mean_gain:+.3f} vs plain)"
    if text is not None:
        reason += f", text alignment {text:.3f}"
    if diversity is not None:
        reason += f", diversity {diversity:.3f}"
    reason += f", {_mean([cell.cost.seconds_per_image for cell in relevant]):.2f} s/image"
    training = _mean([cell.cost.train_seconds for cell in relevant])
    if training:
        params = max(cell.cost.trainable_parameters for cell in relevant)
        reason += f" after {training:.0f} s of training per subject ({params:,} trainable parameters)"
    return reason, mean_gain


def advise(report: Report | Mapping[str, Any], needs: list[str], have: str = "reference-images",
           allow_training: bool = True, top: int = 5) -> list[Recommendation]:
    """Ranked recommendations (best first) for ``needs`` from ``report`` (a Report or its dict)."""
    if have not in HAVE_CHOICES:
        raise ConfigError(f"--have must be one of {', '.join(HAVE_CHOICES)}, got {have!r}")
    report = as_report(report)
    plain = {cell.task: cell for cell in report.cells if cell.is_plain}
    by_method: dict[str, list[CellRecord]] = {}
    for cell in report.cells:
        if _allowed(cell, have, allow_training):
            by_method.setdefault(cell.method, []).append(cell)
    ranked = []
    for method, cells in by_method.items():
        recommendation = Recommendation(method=method, stack=cells[0].components or ["plain"], score=0.0)
        for need in needs:
            relevant = [cell for cell in cells if cell.kind == need and cell.aggregate(need) is not None]
            if not relevant:
                recommendation.reasons.append(f"{need}: not measured for this method")
                continue
            recommendation.covered += 1
            reason, gain = _reason(need, relevant, plain)
            recommendation.score += gain if gain is not None else 0.0
            recommendation.reasons.append(reason)
            if any(not cell.scores[need].validated for cell in relevant):
                recommendation.unvalidated.append(need)
        if recommendation.covered:
            ranked.append(recommendation)
    # Methods measured on every need first, then by total gain over plain generation.
    ranked.sort(key=lambda rec: (rec.covered, rec.score), reverse=True)
    return ranked[:top]


def format_advice(recommendations: list[Recommendation], needs: list[str]) -> str:
    if not recommendations:
        return f"no measured method fits {', '.join(needs)} with these constraints"
    lines = [f"for {', '.join(needs)} (methods measured on every need first, then by consistency gain over plain):"]
    for rank, rec in enumerate(recommendations, 1):
        lines.append(f"{rank}. {rec.method} [{' + '.join(rec.stack)}]  gain {rec.score:+.3f}")
        lines.extend(f"     {reason}" for reason in rec.reasons)
        if rec.unvalidated:
            lines.append(f"     † {', '.join(rec.unvalidated)} metric not validated on real data: read with care")
    return "\n".join(lines)
