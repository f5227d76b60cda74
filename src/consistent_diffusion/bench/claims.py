"""The survey's qualitative claims, each checked against a bench report's numbers, with intervals.

Every claim rests on comparisons, each a difference predicted to be positive: a method against
plain generation (or against another method) on the same prompts and seeds, pooled over the tasks
of one kind (``bench.stats``: paired differences, two-stage bootstrap over tasks and seeds, 95%).
A comparison that is exact rather than a mean over samples (trainable parameters, a reconstruction
against its ceiling) is a zero-width interval.

A claim is judged **part by part**: each *clause* ("DreamBooth gives object consistency", "LoRA is
cheaper to train", "LoRA is weaker on complex new concepts") rests on its own comparisons and gets
its own verdict and evidence: *held* when every comparison's interval lies above zero, *not held*
when every interval excludes zero and one lies below, *inconclusive* otherwise (``stats.verdict``),
*not measurable here* when the cells it needs are missing. The claim is *held* when every clause
is, *not held* when a clause is not held, *inconclusive* otherwise; when some clauses were not
measured it is **partly measured**, naming each clause's verdict, and never *held*. A compared cell
whose images stay within ``NO_EFFECT_LEVELS`` of plain's is named in the evidence as having *no
measurable effect*. Cells are found by the registered method names in their stacks
(``CellRecord.components``), so suites may name their method stacks freely. Verdicts quote the
intervals behind them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consistent_diffusion.bench import stats
from consistent_diffusion.bench.cell_records import NO_EFFECT_LEVELS, WITHIN_SERIES
from consistent_diffusion.bench.records import CellRecord, Report, as_report, by_task

HELD, NOT_HELD, INCONCLUSIVE = stats.HELD, stats.NOT_HELD, stats.INCONCLUSIVE
NOT_MEASURABLE = "not measurable here"
PARTLY_MEASURED = "partly measured"
NO_EFFECT = "no measurable effect"
DIVERSITY_KEPT = 0.8  # consistent subject keeps layout diversity: at least this share of plain's
IDENTITY_MARGIN = 0.05  # "not identity": similarity to the reference subject rises by less than this
RECONSTRUCTION_SLACK_DB = 0.5  # "exact": within this of the VAE round trip's PSNR


@dataclass
class Comparison:
    """One predicted-positive difference, pooled over tasks: each task's paired samples."""

    label: str
    kind: str
    per_task: dict[str, list[float]] = field(default_factory=dict)
    figures: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (task, the compared cells' ids)
    no_effect: list[str] = field(default_factory=list)  # compared method cells with no measurable effect

    def add(self, task: str, values: list[float], *cells: CellRecord) -> None:
        """The task's paired samples, and the cells they compare (baseline last), shown as evidence."""
        if values:
            self.per_task.setdefault(task, []).extend(values)
            figure = (task, tuple(cell.id for cell in reversed(cells)))
            if cells and figure not in self.figures:
                self.figures.append(figure)
            self.no_effect += [cell.id for cell in cells if cell.no_effect and cell.id not in self.no_effect]

    def interval(self) -> stats.Interval | None:
        return stats.bootstrap_interval(list(self.per_task.values()))

    def evidence(self) -> str:
        interval = self.interval()
        tasks = ", ".join(self.per_task)
        if interval.low == interval.high and abs(interval.mean) >= 1000:  # an exact count
            return f"{self.label} ({self.kind}: {tasks}): {interval.mean:+,.0f}"
        text = f"{self.label} ({self.kind}: {tasks}): {interval.text(signed=True)}, {interval.samples} samples"
        if self.no_effect:
            text += f" ({NO_EFFECT}, within {NO_EFFECT_LEVELS:g} levels of plain: {', '.join(self.no_effect)})"
        return text


@dataclass
class Clause:
    """One part of a compound claim, judged on its own comparisons; ``missing``: what it needs."""

    text: str
    comparisons: list[Comparison]
    missing: str
    notes: list[str] = field(default_factory=list)

    def judged(self) -> dict[str, Any]:
        """{"clause", "verdict", "evidence"}; the verdict of the measured comparisons' intervals."""
        measured = [c for c in self.comparisons if c.per_task]
        if not measured:
            return {"clause": self.text, "verdict": NOT_MEASURABLE, "evidence": f"needs {self.missing}"}
        verdict = stats.verdict([c.interval() for c in measured])
        flagged = [cell for c in measured for cell in c.no_effect]
        if flagged and all(c.no_effect for c in measured):
            verdict += f" ({NO_EFFECT})"
        evidence = "; ".join([c.evidence() for c in measured] + list(self.notes))
        return {"clause": self.text, "verdict": verdict, "evidence": evidence}


def _combine(verdicts: list[str]) -> str:
    """A compound claim's verdict from its measured clauses' (all measured)."""
    base = [verdict.split(" (")[0] for verdict in verdicts]
    if all(v == HELD for v in base):
        return HELD
    return NOT_HELD if NOT_HELD in base else INCONCLUSIVE


def _judge(claim: str, clauses: list[Clause]) -> dict[str, Any]:
    """The claim's verdict part by part: every clause's own verdict and evidence; *partly measured*
    (never held) when a clause was not measured; *not measurable here* when none was."""
    parts = [clause.judged() for clause in clauses]
    measured = [part for part in parts if part["verdict"] != NOT_MEASURABLE]
    if not measured:
        return {"claim": claim, "verdict": NOT_MEASURABLE, "clauses": parts,
                "evidence": "; ".join(part["evidence"] for part in parts)}
    if len(measured) < len(parts):
        verdict = f"{PARTLY_MEASURED}: " + "; ".join(f"{part['clause']}: {part['verdict']}" for part in parts)
    else:
        verdict = _combine([part["verdict"] for part in parts])
        if all(part["verdict"].endswith(f"({NO_EFFECT})") for part in parts):
            verdict += f" ({NO_EFFECT})"  # every clause compared cells that barely differ from plain
    evidence = " ".join(f"({i}) {part['clause']} [{part['verdict']}]: {part['evidence']}."
                        for i, part in enumerate(parts, 1))
    figures = []
    for clause in clauses:
        for comparison in clause.comparisons:
            for task, cells in comparison.figures:
                if {"task": task, "cells": list(cells)} not in figures:
                    figures.append({"task": task, "cells": list(cells)})
    return {"claim": claim, "verdict": verdict, "evidence": evidence, "clauses": parts, "figures": figures}


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
    return _judge(claim, [Clause("img2img loses fine details as strength rises", list(comparisons.values()),
                                 "img2img cells at two or more strengths with reference fidelity")])


def claim_dreambooth_vs_lora(report: Report) -> dict[str, str]:
    claim = ("DreamBooth gives object consistency; LoRA DreamBooth is cheaper to train "
             "but weaker on complex new concepts")
    # three clauses: each is measured on its own cells (an object-only suite measures the first two)
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
    return _judge(claim, [
        Clause("DreamBooth gives object consistency", [beats_plain], "dreambooth and plain cells on an object task"),
        Clause("LoRA DreamBooth is cheaper to train", [cheaper], "dreambooth and lora cells on a task"),
        Clause("LoRA DreamBooth is weaker on complex new concepts", [beats_lora],
               "dreambooth and lora cells on a concept task"),
    ])


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
    return _judge(claim, [
        Clause("ControlNet controls shape", [shape], "controlnet and plain cells on a shape task", notes),
        Clause("not identity", [identity], "controlnet and plain cells on a shape task with a reference"),
    ])


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
    return _judge(claim, [
        Clause("noise inversion reconstructs exactly", [exact], "a ddpm_edit cell at skip 0 with the source prompt "
               "and a reference"),
        Clause("allows controlled edits", [controlled], "a ddpm_edit cell with skip > 0 and a plain cell on its task"),
    ])


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
    missing = "style_aligned and plain cells on a style task"
    return _judge(claim, [
        Clause("StyleAligned gives style consistency", [c for (part, _), c in comparisons.items() if part == "style"],
               missing),
        Clause("does not copy objects", [c for (part, _), c in comparisons.items() if part == "leakage"], missing, notes),
    ])


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
    stacks = list(dict.fromkeys(stack for stack, _ in comparisons))
    clauses = [Clause(f"{stack} keeps what each part adds",
                      [c for (name, _), c in comparisons.items() if name == stack], "its cells") for stack in stacks]
    return _judge(claim, clauses or [Clause("a stack keeps what each part adds", [], "stacks of two or more of "
                                            "style_aligned, controlnet, lora with a plain cell on the same task")])


def _diversity_kept(report: Report, cell: CellRecord, plain: CellRecord) -> list[float]:
    """Per sample: the cell's diversity minus ``DIVERSITY_KEPT`` times plain's (same prompt and seed)."""
    return stats.paired_between(report, cell, _scaled(plain, "diversity", DIVERSITY_KEPT), "diversity")


def _scaled(cell: CellRecord, metric: str, factor: float) -> CellRecord:
    """``cell`` with ``metric``'s per-image values multiplied by ``factor`` (a threshold to pair against)."""
    score = cell.scores[metric]
    values = tuple(None if v is None else factor * v for v in score.per_image)
    return dataclasses.replace(cell, scores={**cell.scores, metric: dataclasses.replace(score, per_image=values)})


def claim_consistent_subject(report: Report) -> dict[str, Any]:
    """ConsiStory's claim, measured for what it claims: with generated anchors, one subject across the
    series (subject agreement *within* the series rises over plain: it pulls the series toward its
    own anchors, not toward the task's references) while layout diversity stays at least
    ``DIVERSITY_KEPT`` of plain's; with a real anchor image, the series takes the reference's subject
    (identity to the references rises over plain)."""
    claim = ("consistent subject (ConsiStory) keeps one subject across a series without training, with layout "
             "diversity kept; with a real anchor image, the reference's subject")
    within: dict[str, Comparison] = {}
    diverse: dict[str, Comparison] = {}
    real: dict[str, Comparison] = {}
    for cell in report.select(["consistent_subject"]):
        plain = report.plain(cell.task)
        if plain is None or cell.kind not in ("object", "concept"):
            continue
        if cell.judged_within_series:
            label = "subject agreement within the series, consistent subject minus plain"
            within.setdefault(cell.family, Comparison(label, cell.family)).add(
                cell.task, stats.paired_between(report, cell, plain, WITHIN_SERIES), cell, plain)
            if "diversity" in cell.scores and "diversity" in plain.scores:
                label = f"diversity minus {DIVERSITY_KEPT:g} x plain's"
                diverse.setdefault(cell.family, Comparison(label, cell.family)).add(
                    cell.task, _diversity_kept(report, cell, plain), cell, plain)
        else:
            label = "identity to the references, consistent subject with the real anchor minus plain"
            real.setdefault(cell.family, Comparison(label, cell.family)).add(
                cell.task, stats.paired_between(report, cell, plain, cell.kind), cell, plain)
    needs = "consistent_subject and plain cells on an object or concept task"
    return _judge(claim, [
        Clause("generated anchors keep one subject within the series", list(within.values()),
               f"{needs} with the {WITHIN_SERIES} score"),
        Clause("layout diversity kept", list(diverse.values()), needs),
        Clause("a real anchor carries the reference's subject", list(real.values()),
               "a consistent_subject cell with reference_image and a plain cell"),
    ])


CLAIMS: list[Callable[[Report], dict[str, str]]] = [
    claim_img2img_loses_detail,
    claim_dreambooth_vs_lora,
    claim_controlnet_shape_not_identity,
    claim_inversion_exact,
    claim_style_aligned,
    claim_methods_combine,
    claim_consistent_subject,
]


def evaluate_claims(report: Report | Mapping[str, Any]) -> list[dict[str, str]]:
    """Every claim's verdict on ``report`` (a Report, or a ``report.json`` dict)."""
    report = as_report(report)
    return [check(report) for check in CLAIMS]
