"""The validation report's output: its Markdown table and the atomic write of validation.json and
validation.md (``consistent-diffusion metrics validate``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def markdown_table(report: dict[str, Any]) -> str:
    """The validation table in Markdown (one row per metric, extractor and protocol)."""
    lines = ["| metric | extractor | protocol | AUC [95% CI] | bar | status | pos. mean | neg. mean |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for r in report["results"]:
        if r["bar"] is None:
            status = "info"
        else:
            status = "**passed**" if r["passed"] else "**FAILED (validated: false)**"
        bar = f"{r['bar']:.2f}" if r["bar"] is not None else "-"
        low, high = r.get("auc_ci95", (r["auc"], r["auc"]))
        negative = f"{r['negative_mean']:.3f}"
        if "chance_level" in r:
            negative += f" (chance, bar <= {r['chance_bar']:.2f})"
        lines.append(f"| {r['metric']} | `{r['extractor']}` | {r['protocol']} | {r['auc']:.3f} [{low:.3f}, "
                     f"{high:.3f}] | {bar} | {status} | {r['positive_mean']:.3f} | {negative} |")
    for r in report["results"]:
        if "retrieval" in r:
            ret = r["retrieval"]
            lines += ["", f"Text retrieval with `{r['extractor']}` (image -> its caption, {r['protocol']}): "
                          f"top-1 {ret['top1']:.3f}, top-5 {ret['top5']:.3f} among {ret['candidates']} captions."]
    return "\n".join(lines) + "\n"


def write_validation(report: dict[str, Any], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write validation.json and validation.md into ``out`` (atomically)."""
    from consistent_diffusion.core.outputs import (
        atomic_output_dir,
        library_versions,
        utc_now,
        write_json_atomic,
    )

    report = {**report, "meta": {**report["meta"], "created": utc_now(), "versions": library_versions()}}
    with atomic_output_dir(out, overwrite=overwrite) as temp:
        write_json_atomic(report, temp / "validation.json")
        (temp / "validation.md").write_text(markdown_table(report))
    return Path(out)
