"""Human-readable report of a bench run: ``report.md`` and ``report.html`` beside ``report.json``.

The main table is method x consistency kind. Each cell shows the kind's consistency score, text
alignment, diversity and cost. A metric whose validation on real data missed its bar (or never
ran) is flagged with a dagger wherever it is shown. The "claims" section checks the field's
qualitative claims against the numbers (``claims.py``).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consistent_diffusion.bench.cell_records import NO_EFFECT_LEVELS, PLAIN_DISTANCE, WITHIN_SERIES
from consistent_diffusion.bench.claims import NO_EFFECT, evaluate_claims
from consistent_diffusion.bench.plots import scatter_svg
from consistent_diffusion.bench.records import Report, Score, as_report
from consistent_diffusion.bench.stats import seed_independent

UNVALIDATED = "†"
INTERVALS_NOTE = ("Intervals: 95% bootstrap of the mean over the cell's images (over its prompts where the method "
                  "ignores the seed, as a DDPM edit does); *vs plain*: the paired difference to plain generation "
                  "on the same prompts and seeds. An interval that contains 0 is no evidence either way.")
SUBJECT_NOTE = ("Object and concept cells show both subject measures: *identity* (similarity to the task's "
                "references) and *within series* (each image's mean similarity to the cell's other images, the "
                "validated object extractor on foreground crops), each with its interval and its paired difference "
                "to plain; a method that claims one subject across its series (consistent subject with generated "
                "anchors) is judged on the second.")
EFFECT_NOTE = (f"*Distance to plain*: mean absolute pixel difference to plain's image of the same prompt and seed, "
               f"levels of 255; under {NO_EFFECT_LEVELS:g} the cell is marked **{NO_EFFECT}** (docs/bench.md).")


def _metric_cell(score: Score | None, needs_validation: bool = True) -> str:
    """``0.812`` or ``0.812†`` when the metric failed validation (or, if it needs one, never had it)."""
    if score is None or score.aggregate is None:
        return "–"
    flag = UNVALIDATED if score.unvalidated(needs_validation) else ""
    return f"{score.aggregate:.3f}{flag}"


def _with_interval(text: str, interval: Any) -> str:
    return text if interval is None or text == "–" else f"{text} [{interval.low:.3f}, {interval.high:.3f}]"


def _subject_cell(report: Report, cell: Any, metric: str) -> str:
    """``0.512 [0.480, 0.540]; +0.010 [-0.020, +0.030] vs plain``: one subject measure of a cell."""
    text = _with_interval(_metric_cell(cell.scores.get(metric)), report.cell_interval(cell.id, metric))
    difference = report.cell_interval(cell.id, metric, "vs_plain")
    return text if difference is None else f"{text}; {difference.text(signed=True)} vs plain"


def _effect_cell(cell: Any) -> str:
    """The cell's distance to plain (levels of 255), flagged when it has no measurable effect."""
    distance = cell.aggregate(PLAIN_DISTANCE)
    if distance is None:
        return "–"
    return f"{distance:.1f}" + (f": {NO_EFFECT}" if cell.no_effect else "")


