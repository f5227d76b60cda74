"""Diagnose consistent subject (ConsiStory) on the embedded model, and measure what it claims.

For holdout subjects of the tuning suite (never the quick/standard suites' own tasks), each as a
series of 4 style prompts x 2 seeds generated in one batch of 8 (the bench's prompt-major order,
so the anchors are the series' first two images), it reports:

- masks: coverage of each anchor's subject mask (share of the grid) and its IoU with the anchor's
  decoded foreground (the final image's foreground silhouette, area-pooled to the mask grid) at
  steps 5, 10 and 19 of 20;
- attention: for the non-anchor rows of the conditional half, the share of softmax weight that
  lands on anchor keys, per shared layer and step (mean over heads and queries);
- effect, per variant: within-series subject agreement (mean pairwise cosine of the validated
  object extractor ``emoji-object`` on foreground crops, the bench's ``within_series`` column: per
  image its jackknife pseudo-value) minus plain's on the same prompts and seeds, paired per image,
  with the bench's 95% two-stage bootstrap interval (subjects, then images); layout diversity
  (1 - SSIM, the bench's) as a ratio to plain's; mean absolute pixel difference to plain (of 255);
- real-image anchor: identity to the reference image (same extractor, foreground crops) of the
  image alone as anchor vs the image plus the series' first two images as anchors, vs plain.

Images come from the bench's own path (``series.generate_series``: one batch of 8, the model's
guidance rescale, pinned CPU kernels), so a variant's numbers here are the bench cell's numbers on
the same prompts and seeds. ``--suite quick`` measures the suite's own consistent-subject tasks
instead (their subject word, prompts and seeds): a held-out check of a choice, never a place to choose.

Run (1 thread; ~10 minutes on a shared 2-core CPU):
    OMP_NUM_THREADS=1 python scripts/diagnose_consistent_subject.py --out runs/diagnose-subject
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from consistent_diffusion.bench.stats import bootstrap_interval
from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.outputs import write_json_atomic
from consistent_diffusion.methods.base import get_method
from consistent_diffusion.methods.consistent_subject import attention as sharing
from consistent_diffusion.metrics.axes import jackknife_pseudo_values
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.metrics.consistency import diversity, object_consistency
from consistent_diffusion.series import SeriesConfig, generate_series

# Holdout subjects of the tuning suite (its object task and its style references' subjects).
SUBJECTS = {"test tube": "test_tube_twitter.png", "onion": "onion_twitter.png", "tent": "tent_twitter.png",
            "sunglasses": "sunglasses_twitter.png"}
STYLES = ("twitter", "google", "openmoji", "fluent-3d")
SEEDS = (0, 1)
STEPS, GUIDANCE, BATCH = 20, 5.0, 8  # the quick suite's steps and guidance, the bench's batch
MASK_STEPS = (5, 10, 19)
ALL_PARTS = ["down", "mid", "up"]
EXTRACTOR = "emoji-object"

CHOSEN = {"mask_dropout": 0.0, "feature_injection": True}  # the suites' options (16x16 maps: the method's rule)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "chosen: dropout 0, injection": CHOSEN,
    "method defaults (dropout 0.5, no injection)": {},
    "paper defaults (dropout 0.5, injection)": {"feature_injection": True},
    "dropout 0, no injection": {"mask_dropout": 0.0},
    "chosen at 8x8 masks": {**CHOSEN, "mask_level": 1},
    "chosen, all parts": {**CHOSEN, "share_parts": ALL_PARTS},
    "upper bound: story, every token, all parts": {"mode": "story", "sample_rate": 1.0, "share_parts": ALL_PARTS},
}


@contextlib.contextmanager
def probes(log: dict[str, Any]) -> Iterator[None]:
    """Record the masks at ``MASK_STEPS`` and the anchor-key softmax share of every shared layer call
    (patching the module's own functions for the duration; restored on exit)."""
    update, extended, shared = sharing._update_masks, sharing.extended_attention, sharing.SubjectAttentionProcessor._shared
    current: dict[str, Any] = {}

    def recording_update(state: Any) -> None:
        update(state)
        if state.step in MASK_STEPS:
            log.setdefault("masks", {})[state.step] = {grid: m.clone() for grid, m in state.masks.items()}

    def recording_shared(self: Any, attn: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        current.update(name=self.name, state=self.state)
        return shared(self, attn, hidden_states)

    def recording_extended(q, k, v, blocks, heads, scale=None, own_bias=None):
        state = current.get("state")
        if blocks and state is not None:
            log.setdefault("share", []).append((current["name"], state.step, anchor_share(q, k, blocks, heads, scale, state)))
        return extended(q, k, v, blocks, heads, scale=scale, own_bias=own_bias)

    sharing._update_masks, sharing.extended_attention = recording_update, recording_extended
    sharing.SubjectAttentionProcessor._shared = recording_shared
    try:
        yield
    finally:
        sharing._update_masks, sharing.extended_attention = update, extended
        sharing.SubjectAttentionProcessor._shared = shared


def anchor_share(q: torch.Tensor, k: torch.Tensor, blocks: list, heads: int, scale: float | None, state: Any) -> float:
    """Mean softmax weight on the anchor keys of the conditional half's non-anchor rows.
    q, k: (groups, rows, tokens, C); blocks: [(keys, values, bias (1, rows, 1, T))]."""
    rows = q.shape[1]
    offset = rows - state.n
    others = [offset + r for r in range(state.n) if r not in state.anchors]
    if not others:
        return float("nan")
    block_k, _, bias = blocks[0]
    qh = q[-1, others].unflatten(-1, (heads, -1)).transpose(1, 2)  # (r, h, t, d)
    own = k[-1, others].unflatten(-1, (heads, -1)).transpose(1, 2)
    extra = block_k[-1, others].unflatten(-1, (heads, -1)).transpose(1, 2)
    d = qh.shape[-1]
    scale = scale if scale is not None else d ** -0.5
    logits_own = qh @ own.transpose(-1, -2) * scale
    logits_extra = qh @ extra.transpose(-1, -2) * scale + bias[0, others].unsqueeze(1)  # (r, 1, 1, T) bias
    probs = torch.cat([logits_own, logits_extra], dim=-1).float().softmax(dim=-1)
    return float(probs[..., own.shape[2]:].sum(dim=-1).mean())


def generate(pipe: Any, subject: str, options: dict[str, Any] | None, log: dict[str, Any] | None = None,
             prompts: list[str] | None = None, seeds: list[int] | None = None) -> list[Any]:
    """The series ``prompts`` x ``seeds`` (prompt-major, one batch of 8) through the bench's own path
    (``series.generate_series``: the model's guidance rescale, 0.7 on the zero-SNR embedded model, and
    its native size), with consistent subject at ``options`` (None: plain)."""
    config = SeriesConfig(prompts=prompts or [f"{subject}, {style} style" for style in STYLES],
                          seeds=seeds or list(SEEDS), steps=STEPS, guidance_scale=GUIDANCE, batch_size=BATCH)
    methods = [] if options is None else [get_method("consistent_subject", subject=subject, **options)]
    with probes(log) if log is not None else contextlib.nullcontext():
        return generate_series(pipe, config, methods, progress=False).images


def within_series(images: list[Any]) -> np.ndarray:
    """Per image: its jackknife pseudo-value of the series' mean pairwise cosine (the bench's
    ``within_series`` column, ``metrics.axes``): their mean is the statistic and their spread its
    own standard error (each image's mean cosine to the others gives about half of it)."""
    result = object_consistency(images, None, EXTRACTOR, foreground=True, diversity_with=None)
    return np.asarray(jackknife_pseudo_values(result.per_image), dtype=float)


def to_reference(images: list[Any], reference: Any) -> np.ndarray:
    result = object_consistency(images, [reference], EXTRACTOR, foreground=True, diversity_with=None)
    return np.asarray(result.per_image, dtype=float)


def effect_interval(deltas: list[np.ndarray]) -> tuple[float, float, float]:
    """Mean and 95% interval of paired per-image differences, one array per subject: the bench's
    two-stage bootstrap (``bench.stats``: subjects, then images within them), so one subject that
    gains a lot cannot make the pooled images look like a general gain."""
    interval = bootstrap_interval([np.asarray(d, dtype=float) for d in deltas])
    return interval.mean, interval.low, interval.high


def mask_report(log: dict[str, Any], images: list[Any], anchors: list[int]) -> dict[str, Any]:
    """Coverage and IoU with the decoded foreground, per step and grid, mean over anchors."""
    foreground = pixel.foreground_mask(as_batch(images)).float()  # (N, 1, H, W)
    out: dict[str, Any] = {}
    for step, grids in sorted(log.get("masks", {}).items()):
        for grid, masks in grids.items():
            pooled = F.adaptive_avg_pool2d(foreground, grid).flatten(1) > 0.5  # (N, h*w)
            cover, iou, fg, inside = [], [], [], []
            for a in anchors:
                m, f = masks[a].bool(), pooled[a]
                cover.append(float(m.float().mean()))
                fg.append(float(f.float().mean()))
                iou.append(_iou(m, f))
                inside.append(float((m & f).sum() / max(1, int(f.sum()))))
            out[f"step {step}, {grid[0]}x{grid[1]}"] = {"coverage": np.mean(cover), "foreground": np.mean(fg),
                                                       "iou": np.mean(iou), "foreground_in_mask": np.mean(inside)}
    return out


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / max(1, int((a | b).sum())))


def share_report(log: dict[str, Any]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, list[float]]] = {}
    for name, step, value in log.get("share", []):
        layer = name.replace(".transformer_blocks.0.attn1.processor", "")
        table.setdefault(layer, {}).setdefault(str(step), []).append(value)
    return {layer: {step: float(np.mean(v)) for step, v in steps.items()} for layer, steps in table.items()}


