"""The survey's qualitative claims, each checked against a bench report's numbers.

A claim is *held* or *not held* when the cells it needs exist and their metrics were computed;
otherwise it is *not measurable here* (saying which cells are missing). Cells are found by the
registered method names in their stacks (``record["stack"]``), so suites may name their method
stacks freely. Verdicts quote the numbers behind them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HELD, NOT_HELD, NOT_MEASURABLE = "held", "not held", "not measurable here"
Record = dict[str, Any]


def _aggregate(record: Record, metric: str) -> float | None:
    value = record["scores"].get(metric)
    return None if not value else value.get("aggregate")


def _components(record: Record) -> list[str]:
    return [entry["method"] for entry in record.get("stack", [])]


def _cells(report: dict[str, Any], stack: list[str] | None = None, kind: str | None = None) -> list[Record]:
    """Cells whose method stack is exactly ``stack`` (None: any), of task ``kind`` (None: any)."""
    return [r for r in report["cells"]
            if (stack is None or _components(r) == stack) and (kind is None or r["kind"] == kind)]


def _by_task(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {}
    for record in records:
        grouped.setdefault(record["task"], []).append(record)
    return grouped


def _verdict(claim: str, ok: bool | None, evidence: str) -> dict[str, str]:
    verdict = NOT_MEASURABLE if ok is None else (HELD if ok else NOT_HELD)
    return {"claim": claim, "verdict": verdict, "evidence": evidence}


def _option(record: Record, method: str, key: str) -> Any:
    for entry in record.get("stack", []):
        if entry["method"] == method:
            return entry.get(key)
    return None


def claim_img2img_loses_detail(report: dict[str, Any]) -> dict[str, str]:
    claim = "img2img is simplest but loses fine details of the reference as noise strength rises"
    evidence, checks = [], []
    for task, records in _by_task(_cells(report, ["img2img"])).items():
        points = sorted((_option(r, "img2img", "strength"), _aggregate(r, "reference_fidelity")) for r in records)
        points = [(s, f) for s, f in points if s is not None and f is not None]
        if len(points) >= 2:
            checks.append(all(a[1] > b[1] for a, b in zip(points, points[1:], strict=False)))
            evidence.append(f"{task}: " + ", ".join(f"strength {s:g} -> fidelity {f:.3f}" for s, f in points))
    if not checks:
        return _verdict(claim, None, "needs img2img cells at two or more strengths with reference fidelity")
    return _verdict(claim, all(checks), "; ".join(evidence))


def claim_dreambooth_vs_lora(report: dict[str, Any]) -> dict[str, str]:
    claim = ("DreamBooth gives object consistency; LoRA DreamBooth is cheaper to train "
             "but weaker on complex new concepts")
    parts, checks = [], []
    for kind in ("object", "concept"):
        for task, records in _by_task(_cells(report, kind=kind)).items():
            found = {tuple(_components(r)): r for r in records}
            full, lora, plain = found.get(("dreambooth",)), found.get(("lora",)), found.get(())
            if not (full and lora):
                continue
            f, l_ = _aggregate(full, kind), _aggregate(lora, kind)
            if plain is not None and kind == "object":
                p = _aggregate(plain, kind)
                checks.append(f is not None and p is not None and f > p)
                parts.append(f"{task}: object DreamBooth {f:.3f} vs plain {p:.3f}")
            cheaper = lora["cost"]["trainable_parameters"] < full["cost"]["trainable_parameters"]
            checks.append(cheaper and f is not None and l_ is not None and l_ <= f)
            parts.append(f"{task}: {kind} LoRA {l_:.3f} vs DreamBooth {f:.3f}; trainable "
                         f"{lora['cost']['trainable_parameters']:,} vs {full['cost']['trainable_parameters']:,}")
    if not checks:
        return _verdict(claim, None, "needs dreambooth and lora cells on object/concept tasks")
    return _verdict(claim, all(checks), "; ".join(parts))


IDENTITY_MARGIN = 0.05  # "not identity": similarity to the reference subject rises by at most this much


def doubles_or_halves_error(score: float, baseline: float) -> bool:
    """"At least 2x better" for a score in [0, 1]: twice the baseline's score, or half its error
    (1 - score). The second reading matters where chance agreement is high (dense edge maps)."""
    return score >= 2 * baseline or (1 - score) <= 0.5 * (1 - baseline)


def claim_controlnet_shape_not_identity(report: dict[str, Any]) -> dict[str, str]:
    claim = "ControlNet controls shape, not identity"
    parts, checks = [], []
    for task, records in _by_task(_cells(report, kind="shape")).items():
        found = {tuple(_components(r)): r for r in records}
        control, plain = found.get(("controlnet",)), found.get(())
        if not (control and plain):
            continue
        c, p = _aggregate(control, "shape"), _aggregate(plain, "shape")
        co, po = _aggregate(control, "reference_object"), _aggregate(plain, "reference_object")
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


def claim_inversion_exact(report: dict[str, Any]) -> dict[str, str]:
    """Exact: a skip-0 re-sampling with the source prompt matches the reference as well as the
    VAE round trip does (the inversion is exact in latent space; only the VAE loses detail).
    Controlled: an edit (skip > 0, new prompt) stays closer to the reference's subject than
    plain generation of the same prompts."""
    claim = "noise inversion reconstructs exactly and allows controlled edits"
    parts, checks = [], []
    for record in report["cells"]:
        if _components(record) != ["ddpm_edit"]:
            continue
        skip = _option(record, "ddpm_edit", "skip") or 0
        if skip == 0 and record.get("reference_vae_psnr") is not None:
            psnr, ceiling = _aggregate(record, "reference_psnr"), record["reference_vae_psnr"]
            if psnr is not None:
                checks.append(psnr >= ceiling - 0.5)
                parts.append(f"{record['task']}: reconstruction PSNR {psnr:.2f} dB vs VAE round trip {ceiling:.2f} dB")
        elif skip > 0:
            plain = next((r for r in report["cells"] if r["task"] == record["task"] and not r.get("stack")), None)
            edited, baseline = _aggregate(record, "reference_object"), plain and _aggregate(plain, "reference_object")
            if edited is not None and baseline is not None:
                checks.append(edited > baseline)
                parts.append(f"{record['task']}: edit (skip {skip}) keeps the subject {edited:.3f} vs plain {baseline:.3f}")
    if not checks:
        return _verdict(claim, None, "needs ddpm_edit cells (skip 0 with the source prompt, and an edit) with references")
    return _verdict(claim, all(checks), "; ".join(parts))


def claim_style_aligned(report: dict[str, Any]) -> dict[str, str]:
    claim = "StyleAligned gives style consistency but does not copy objects"
    parts, checks = [], []
    for task, records in _by_task(_cells(report, kind="style")).items():
        found = {tuple(_components(r)): r for r in records}
        aligned, plain, img2img = found.get(("style_aligned",)), found.get(()), found.get(("img2img",))
        if not (aligned and plain):
            continue
        a, p = _aggregate(aligned, "style"), _aggregate(plain, "style")
        if None in (a, p):
            continue
        ok = a > p
        text = f"{task}: style {a:.3f} vs plain {p:.3f}"
        if img2img is not None:
            ao, io = _aggregate(aligned, "reference_object"), _aggregate(img2img, "reference_object")
            if ao is not None and io is not None:
                ok = ok and ao < io
                text += f"; similarity to the reference object {ao:.3f} vs img2img {io:.3f}"
        checks.append(ok)
        parts.append(text)
    if not checks:
        return _verdict(claim, None, "needs style_aligned and plain cells on a style task")
    return _verdict(claim, all(checks), "; ".join(parts))


CLAIMS: list[Callable[[dict[str, Any]], dict[str, str]]] = [
    claim_img2img_loses_detail,
    claim_dreambooth_vs_lora,
    claim_controlnet_shape_not_identity,
    claim_inversion_exact,
    claim_style_aligned,
]


def evaluate_claims(report: dict[str, Any]) -> list[dict[str, str]]:
    return [check(report) for check in CLAIMS]
