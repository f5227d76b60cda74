"""Rank methods and combinations for a user's need from a measured bench report.

For each method stack in the report and each needed kind (style, object, shape, concept) the
advisor takes the stack's mean consistency on that kind's tasks and its gain over plain
generation on the same tasks, plus text alignment and diversity as guards. Stacks that need
what the user lacks (reference images, training) are excluded. Every recommendation quotes the
numbers it rests on; scores from metrics that failed validation are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench.suite import KINDS, REFERENCE_PLACEHOLDER, trained_name
from consistent_diffusion.core.errors import ConfigError

TRAINING_METHODS = {"dreambooth", "lora_dreambooth", "lora_training"}
HAVE_CHOICES = ("reference-images", "text-only")


@dataclass
class Recommendation:
    method: str
    stack: list[str]
    score: float
    covered: int = 0  # how many of the needs this method was measured on
    reasons: list[str] = field(default_factory=list)
    unvalidated: list[str] = field(default_factory=list)


def _needs_reference(record: dict[str, Any]) -> bool:
    """Stacks that read a reference image, or were fine-tuned on the task's references."""
    values = [value for use in record.get("stack", []) for value in use.values()]
    return any(value == REFERENCE_PLACEHOLDER or trained_name(value) for value in values)


def _needs_training(record: dict[str, Any]) -> bool:
    return record["cost"].get("trainable_parameters", 0) > 0 or any(
        use["method"] in TRAINING_METHODS for use in record.get("stack", []))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def parse_needs(text: str) -> list[str]:
    needs = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in needs if n not in KINDS]
    if not needs or unknown:
        raise ConfigError(f"--need takes a comma list of {', '.join(KINDS)}; got {text!r}")
    return needs


def advise(report: dict[str, Any], needs: list[str], have: str = "reference-images",
           allow_training: bool = True, top: int = 5) -> list[Recommendation]:
    """Ranked recommendations (best first) for ``needs`` from ``report``."""
    if have not in HAVE_CHOICES:
        raise ConfigError(f"--have must be one of {', '.join(HAVE_CHOICES)}, got {have!r}")
    plain = {(r["task"]): r for r in report["cells"] if not r.get("stack")}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in report["cells"]:
        if have == "text-only" and _needs_reference(record):
            continue
        if not allow_training and _needs_training(record):
            continue
        by_method.setdefault(record["method"], []).append(record)
    ranked = []
    for method, records in by_method.items():
        recommendation = Recommendation(method=method, stack=[u["method"] for u in records[0].get("stack", [])] or ["plain"],
                                        score=0.0)
        covered = 0
        for need in needs:
            relevant = [r for r in records if r["kind"] == need and (r["scores"].get(need) or {}).get("aggregate") is not None]
            if not relevant:
                recommendation.reasons.append(f"{need}: not measured for this method")
                continue
            covered += 1
            values = [r["scores"][need]["aggregate"] for r in relevant]
            gains = [r["scores"][need]["aggregate"] - plain[r["task"]]["scores"][need]["aggregate"]
                     for r in relevant if r["task"] in plain and (plain[r["task"]]["scores"].get(need) or {}).get("aggregate") is not None]
            text = _mean([(r["scores"].get("text") or {}).get("aggregate") for r in relevant
                          if (r["scores"].get("text") or {}).get("aggregate") is not None])
            diversity = _mean([(r["scores"].get("diversity") or {}).get("aggregate") for r in relevant
                               if (r["scores"].get("diversity") or {}).get("aggregate") is not None])
            mean_value, mean_gain = _mean(values), _mean(gains)
            recommendation.score += mean_gain if mean_gain is not None else 0.0
            reason = f"{need} consistency {mean_value:.3f}"
            if mean_gain is not None:
                reason += f" ({mean_gain:+.3f} vs plain)"
            if text is not None:
                reason += f", text alignment {text:.3f}"
            if diversity is not None:
                reason += f", diversity {diversity:.3f}"
            seconds = _mean([r["cost"]["seconds_per_image"] for r in relevant])
            reason += f", {seconds:.2f} s/image"
            training = _mean([r["cost"].get("train_seconds", 0) for r in relevant])
            if training:
                params = max(r["cost"].get("trainable_parameters", 0) for r in relevant)
                reason += f" after {training:.0f} s of training per subject ({params:,} trainable parameters)"
            recommendation.reasons.append(reason)
            if any(not r["scores"][need].get("validated") for r in relevant):
                recommendation.unvalidated.append(need)
        if covered:
            recommendation.covered = covered
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