def suite_series(name: str) -> dict[str, tuple[str, list[str], list[int]]]:
    """label -> (subject, prompts, seeds) of the suite's tasks that run consistent subject."""
    from consistent_diffusion.bench.suite import load_suite

    return {task.name: (task.subject, list(task.prompts), list(task.seeds)) for task in load_suite(name).tasks
            if "consistent_subject" in task.methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--subjects", nargs="*", default=list(SUBJECTS))
    parser.add_argument("--suite", default=None, help="measure this suite's consistent-subject tasks instead")
    parser.add_argument("--variants", nargs="*", default=None, help="names of VARIANTS (default: all)")
    parser.add_argument("--extra", action="append", default=[], help="NAME=JSON options of another variant")
    parser.add_argument("--real", default=None, help="JSON options of the real-anchor comparison (default: skip)")
    args = parser.parse_args()
    if args.suite and args.real is not None:
        raise SystemExit("error: --real measures the tuning subjects' references; leave out --suite")
    from consistent_diffusion.core.cpu_kernels import pin_cpu_kernels

    pin_cpu_kernels()  # the bench's kernels: the same images as its cells
    torch.set_num_threads(1)
    from consistent_diffusion.models.loading import load_pipeline

    pipe = load_pipeline(args.model)
    variants = {k: v for k, v in VARIANTS.items() if args.variants is None or k in args.variants or k == "plain"}
    for extra in args.extra:
        name, options = extra.split("=", 1)
        variants[name] = json.loads(options)
    series = suite_series(args.suite) if args.suite else {s: (s, None, None) for s in args.subjects}
    report: dict[str, Any] = {"model": args.model, "subjects": list(series), "suite": args.suite, "steps": STEPS,
                              "guidance": GUIDANCE, "seeds": list(SEEDS), "styles": list(STYLES),
                              "extractor": EXTRACTOR, "variants": {}}
    plain: dict[str, list[Any]] = {}
    for name, options in variants.items():
        deltas, agreement, diversities, pixel_diff, per_subject = [], [], [], [], {}
        for subject, (word, prompts, seeds) in series.items():
            log: dict[str, Any] = {}
            images = generate(pipe, word, options, log, prompts, seeds)
            if options is None:
                plain[subject] = images
            within = within_series(images)
            base = within_series(plain[subject])
            deltas.append(within - base)
            agreement.append(within.mean())
            diversities.append(diversity(images).aggregate / diversity(plain[subject]).aggregate)
            pixel_diff.append(float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                                             for a, b in zip(images, plain[subject], strict=True)])))
            per_subject[subject] = {"agreement": float(within.mean()), "plain": float(base.mean()),
                                    "per_image": [float(x) for x in within],
                                    "diversity_ratio": diversities[-1], "pixel_diff": pixel_diff[-1]}
            if options is not None and options.get("mode", "subject") == "subject":
                per_subject[subject]["masks"] = mask_report(log, images, [0, 1])
            if log.get("share"):
                per_subject[subject]["anchor_share"] = share_report(log)
        mean, low, high = effect_interval(deltas)
        report["variants"][name] = {"options": options, "delta": mean, "interval": [low, high],
                                    "agreement": float(np.mean(agreement)), "diversity_ratio": float(np.mean(diversities)),
                                    "pixel_diff": float(np.mean(pixel_diff)), "subjects": per_subject}
        print(f"{name:55s} agreement {np.mean(agreement):.3f}  delta {mean:+.3f} [{low:+.3f}, {high:+.3f}]  "
              f"diversity x{np.mean(diversities):.2f}  |diff| {np.mean(pixel_diff):.1f}", flush=True)
    if args.real is not None:
        report["real_anchor"] = real_anchor(pipe, args.subjects, json.loads(args.real), plain)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json.loads(json.dumps(report, default=str)), out / "diagnosis.json")
    print(f"wrote {out / 'diagnosis.json'}")


