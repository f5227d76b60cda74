"""The survey's qualitative claims, each checked against a bench report's numbers, with intervals.

Every claim rests on comparisons, each a difference predicted to be positive: a method against
plain generation (or against another method) on the same prompts and seeds, pooled over the tasks
of one kind (``bench.stats``: paired differences, two-stage bootstrap over tasks and seeds, 95%).
A comparison that is exact rather than a mean over samples (trainable parameters, a reconstruction
against its ceiling) is a zero-width interval. The claim is *held* when every comparison's interval
lies above zero, *not held* when every interval excludes zero and one lies below, and
*inconclusive* otherwise (``stats.verdict``); *not measurable here* when the cells it needs are
missing. Cells are found by the registered method names in their stacks
(``CellRecord.components``), so suites may name their method stacks freely. Verdicts quote the
intervals behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench import stats
from consistent_diffusion.bench.records import CellRecord, Report, as_report, by_task

HELD, NOT_HELD, INCONCLUSIVE = stats.HELD, stats.NOT_HELD, stats.INCONCLUSIVE
NOT_MEASURABLE = "not measurable here"
IDENTITY_MARGIN = 0.05  # "not identity": similarity to the reference subject rises by less than this
RECONSTRUCTION_SLACK_DB = 0.5  # "exact": within this of the VAE round trip's PSNR


@dataclass
class Comparison:
    """One predicted-positive difference, pooled over tasks: each task's paired samples."""

    label: str
    kind: str
    per_task: dict[str, list[float]] = field(default_factory=dict)
    figures: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (task, the compared cells' ids)

    def add(self, task: str, values: list[float], *cells: CellRecord) -> None:
        """The task's paired samples, and the cells they compare (baseline last), shown as evidence."""
        if values:
            self.per_task.setdefault(task, []).extend(values)
            figure = (task, tuple(cell.id for cell in reversed(cells)))
            if cells and figure not in self.figures:
                self.figures.append(figure)

    def interval(self) -> stats.Interval | None:
        return stats.bootstrap_interval(list(self.per_task.values()))

    def evidence(self) -> str:
        interval = self.interval()
        tasks = ", ".join(self.per_task)
        if interval.low == interval.high and abs(interval.mean) >= 1000:  # an exact count
            return f"{self.label} ({self.kind}: {tasks}): {interval.mean:+,.0f}"
        return f"{self.label} ({self.kind}: {tasks}): {interval.text(signed=True)}, {interval.samples} samples"


def _judge(claim: str, comparisons: list[Comparison], missing: str, notes: list[str] = ()) -> dict[str, str]:
    measured = [c for c in comparisons if c.per_task]
    if not measured:
        return {"claim": claim, "verdict": NOT_MEASURABLE, "evidence": missing}
    intervals = [c.interval() for c in measured]
    evidence = "; ".join([c.evidence() for c in measured] + list(notes))
    figures = []
    for comparison in measured:
        for task, cells in comparison.figures:
            if {"task": task, "cells": list(cells)} not in figures:
                figures.append({"task": task, "cells": list(cells)})
    return {"claim": claim, "verdict": stats.verdict(intervals), "evidence": evidence, "figures": figures}


def _by_stack(cells: list[CellRecord]) -> dict[tuple[str, ...], CellRecord]:
    """A task's cells by their stack of registered method names (() = plain generation)."""
    return {tuple(cell.components): cell for cell in cells}


def _exact(value: float) -> list[float]:
    """An exact difference as one sample (a zero-width interval)."""
    return [float(value)]


def claim_img2img_loses_detail(report: Report) -> dict[str, str]:
    claim = "img2img is simplest but loses fine details of the reference as noise strength rises"
    comparisons: dict[str, Comparison] = {}
    for task, cells in by_task(report.select(["img2img"])).items():
        ordered = sorted((c for c in cells if c.option("img2img", "strength") is not None),
                         key=lambda c: c.option("img2img", "strength"))
        for weaker, stronger in zip(ordered, ordered[1:], strict=False):
            family = weaker.family
            comparison = comparisons.setdefault(family, Comparison(
                "reference fidelity at the lower strength minus at the higher", family))
            comparison.add(task, stats.paired_between(report, weaker, stronger, "reference_fidelity"), weaker, stronger)
    return _judge(claim, list(comparisons.values()), "needs img2img cells at two or more strengths with reference fidelity")


def claim_dreambooth_vs_lora(report: Report) -> dict[str, str]:
    claim = ("DreamBooth gives object consistency; LoRA DreamBooth is cheaper to train "
             "but weaker on complex new concepts")
    beats_plain = Comparison("object consistency, DreamBooth minus plain", "object")
    beats_lora = Comparison("concept consistency, DreamBooth minus LoRA", "concept")
    cheaper = Comparison("trainable parameters, DreamBooth minus LoRA (exact)", "object+concept")
    for kind in ("object", "concept"):
        for task, cells in by_task(report.select(kind=kind)).items():
            found = _by_stack(cells)
            full, lora, plain = found.get(("dreambooth",)), found.get(("lora",)), found.get(())
            if full is not None and plain is not None and kind == "object":
                beats_plain.add(task, stats.paired_between(report, full, plain, "object"), full, plain)
            if full is not None and lora is not None:
                cheaper.add(task, _exact(full.cost.trainable_parameters - lora.cost.trainable_parameters))
                if kind == "concept":
                    beats_lora.add(task, stats.paired_between(report, full, lora, "concept"), full, lora)
    return _judge(claim, [beats_plain, beats_lora, cheaper], "needs dreambooth and lora cells on object/concept tasks")


def claim_controlnet_shape_not_identity(report: Report) -> dict[str, str]:
    claim = "ControlNet controls shape, not identity"
    shape = Comparison("shape adherence, ControlNet minus plain", "shape")
    identity = Comparison(f"{IDENTITY_MARGIN} minus the rise of similarity to the reference subject", "shape")
    notes = []
    for task, cells in by_task(report.select(kind="shape")).items():
        found = _by_stack(cells)
        control, plain = found.get(("controlnet",)), found.get(())
        if control is None or plain is None:
            continue
        shape.add(task, stats.paired_between(report, control, plain, "shape"), control, plain)
        rise = stats.paired_between(report, control, plain, "reference_object")
        identity.add(task, [IDENTITY_MARGIN - value for value in rise])
        c, p = control.aggregate("shape"), plain.aggregate("shape")
        if c is not None and p is not None:
            notes.append(f"{task}: shape {c:.3f} vs plain {p:.3f} ({c / max(p, 1e-9):.2f}x)")
    return _judge(claim, [shape, identity], "needs controlnet and plain cells on a shape task", notes)


def claim_inversion_exact(report: Report) -> dict[str, str]:
    """Exact: a skip-0 re-sampling with the source prompt matches the reference within 0.5 dB of
    the VAE round trip (the inversion is exact in latent space; only the VAE loses detail).
    Controlled: an edit (skip > 0, new prompt) stays closer to the reference's subject than plain
    generation of the same prompts."""
    claim = "noise inversion reconstructs exactly and allows controlled edits"
    exact = Comparison(f"reconstruction PSNR minus (VAE round trip - {RECONSTRUCTION_SLACK_DB} dB)", "inversion")
    controlled = Comparison("similarity to the reference subject, edit minus plain", "object")
    for cell in report.select(["ddpm_edit"]):
        skip = cell.option("ddpm_edit", "skip") or 0
        if skip == 0 and cell.reference_vae_psnr is not None:
            floor = cell.reference_vae_psnr - RECONSTRUCTION_SLACK_DB
            exact.add(cell.task, [value - floor for value in stats.cell_samples(report, cell, "reference_psnr")], cell)
        elif skip > 0 and report.plain(cell.task) is not None:
            controlled.add(cell.task, stats.paired_between(report, cell, report.plain(cell.task), "reference_object"), cell,
                           report.plain(cell.task))
    return _judge(claim, [exact, controlled],
                  "needs ddpm_edit cells (skip 0 with the source prompt, and an edit) with references")


def claim_style_aligned(report: Report) -> dict[str, str]:
    """Style: agreement with the reference's style rises over plain, on every style family (a style
    the prompts do not name; a style the model never saw). Not copying: the outputs' similarity to
    the reference's own subject (object leakage) rises over plain by less than ``IDENTITY_MARGIN``."""
    claim = "StyleAligned gives style consistency but does not copy objects"
    comparisons: dict[tuple[str, str], Comparison] = {}
    notes = []
    for task, cells in by_task(report.select(kind="style")).items():
        found = _by_stack(cells)
        aligned, plain, img2img = found.get(("style_aligned",)), found.get(()), found.get(("img2img",))
        if aligned is None or plain is None:
            continue
        family = aligned.family
        style = comparisons.setdefault(("style", family), Comparison(
            "agreement with the reference's style, StyleAligned minus plain", family))
        style.add(task, stats.paired_between(report, aligned, plain, aligned.target_metric), aligned, plain)
        leakage = comparisons.setdefault(("leakage", family), Comparison(
            f"{IDENTITY_MARGIN} minus the rise of object leakage (similarity to the reference's subject) over plain",
            family))
        leakage.add(task, [IDENTITY_MARGIN - value
                           for value in stats.paired_between(report, aligned, plain, "reference_object")])
        if img2img is not None:
            copies = stats.bootstrap_interval([stats.paired_between(report, img2img, aligned, "reference_object")])
            if copies is not None:
                notes.append(f"{task}: object leakage, img2img minus StyleAligned {copies.text(signed=True)}")
    return _judge(claim, list(comparisons.values()), "needs style_aligned and plain cells on a style task", notes)


COMBINED_METRICS = {"style_aligned": "reference_style", "controlnet": "shape", "lora": "reference_object",
                    "dreambooth": "reference_object"}  # what each component is there to add, as a metric


def claim_methods_combine(report: Report) -> dict[str, str]:
    """Each stack of two or more of StyleAligned, ControlNet and LoRA keeps what each part adds:
    the part's metric (``COMBINED_METRICS``) rises over plain generation on the same prompts and seeds."""
    claim = "methods combine: a stack keeps what each of its parts adds (style, shape, subject)"
    comparisons: dict[tuple[str, str], Comparison] = {}
    for cell in report.cells:
        parts = [name for name in cell.components if name in COMBINED_METRICS]
        plain = report.plain(cell.task)
        if len(parts) < 2 or plain is None:
            continue
        stack = " + ".join(cell.components)
        for part in parts:
            metric = COMBINED_METRICS[part]
            comparison = comparisons.setdefault((stack, part), Comparison(
                f"{metric.replace('_', ' ')} ({part}'s part), {stack} minus plain", cell.family))
            comparison.add(cell.task, stats.paired_between(report, cell, plain, metric), cell, plain)
    return _judge(claim, list(comparisons.values()), "needs stacks of two or more of style_aligned, controlnet, "
                  "lora with a plain cell on the same task")


CLAIMS: list[Callable[[Report], dict[str, str]]] = [
    claim_img2img_loses_detail,
    claim_dreambooth_vs_lora,
    claim_controlnet_shape_not_identity,
    claim_inversion_exact,
    claim_style_aligned,
    claim_methods_combine,
]


def evaluate_claims(report: Report | Mapping[str, Any]) -> list[dict[str, str]]:
    """Every claim's verdict on ``report`` (a Report, or a ``report.json`` dict)."""
    report = as_report(report)
    return [check(report) for check in CLAIMS]
