"""The survey's qualitative claims, each checked against a bench report's numbers.

A claim is *held* or *not held* when the cells it needs exist and their metrics were computed;
otherwise it is *not measurable here* (saying which cells are missing). Cells are found by the
registered method names in their stacks (``CellRecord.components``), so suites may name their method
stacks freely. Verdicts quote the numbers behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from consistent_diffusion.bench.records import CellRecord, Report, as_report, by_task

HELD, NOT_HELD, NOT_MEASURABLE = "held", "not held", "not measurable here"


def _verdict(claim: str, ok: bool | None, evidence: str) -> dict[str, str]:
    verdict = NOT_MEASURABLE if ok is None else (HELD if ok else NOT_HELD)
    return {"claim": claim, "verdict": verdict, "evidence": evidence}


def _by_stack(cells: list[CellRecord]) -> dict[tuple[str, ...], CellRecord]:
    """A task's cells by their stack of registered method names (() = plain generation)."""
    return {tuple(cell.components): cell for cell in cells}


def claim_img2img_loses_detail(report: Report) -> dict[str, str]:
    claim = "img2img is simplest but loses fine details of the reference as noise strength rises"
    evidence, checks = [], []
    for task, cells in by_task(report.select(["img2img"])).items():
        points = sorted((c.option("img2img", "strength"), c.aggregate("reference_fidelity")) for c in cells)
        points = [(s, f) for s, f in points if s is not None and f is not None]
        if len(points) >= 2:
            checks.append(all(a[1] > b[1] for a, b in zip(points, points[1:], strict=False)))
            evidence.append(f"{task}: " + ", ".join(f"strength {s:g} -> fidelity {f:.3f}" for s, f in points))
    if not checks:
        return _verdict(claim, None, "needs img2img cells at two or more strengths with reference fidelity")
    return _verdict(claim, all(checks), "; ".join(evidence))


def claim_dreambooth_vs_lora(report: Report) -> dict[str, str]:
    claim = ("DreamBooth gives object consistency; LoRA DreamBooth is cheaper to train "
             "but weaker on complex new concepts")
    parts, checks = [], []
    for kind in ("object", "concept"):
        for task, cells in by_task(report.select(kind=kind)).items():
            found = _by_stack(cells)
            full, lora, plain = found.get(("dreambooth",)), found.get(("lora",)), found.get(())
            if not (full and lora):
                continue
            f, l_ = full.aggregate(kind), lora.aggregate(kind)
            if plain is not None and kind == "object":
                p = plain.aggregate(kind)
                checks.append(f is not None and p is not None and f > p)
                parts.append(f"{task}: object DreamBooth {f:.3f} vs plain {p:.3f}")
            cheaper = lora.cost.trainable_parameters < full.cost.trainable_parameters
            checks.append(cheaper and f is not None and l_ is not None and l_ <= f)
            parts.append(f"{task}: {kind} LoRA {l_:.3f} vs DreamBooth {f:.3f}; trainable "
                         f"{lora.cost.trainable_parameters:,} vs {full.cost.trainable_parameters:,}")
    if not checks:
        return _verdict(claim, None, "needs dreambooth and lora cells on object/concept tasks")
    return _verdict(claim, all(checks), "; ".join(parts))


IDENTITY_MARGIN = 0.05  # "not identity": similarity to the reference subject rises by at most this much


def doubles_or_halves_error(score: float, baseline: float) -> bool:
    """"At least 2x better" for a score in [0, 1]: twice the baseline's score, or half its error
    (1 - score). The second reading matters where chance agreement is high (dense edge maps)."""
    return score >= 2 * baseline or (1 - score) <= 0.5 * (1 - baseline)