def main_table_rows(report: Report) -> list[dict[str, Any]]:
    """One row per cell: task, kind (its family where it has one), method, the metric it is judged
    on (``CellRecord.target_metric``: a style task's agreement with the reference's style), that
    consistency with its 95% interval and the paired difference to plain, object leakage on style
    tasks (the rise of similarity to the reference's own subject over plain), text, diversity,
    s/img, params."""
    rows = []
    for cell in report.cells:
        metric = cell.target_metric
        difference = report.cell_interval(cell.id, metric, "vs_plain")
        leakage = report.cell_interval(cell.id, "reference_object", "vs_plain") if cell.kind == "style" else None
        rows.append({
            "cell": cell.id,
            "task": cell.task,
            "kind": cell.family if cell.family != cell.kind else cell.kind,
            "metric": METRIC_LABELS.get(metric, metric),
            "method": cell.method + (" (deterministic: one sample per prompt)" if seed_independent(cell) else ""),
            "consistency": _with_interval(_metric_cell(cell.consistency), report.cell_interval(cell.id, metric)),
            "vs_plain": difference.text(signed=True) if difference is not None else "–",
            "leakage": leakage.text(signed=True) if leakage is not None else "–",
            "identity": _subject_cell(report, cell, cell.kind) if cell.kind in SUBJECT_KINDS else "–",
            "within": _subject_cell(report, cell, WITHIN_SERIES) if WITHIN_SERIES in cell.scores else "–",
            "effect": _effect_cell(cell),
            "text": _metric_cell(cell.scores.get("text")),
            "diversity": _metric_cell(cell.scores.get("diversity"), needs_validation=False),  # a guard, not a claim
            "seconds_per_image": f"{cell.cost.seconds_per_image:.2f}",
            "trainable_parameters": f"{cell.cost.trainable_parameters:,}",
            "train_seconds": f"{cell.cost.train_seconds:.0f}",
        })
    return rows


def family_rows(report: Report) -> list[dict[str, Any]]:
    """The main table: one row per (family, method), pooled over the family's tasks (two-stage
    bootstrap, ``bench.stats``): the target metric with its 95% interval, the paired gain over plain,
    object leakage over plain on style families, mean text alignment and diversity, tasks."""
    from consistent_diffusion.bench import stats

    grouped: dict[tuple[str, str], list[Any]] = {}
    for cell in report.cells:
        grouped.setdefault((cell.family, cell.method), []).append(cell)
    rows = []
    for (family, method), cells in sorted(grouped.items()):
        metric = cells[0].target_metric
        own = stats.bootstrap_interval([stats.cell_samples(report, cell, metric) for cell in cells])
        gain = stats.bootstrap_interval([stats.paired_cell_samples(report, cell, metric) for cell in cells])
        leakage = (stats.bootstrap_interval([stats.paired_cell_samples(report, cell, "reference_object") for cell in cells])
                   if cells[0].kind == "style" else None)
        within = stats.bootstrap_interval([stats.paired_cell_samples(report, cell, WITHIN_SERIES) for cell in cells])
        flagged = sum(cell.no_effect for cell in cells)
        texts = [c.aggregate("text") for c in cells if c.aggregate("text") is not None]
        diversities = [c.aggregate("diversity") for c in cells if c.aggregate("diversity") is not None]
        rows.append({
            "family": family, "method": method, "metric": METRIC_LABELS.get(metric, metric),
            "consistency": own.text() if own is not None else "–",
            "vs_plain": gain.text(signed=True) if gain is not None else "–",
            "leakage": leakage.text(signed=True) if leakage is not None else "–",
            "within": within.text(signed=True) if within is not None else "–",
            "effect": f"{NO_EFFECT} on {flagged} of {len(cells)} tasks" if flagged else "–",
            "text": f"{sum(texts) / len(texts):.3f}" if texts else "–",
            "diversity": f"{sum(diversities) / len(diversities):.3f}" if diversities else "–",
            "tasks": str(len(cells)),
        })
    return rows


FAMILY_COLUMNS = [("family", "family"), ("method", "method"), ("metric", "measured"),
                  ("consistency", "consistency [95% CI]"), ("vs_plain", "vs plain, paired [95% CI]"),
                  ("leakage", "object leakage vs plain"), ("within", "within-series agreement vs plain"),
                  ("effect", "effect"), ("text", "text alignment"), ("diversity", "diversity"), ("tasks", "tasks")]
METRIC_LABELS = {"reference_style": "style to reference", "style": "style within set",
                 WITHIN_SERIES: "subject within series", "object": "identity to references",
                 "concept": "concept (to its definition)"}