def real_anchor(pipe: Any, subjects: list[str], options: dict[str, Any], plain: dict[str, list[Any]]) -> dict[str, Any]:
    """Identity to the reference image: the image alone as anchor vs the image plus two generated anchors."""
    from consistent_diffusion.core.images import load_image

    results: dict[str, Any] = {}
    deltas: dict[str, list[np.ndarray]] = {"image alone": [], "image + 2 generated": []}
    for subject in subjects:
        path = str(_asset(SUBJECTS[subject]))
        reference = load_image(path)
        base = to_reference(plain[subject], reference)
        results[subject] = {"plain": float(base.mean())}
        for label, anchors in (("image alone", 0), ("image + 2 generated", 2)):
            images = generate(pipe, subject, {**options, "reference_image": path, "anchors": anchors,
                                              "reference_image_prompt": f"{subject}, twitter style"})
            values = to_reference(images, reference)
            deltas[label].append(values - base)
            results[subject][label] = float(values.mean())
    for label, parts in deltas.items():
        mean, low, high = effect_interval(parts)
        results[label] = {"delta": mean, "interval": [low, high]}
        print(f"real anchor, {label:22s} identity - plain {mean:+.3f} [{low:+.3f}, {high:+.3f}]", flush=True)
    return results


def _asset(name: str) -> Path:
    from consistent_diffusion import bench

    return Path(bench.__file__).parent / "assets" / name


if __name__ == "__main__":
    main()
