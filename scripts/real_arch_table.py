"""The tables of ``real_architectures.py``: one markdown table per architecture (CPU or CUDA columns),
the memory growth per image of the shared-attention methods, and its extrapolation to the native size.

Extrapolation (issue #29 item 3): StyleAligned and consistent subject share attention by
concatenating keys/values and run it through ``scaled_dot_product_attention`` (no score matrix is
kept), so every activation of one image, the shared attention included, is linear in its latent
tokens: the per-image memory measured at ``size`` px scales by ``(native / size) ** 2`` to the
native size. That is an extrapolation from the measured slope, not a measurement.
"""

from __future__ import annotations

from typing import Any

from real_arch_rows import GROWTH_METHODS, parse_growth_label

SECOND_PROCESS = " (second process)"


def per_image_growth(results: list[dict[str, Any]]) -> dict[str, tuple[float, list[int]]]:
    """Least-squares slope (MB per image) of the peak memory over the batch, per growth method, with
    the batches it used; methods with fewer than two measured batches are left out."""
    points: dict[str, list[tuple[int, float]]] = {}
    for result in results:
        parsed = parse_growth_label(result["row"])
        if parsed and not result["error"] and result["peak_mb"] is not None:
            points.setdefault(parsed[0], []).append((parsed[1], float(result["peak_mb"])))
    slopes = {}
    for method, pairs in points.items():
        batches = sorted({b for b, _ in pairs})
        if len(batches) < 2:
            continue
        mean_b = sum(b for b, _ in pairs) / len(pairs)
        mean_m = sum(m for _, m in pairs) / len(pairs)
        slope = (sum((b - mean_b) * (m - mean_m) for b, m in pairs)
                 / sum((b - mean_b) ** 2 for b, _ in pairs))
        slopes[method] = (slope, batches)
    return slopes


def extrapolated_per_image_mb(slope_mb: float, size: int, target: int) -> float:
    """Per-image memory at ``target`` px from the slope at ``size`` px: linear in latent tokens."""
    return slope_mb * (target / size) ** 2


def growth_summary(results: list[dict[str, Any]], size: int, native: int) -> str:
    """One paragraph: measured MB per image and its extrapolation to ``native`` px ('' if nothing to say)."""
    slopes = per_image_growth(results)
    if not slopes:
        return ""
    parts = []
    for method in GROWTH_METHODS:
        if method in slopes:
            slope, batches = slopes[method]
            line = f"{method}: {slope:.0f} MB per image at {size} px (fit over {'/'.join(map(str, batches))} images)"
            if native != size:
                line += (f", so about {extrapolated_per_image_mb(slope, size, native) / 1024:.1f} GB per image at "
                         f"{native} px (x{(native / size) ** 2:.0f} latent tokens; an extrapolation, not measured)")
            parts.append(line)
    return ("Peak memory growth with the batch: " + "; ".join(parts) + ". Shared attention runs through "
            "scaled_dot_product_attention (no score matrix), so per-image memory is linear in the tokens.\n")


def _ratios(results: list[dict[str, Any]], key: str, per_image: bool = False) -> dict[int, float]:
    """The plain row's ``key`` (``per_image``: divided by its images) per measuring process (the
    ratios' denominators)."""
    return {r.get("process", 0): r[key] / (r["batch"] if per_image else 1) for r in results
            if r["row"].startswith("plain") and not r["error"] and r[key] > 0}


def markdown(label: str, size: int, native: int, dtype: str, steps: int, results: list[dict[str, Any]],
             build: dict[str, Any], device: str = "cpu", device_name: str = "", ratios: bool = True) -> str:
    """The architecture's table. CPU: CPU seconds of the calling thread, their ratio to the plain row
    of the same process, peak extra resident memory. CUDA: seconds per image (wall), its ratio to
    plain's seconds per image, peak and peak extra allocated memory. Failing rows show their error.
    ``ratios=False`` leaves the ratio column out (a plain row that is no fair denominator)."""
    cuda = device.startswith("cuda")
    where = f"{device_name or device}" if cuda else "CPU"
    head = (f"**{label}** (random weights, published config; {build['params']}), {size} px (native {native}), "
            f"{dtype}, {steps} steps, guidance 5, on {where}; built in {build['build_s']:.0f} s, pipeline "
            + (f"allocated {build['gpu_mb']:.0f} MB" if cuda else f"resident {build['rss_mb']:.0f} MB") + ".\n\n")
    columns = (["row", "images", "runs", "s / image"] + (["x plain (per image)"] if ratios else [])
               + ["peak VRAM (MB)", "peak extra VRAM (MB)", "note"]) if cuda else \
        (["row", "images", "runs", "CPU s"] + (["x plain"] if ratios else []) + ["peak extra RSS (MB)", "note"])
    head += _row(columns) + "\n" + _row(["---" if c in ("row", "runs", "note") else "---:" for c in columns]) + "\n"
    plain = _ratios(results, "wall_s" if cuda else "cpu_s", per_image=cuda)
    lines = []
    for r in results:
        process = r.get("process", 0)
        name = r["row"] + (SECOND_PROCESS if process and r["row"] == "plain" else "")
        runs = "yes" if not r["error"] else f"**no**: {r['error']}"
        reference = plain.get(process, plain.get(0))
        value = (r["wall_s"] / r["batch"]) if cuda else r["cpu_s"]
        ratio = [f"{value / reference:.2f}" if reference and not r["error"] else ""] if ratios else []
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else ""
        if cuda:
            total = f"{r['peak_total_mb']:.0f}" if r.get("peak_total_mb") is not None else ""
            lines.append(_row([name, str(r["batch"]), runs, f"{value:.2f}", *ratio, total, peak, r["note"]]))
        else:
            lines.append(_row([name, str(r["batch"]), runs, f"{value:.1f}", *ratio, peak, r["note"]]))
    summary = growth_summary(results, size, native)
    return head + "\n".join(lines) + "\n" + (f"\n{summary}" if summary else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