SUBJECT_KINDS = ("object", "concept")
COLUMNS = [("task", "task"), ("kind", "kind"), ("method", "method"), ("metric", "measured"),
           ("consistency", "consistency [95% CI]"), ("vs_plain", "vs plain, paired [95% CI]"),
           ("leakage", "object leakage vs plain"), ("identity", "to references (object) or definition (concept); vs plain"),
           ("within", "within series; vs plain"), ("effect", "distance to plain"),
           ("text", "text alignment"), ("diversity", "diversity"), ("seconds_per_image", "s / image"),
           ("trainable_parameters", "trainable params"), ("train_seconds", "training s")]


def render_markdown(report: Report, claims: list[dict[str, Any]]) -> str:
    lines = [f"# Consistency benchmark: suite `{report.suite.name}`", ""]
    model = report.model or {}
    lines += [f"Model: `{model.get('spec', '?')}` ({model.get('pipeline_class', '?')}); "
              f"{report.suite.steps} steps, guidance {report.suite.guidance}.", ""]
    if not report.complete:
        lines += [f"**Incomplete**: missing cells {', '.join(report.missing_cells)}.", ""]
    lines += ["## By family (pooled over tasks)", "", "| " + " | ".join(title for _, title in FAMILY_COLUMNS) + " |",
              "|" + "---|" * len(FAMILY_COLUMNS)]
    lines += ["| " + " | ".join(row[key] for key, _ in FAMILY_COLUMNS) + " |" for row in family_rows(report)]
    lines += ["", "## Cells", ""]
    lines += ["| " + " | ".join(title for _, title in COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    for row in main_table_rows(report):
        lines.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    lines += ["", f"{UNVALIDATED} metric not validated on real data (missed its bar or never validated): "
              "read with care.", "", INTERVALS_NOTE, "", SUBJECT_NOTE, "", EFFECT_NOTE, ""]
    if report.suite.tuning:
        lines += ["## How the options were chosen", ""]
        lines += [f"- **{key}**: {value}" for key, value in report.suite.tuning.items()]
        lines.append("")
    lines += ["## Claims", "",
              "| claim | verdict | evidence |", "|---|---|---|"]
    for claim in claims:
        lines.append(f"| {claim['claim']} | **{claim['verdict']}** | {claim['evidence']} |")
    lines += ["", "## Images", ""]
    for cell in report.cells:
        lines += [f"### {cell.id}", "", f"![{cell.id}](cells/{cell.id}/series/contact_sheet.png)", ""]
    return "\n".join(lines) + "\n"


def _figure_html(figure: dict[str, Any], references: set[str]) -> str:
    """One claim's evidence on one task: the reference, then the compared cells' contact sheets."""
    esc = html.escape
    items = []
    if figure["task"] in references:
        items.append((f"references/{figure['task']}.png", f"{figure['task']}: reference"))
    items += [(f"cells/{cell}/series/contact_sheet.png", cell.split("__", 1)[-1]) for cell in figure["cells"]]
    return "".join(f"<div class='cell'><small>{esc(caption)}</small><br><img class='evidence' src='{esc(src)}' "
                   f"alt='{esc(caption)}'></div>" for src, caption in items)


def render_html(report: Report, claims: list[dict[str, Any]], plots: list[str],
                references: set[str] | None = None) -> str:
    """The HTML report; ``references``: tasks whose reference image is in ``references/``."""
    esc = html.escape
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>consistent-diffusion bench</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f4f4f4}"
            ".cell{display:inline-block;margin:8px;vertical-align:top}.cell img{image-rendering:pixelated;"
            "width:320px}.cell img.evidence{width:240px}.held{color:#080}.not-held{color:#b00}.nm{color:#777}</style></head><body>")
    parts = [head, f"<h1>Consistency benchmark: suite <code>{esc(report.suite.name)}</code></h1>"]
    model = report.model or {}
    parts.append(f"<p>Model <code>{esc(str(model.get('spec', '?')))}</code> ({esc(str(model.get('pipeline_class', '?')))}), "
                 f"{report.suite.steps} steps, guidance {report.suite.guidance}.</p>")
    if not report.complete:
        parts.append(f"<p><b>Incomplete</b>: missing {esc(', '.join(report.missing_cells))}</p>")
    parts.append("<h2>By family (pooled over tasks)</h2><table><tr>"
                 + "".join(f"<th>{esc(t)}</th>" for _, t in FAMILY_COLUMNS) + "</tr>")
    for row in family_rows(report):
        parts.append("<tr>" + "".join(f"<td>{esc(row[k])}</td>" for k, _ in FAMILY_COLUMNS) + "</tr>")
    parts.append("</table><h2>Cells</h2>")
    parts.append("<table><tr>" + "".join(f"<th>{esc(t)}</th>" for _, t in COLUMNS) + "</tr>")
    for row in main_table_rows(report):
        parts.append("<tr>" + "".join(f"<td>{esc(str(row[k]))}</td>" for k, _ in COLUMNS) + "</tr>")
    parts.append(f"</table><p>{UNVALIDATED} metric not validated on real data: read with care.</p>")
    parts += [f"<p>{esc(note.replace('*', ''))}</p>" for note in (SUBJECT_NOTE, EFFECT_NOTE)]
    if report.suite.tuning:
        parts.append("<h2>How the options were chosen</h2><ul>" + "".join(
            f"<li><b>{esc(str(key))}</b>: {esc(str(value))}</li>" for key, value in report.suite.tuning.items()) + "</ul>")
    parts.append("<h2>Claims</h2><table><tr><th>claim</th><th>verdict</th><th>evidence</th></tr>")
    for claim in claims:
        css = {"held": "held", "not held": "not-held"}.get(claim["verdict"], "nm")
        parts.append(f"<tr><td>{esc(claim['claim'])}</td><td class='{css}'><b>{esc(claim['verdict'])}</b></td>"
                     f"<td>{esc(claim['evidence'])}</td></tr>")
        figures = "".join(_figure_html(figure, references or set()) for figure in claim.get("figures", ())[:3])
        if figures:
            parts.append(f"<tr><td colspan='3'>{figures}</td></tr>")
    parts.append("</table><h2>Trade-offs</h2>")
    parts.extend(plots)
    parts.append("<h2>Images</h2>")
    for cell in report.cells:
        src = f"cells/{cell.id}/series/contact_sheet.png"
        parts.append(f"<div class='cell'><b>{esc(cell.id)}</b><br><img src='{esc(src)}' alt='{esc(cell.id)}'></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def trade_off_plots(report: Report) -> list[str]:
    """Consistency vs diversity and vs text alignment, one point per cell (SVG)."""
    plots = []
    for other, label in (("diversity", "diversity"), ("text", "text alignment")):
        points, errors = [], []
        for cell in report.cells:
            x, y = cell.aggregate(other), cell.aggregate(cell.target_metric)
            if x is not None and y is not None:
                points.append((float(x), float(y), cell.method, cell.kind))
                errors.append((report.cell_interval(cell.id, other), report.cell_interval(cell.id, cell.target_metric)))
        if points:
            plots.append(scatter_svg(points, x_label=label, y_label="consistency (own kind; style: to the reference)",
                                     title=f"consistency vs {label} (bars: 95% intervals)",
                                     errors=[_bar(ex, ey) for ex, ey in errors]))
    return plots


def _bar(x: Any, y: Any) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    return ((x.low, x.high) if x is not None else None, (y.low, y.high) if y is not None else None)


def write_reports(report: Report | Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write report.md and report.html (atomically) next to report.json; returns their paths."""
    from consistent_diffusion.core.outputs import write_text_atomic

    report, out_dir = as_report(report), Path(out_dir)
    claims = evaluate_claims(report)
    md = write_text_atomic(render_markdown(report, claims), out_dir / "report.md")
    references = {path.stem for path in (out_dir / "references").glob("*.png")}
    page = write_text_atomic(render_html(report, claims, trade_off_plots(report), references), out_dir / "report.html")
    return md, page