def claim_controlnet_shape_not_identity(report: Report) -> dict[str, str]:
    claim = "ControlNet controls shape, not identity"
    parts, checks = [], []
    for task, cells in by_task(report.select(kind="shape")).items():
        found = _by_stack(cells)
        control, plain = found.get(("controlnet",)), found.get(())
        if not (control and plain):
            continue
        c, p = control.aggregate("shape"), plain.aggregate("shape")
        co, po = control.aggregate("reference_object"), plain.aggregate("reference_object")
        if None in (c, p):
            continue
        shape_ok = doubles_or_halves_error(c, p)
        identity_ok = co is None or po is None or co <= po + IDENTITY_MARGIN
        checks.append(shape_ok and identity_ok)
        parts.append(f"{task}: shape {c:.3f} vs plain {p:.3f} ({c / max(p, 1e-9):.2f}x; shape error "
                     f"{1 - c:.3f} vs {1 - p:.3f})"
                     + (f"; reference identity {co:.3f} vs plain {po:.3f}" if co is not None and po is not None else ""))
    if not checks:
        return _verdict(claim, None, "needs controlnet and plain cells on a shape task")
    return _verdict(claim, all(checks), "; ".join(parts))


def claim_inversion_exact(report: Report) -> dict[str, str]:
    """Exact: a skip-0 re-sampling with the source prompt matches the reference as well as the
    VAE round trip does (the inversion is exact in latent space; only the VAE loses detail).
    Controlled: an edit (skip > 0, new prompt) stays closer to the reference's subject than
    plain generation of the same prompts."""
    claim = "noise inversion reconstructs exactly and allows controlled edits"
    parts, checks = [], []
    for cell in report.select(["ddpm_edit"]):
        skip = cell.option("ddpm_edit", "skip") or 0
        if skip == 0 and cell.reference_vae_psnr is not None:
            psnr, ceiling = cell.aggregate("reference_psnr"), cell.reference_vae_psnr
            if psnr is not None:
                checks.append(psnr >= ceiling - 0.5)
                parts.append(f"{cell.task}: reconstruction PSNR {psnr:.2f} dB vs VAE round trip {ceiling:.2f} dB")
        elif skip > 0:
            plain = report.plain(cell.task)
            edited, baseline = cell.aggregate("reference_object"), plain and plain.aggregate("reference_object")
            if edited is not None and baseline is not None:
                checks.append(edited > baseline)
                parts.append(f"{cell.task}: edit (skip {skip}) keeps the subject {edited:.3f} vs plain {baseline:.3f}")
    if not checks:
        return _verdict(claim, None, "needs ddpm_edit cells (skip 0 with the source prompt, and an edit) with references")
    return _verdict(claim, all(checks), "; ".join(parts))


def claim_style_aligned(report: Report) -> dict[str, str]:
    claim = "StyleAligned gives style consistency but does not copy objects"
    parts, checks = [], []
    for task, cells in by_task(report.select(kind="style")).items():
        found = _by_stack(cells)
        aligned, plain, img2img = found.get(("style_aligned",)), found.get(()), found.get(("img2img",))
        if not (aligned and plain):
            continue
        a, p = aligned.aggregate("style"), plain.aggregate("style")
        if None in (a, p):
            continue
        ok = a > p
        text = f"{task}: style {a:.3f} vs plain {p:.3f}"
        if img2img is not None:
            ao, io = aligned.aggregate("reference_object"), img2img.aggregate("reference_object")
            if ao is not None and io is not None:
                ok = ok and ao < io
                text += f"; similarity to the reference object {ao:.3f} vs img2img {io:.3f}"
        checks.append(ok)
        parts.append(text)
    if not checks:
        return _verdict(claim, None, "needs style_aligned and plain cells on a style task")
    return _verdict(claim, all(checks), "; ".join(parts))


CLAIMS: list[Callable[[Report], dict[str, str]]] = [
    claim_img2img_loses_detail,
    claim_dreambooth_vs_lora,
    claim_controlnet_shape_not_identity,
    claim_inversion_exact,
    claim_style_aligned,
]


def evaluate_claims(report: Report | Mapping[str, Any]) -> list[dict[str, str]]:
    """Every claim's verdict on ``report`` (a Report, or a ``report.json`` dict)."""
    report = as_report(report)
    return [check(report) for check in CLAIMS]
