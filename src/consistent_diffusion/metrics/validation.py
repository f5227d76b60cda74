"""Validation of every metric on held-out real emoji (``consistent-diffusion metrics validate``).

On the val + holdout identities of the emoji dataset (never used to train the metric heads, the
probes or the embedded model) we know which images share a house style and which share an identity,
so each metric must separate same from different. We report ROC AUC (P(score of a positive >
score of a negative)) per metric and extractor against the bars of issue #4:

- style (primary): sets of 4 different emoji in one house style vs mixed sets (2 + 2 styles);
  score = mean pairwise style similarity (``style_consistency``). Bar 0.95.
  style-to-reference (secondary): image vs a reference of another emoji, same vs other style.
- object: the same emoji drawn in the other style vs a different emoji in the other style;
  score = foreground-cropped cosine similarity (``object_consistency``). Bar 0.90.
- text: an image vs its own caption, vs the caption of another held-out emoji in the same style
  (``text_alignment``). Bar 0.90. text-style (secondary): own caption vs the same name in the other style.
- shape (primary): an image vs an appearance-changed copy of itself (colours permuted, noise, blur,
  1 px shift: same shape, new rendering, as a ControlNet output) vs such a copy of another emoji of
  the same style (``shape_consistency``). Bar 0.95. shape-cross-style (secondary): the same emoji
  drawn by the other vendor vs another emoji.
- fidelity, concept: no bar; reported for information.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics.common import cosine_matrix, roc_auc
from consistent_diffusion.metrics.consistency import foreground_crop, shape_consistency
from consistent_diffusion.metrics.extractors import available_features, load_features

BARS = {"style": 0.95, "object": 0.90, "text": 0.90, "shape": 0.95}
STYLE_EXTRACTORS = ("emoji-style", "style-stats", "palette", "efficientnet-lite0-stats", "efficientnet-lite0")
OBJECT_EXTRACTORS = ("efficientnet-lite0", "palette", "edges", "silhouette", "emoji-style")
TEXT_EXTRACTORS = ("emoji-text",)


@dataclass
class ValidationConfig:
    """What to validate on."""

    data: Path  # emoji dataset folder (consistent-diffusion data emoji --out DIR)
    splits: tuple[str, ...] = ("val", "holdout")  # identities never trained on
    sets: int = 500  # positive and negative sets for the style protocol
    negatives_per_positive: int = 5  # object / text / shape pairs
    set_size: int = 4
    seed: int = 0
    device: str = "cpu"
    include_probes: bool = True  # validate the probe-* extractors too
    concept: bool = True  # run the (unbarred) concept protocol; costs extra feature passes

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.splits = tuple(self.splits)
        if self.set_size < 2 or self.set_size % 2:
            raise ConfigError("set_size must be an even number >= 2 (mixed sets split it between two styles)")
        if self.sets < 10 or self.negatives_per_positive < 1:
            raise ConfigError("sets must be >= 10 and negatives_per_positive >= 1")


def perturb_appearance(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Same shape, new rendering: permute colour channels of the foreground, add noise, blur, shift 1 px."""
    out = []
    for image in batch:
        mask = pixel.foreground_mask(image[None])[0]
        permuted = image[torch.randperm(3, generator=generator)]
        if torch.equal(permuted, image):
            permuted = -image  # greyscale-ish: invert the fill instead
        image = torch.where(mask, permuted, image)
        image = pixel.gaussian_blur(image[None], 0.6)[0]
        image = image + 0.04 * torch.randn(image.shape, generator=generator)
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
        image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        out.append(image.clamp(-1, 1))
    return torch.stack(out)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Context-like variation for the concept protocol: flip, scale 0.7-1, shift, on white."""
    out = []
    size = batch.shape[-1]
    for image in batch:
        if torch.rand(1, generator=generator) < 0.5:
            image = image.flip(-1)
        scale = float(0.7 + 0.3 * torch.rand(1, generator=generator))
        side = max(8, int(size * scale))
        small = torch.nn.functional.interpolate(image[None], size=(side, side), mode="bilinear",
                                                align_corners=False, antialias=True)[0]
        canvas = torch.ones(3, size, size)
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        canvas[:, y: y + side, x: x + side] = small
        out.append(canvas)
    return torch.stack(out)


def _row(metric: str, extractor: str, protocol: str, positive, negative, primary: bool = True,
         **extra: Any) -> dict[str, Any]:
    auc = roc_auc(positive, negative)
    bar = BARS.get(metric) if primary else None
    return {
        "metric": metric, "extractor": extractor, "protocol": protocol, "auc": round(auc, 4), "bar": bar,
        "passed": (auc >= bar) if bar is not None else None, "primary": primary,
        "positives": int(np.size(positive)), "negatives": int(np.size(negative)),
        "positive_mean": round(float(np.mean(positive)), 4), "negative_mean": round(float(np.mean(negative)), 4),
        **extra,
    }


def validate_metrics(config: ValidationConfig, log=print) -> dict[str, Any]:
    """Run every protocol; return {"results": [rows], "meta": {...}}."""
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(config.data)
    styles = dataset.styles
    if len(styles) < 2:
        raise ConfigError(f"validation needs at least two house styles; {config.data} has {styles}")
    rows = np.concatenate([dataset.indices(split=s) for s in config.splits])
    records = [dataset.records[i] for i in rows]
    images = torch.from_numpy(np.asarray(dataset.images[rows])).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    style_of = np.array([styles.index(r["style"]) for r in records])
    identity_of = np.array([r["identity"] for r in records])
    by_key = {(r["identity"], r["style"]): i for i, r in enumerate(records)}
    identities = sorted({r["identity"] for r in records if all((r["identity"], s) in by_key for s in styles)})
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    log(f"validating on {len(records)} images, {len(identities)} identities ({'+'.join(config.splits)}), "
        f"styles {styles}")

    cache: dict[str, torch.Tensor] = {}

    def embed(name: str, key: str = "plain") -> torch.Tensor | None:
        if (name, key) not in cache:
            try:
                extractor = load_features(name, device=config.device)
            except Exception as error:  # noqa: BLE001 - an unavailable extractor is reported, not fatal
                log(f"skipping {name}: {error}")
                cache[(name, key)] = None
                return None
            log(f"embedding {len(records)} images with {name} ({key})")
            batch = foreground_crop(images) if key == "foreground" else images
            cache[(name, key)] = extractor.embed(batch)
        return cache[(name, key)]

    results: list[dict[str, Any]] = []
    extra = [n for n in available_features() if n.startswith("probe-")] if config.include_probes else []

    # --- style: same-style sets vs mixed sets
    by_style = [np.flatnonzero(style_of == s) for s in range(len(styles))]
    half = config.set_size // 2
    positive_sets, negative_sets = [], []
    for _ in range(config.sets):
        s = rng.integers(len(styles))
        positive_sets.append(rng.choice(by_style[s], size=config.set_size, replace=False))
        a, b = rng.choice(len(styles), size=2, replace=False)
        chosen = rng.choice(len(identities), size=config.set_size, replace=False)
        members = [by_key[(identities[c], styles[a if k < half else b])] for k, c in enumerate(chosen)]
        negative_sets.append(np.array(members))
    # style-to-reference pairs: other emoji, same style vs other style
    ref_pos, ref_neg = [], []
    for i in range(len(records)):
        for _ in range(config.negatives_per_positive):
            same = rng.choice(by_style[style_of[i]])
            other = rng.choice(by_style[(style_of[i] + 1 + rng.integers(len(styles) - 1)) % len(styles)])
            if identity_of[same] != identity_of[i]:
                ref_pos.append((i, same))
            if identity_of[other] != identity_of[i]:
                ref_neg.append((i, other))
    for name in (*STYLE_EXTRACTORS, *[n for n in extra if "style" in n]):
        features = embed(name)
        if features is None:
            continue
        sims = cosine_matrix(features).numpy()

        def set_score(members, sims=sims):
            block = sims[np.ix_(members, members)]
            return (block.sum() - np.trace(block)) / (len(members) * (len(members) - 1))

        results.append(_row("style", name, f"sets of {config.set_size}: one house style vs mixed",
                            [set_score(m) for m in positive_sets], [set_score(m) for m in negative_sets]))
        results.append(_row("style", name, "to a reference (other emoji): same vs other style",
                            [sims[i, j] for i, j in ref_pos], [sims[i, j] for i, j in ref_neg], primary=False))

    # --- object: same emoji in the other style vs a different emoji in the other style
    obj_pos, obj_neg = [], []
    for ident in identities:
        for s in range(len(styles)):
            i = by_key[(ident, styles[s])]
            other_style = styles[(s + 1) % len(styles)]
            obj_pos.append((i, by_key[(ident, other_style)]))
            chosen = [c for c in rng.choice(len(identities), size=config.negatives_per_positive + 1, replace=False)
                      if identities[c] != ident][: config.negatives_per_positive]
            obj_neg.extend((i, by_key[(identities[c], other_style)]) for c in chosen)
    for name in (*OBJECT_EXTRACTORS, *[n for n in extra if "style" not in n]):
        features = embed(name, "foreground")
        if features is None:
            continue
        sims = cosine_matrix(features).numpy()
        results.append(_row("object", name, "same emoji in the other style vs another emoji (foreground)",
                            [sims[i, j] for i, j in obj_pos], [sims[i, j] for i, j in obj_neg]))

    # --- text: own caption vs another held-out emoji's caption (same style)
    for name in TEXT_EXTRACTORS:
        features = embed(name)
        if features is None:
            continue
        extractor = load_features(name, device=config.device)
        captions = [r["caption"] for r in records]
        text = extractor.embed_text(captions)
        sims = cosine_matrix(features, text).numpy()  # image i vs caption of row j
        pos = [sims[i, i] for i in range(len(records))]
        neg, style_neg = [], []
        for i in range(len(records)):
            pool = [j for j in by_style[style_of[i]] if identity_of[j] != identity_of[i]]
            neg.extend(sims[i, j] for j in rng.choice(pool, size=config.negatives_per_positive, replace=False))
            for s in styles:
                if s != records[i]["style"]:
                    style_neg.append(sims[i, by_key[(identity_of[i], s)]])
        distinct = sorted(set(captions))
        caption_index = np.array([distinct.index(c) for c in captions])
        text_distinct = extractor.embed_text(distinct)
        full = cosine_matrix(features, text_distinct).numpy()
        ranks = (full > full[np.arange(len(records)), caption_index][:, None]).sum(1)
        holdout = np.array([r["split"] == "holdout" for r in records])
        retrieval = {"top1": float((ranks < 1).mean()), "top5": float((ranks < 5).mean()), "candidates": len(distinct)}
        hold_captions = sorted({c for c, h in zip(captions, holdout, strict=True) if h})
        if hold_captions:
            hold = cosine_matrix(features[holdout], extractor.embed_text(hold_captions)).numpy()
            truth = np.array([hold_captions.index(c) for c, h in zip(captions, holdout, strict=True) if h])
            hold_ranks = (hold > hold[np.arange(len(truth)), truth][:, None]).sum(1)
            retrieval["holdout_top1"] = float((hold_ranks < 1).mean())
            retrieval["holdout_top5"] = float((hold_ranks < 5).mean())
            retrieval["holdout_candidates"] = len(hold_captions)
        results.append(_row("text", name, "own caption vs another held-out emoji's caption (same style)",
                            pos, neg, retrieval=retrieval))
        results.append(_row("text", name, "own caption vs the same name in the other style", pos, style_neg,
                            primary=False))

    # --- shape: appearance-changed copy of the same image vs of another emoji (same style)
    log("shape protocol")
    shape_pos_idx = np.arange(len(records))
    shape_neg_idx = []
    for i in range(len(records)):
        pool = [j for j in by_style[style_of[i]] if identity_of[j] != identity_of[i]]
        shape_neg_idx.append(rng.choice(pool, size=config.negatives_per_positive, replace=False))
    shape_neg_idx = np.concatenate(shape_neg_idx)
    controls_pos = images[shape_pos_idx]
    controls_neg = images[np.repeat(np.arange(len(records)), config.negatives_per_positive)]
    outputs_pos = perturb_appearance(images[shape_pos_idx], generator)
    outputs_neg = perturb_appearance(images[shape_neg_idx], generator)
    cross_pos = [(i, by_key[(identity_of[i], s)]) for i in range(len(records)) for s in styles
                 if s != records[i]["style"] and (identity_of[i], s) in by_key]
    cross_neg = [(i, by_key[(identities[c], s)]) for i, _ in cross_pos for s in styles if s != records[i]["style"]
                 for c in rng.choice(len(identities), size=config.negatives_per_positive, replace=False)
                 if identities[c] != identity_of[i]]
    for mode in ("edges", "silhouette"):
        pos = shape_consistency(outputs_pos, controls_pos, mode=mode, diversity_with=None).per_image
        neg = shape_consistency(outputs_neg, controls_neg, mode=mode, diversity_with=None).per_image
        results.append(_row("shape", mode, "appearance-changed copy of the same image vs of another emoji",
                            pos, neg))
        cp = shape_consistency(images[[j for _, j in cross_pos]], images[[i for i, _ in cross_pos]], mode=mode,
                               diversity_with=None).per_image
        cn = shape_consistency(images[[j for _, j in cross_neg]], images[[i for i, _ in cross_neg]], mode=mode,
                               diversity_with=None).per_image
        results.append(_row("shape", mode, "same emoji drawn by the other vendor vs another emoji", cp, cn,
                            primary=False))

    # --- fidelity (no bar): lightly perturbed copy vs another emoji
    light = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    others = images[[int(rng.choice([j for j in by_style[style_of[i]] if identity_of[j] != identity_of[i]]))
                     for i in range(len(records))]]
    for name, fn in (("psnr", pixel.psnr), ("ssim", pixel.ssim)):
        results.append(_row("fidelity", name, "noisy copy (sigma 0.03) vs another emoji",
                            fn(light, images).numpy(), fn(others, images).numpy(), primary=False))

    # --- concept (no bar): exemplar in one style, a varied series of 3 in the other
    if config.concept:
        concept_rows = _concept_protocol(images, identities, styles, by_key, rng, generator, config, log)
        results.extend(concept_rows)

    meta = {
        "data": {"images": len(records), "identities": len(identities), "splits": list(config.splits),
                 "styles": styles, "dataset_format": dataset.meta.get("format")},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items() if k != "data"},
        "bars": BARS,
    }
    return {"format": "consistent-diffusion/metrics-validation/v1", "meta": meta, "results": results}


def _concept_protocol(images, identities, styles, by_key, rng, generator, config, log) -> list[dict[str, Any]]:
    """Concept = one held-out emoji given by an exemplar in style A; series = 3 varied renderings
    (flip, scale, shift) of it in style B. Negatives: a consistent series of another emoji (wrong
    concept), and a drifting series of 3 different emoji. Score: concept_consistency's C."""
    name = "efficientnet-lite0"
    try:
        extractor = load_features(name, device=config.device)
    except Exception as error:  # noqa: BLE001
        log(f"skipping concept protocol: {error}")
        return []
    log("concept protocol")
    series_rows = [by_key[(ident, styles[1])] for ident in identities]
    exemplar_rows = [by_key[(ident, styles[0])] for ident in identities]
    series = torch.stack([_augment(images[[r] * 3], generator) for r in series_rows])  # (I, 3, 3, H, W)
    flat = series.flatten(0, 1)
    series_emb = extractor.embed(foreground_crop(flat)).view(len(identities), 3, -1)
    exemplar_emb = extractor.embed(foreground_crop(images[exemplar_rows]))

    def score(members: torch.Tensor, exemplar: torch.Tensor) -> float:
        sims = cosine_matrix(members)
        series_agreement = (sims.sum(1) - sims.diagonal()) / (members.shape[0] - 1)
        definition = cosine_matrix(members, exemplar[None])[:, 0]
        return float((definition.clamp_min(0) * series_agreement.clamp_min(0)).sqrt().mean())

    pos, wrong, drift = [], [], []
    n = len(identities)
    for i in range(n):
        pos.append(score(series_emb[i], exemplar_emb[i]))
        j = int((i + 1 + rng.integers(n - 1)) % n)
        wrong.append(score(series_emb[j], exemplar_emb[i]))
        others = rng.choice([k for k in range(n) if k != i], size=2, replace=False)
        drift.append(score(torch.stack([series_emb[i, 0], series_emb[others[0], 1], series_emb[others[1], 2]]),
                           exemplar_emb[i]))
    return [
        _row("concept", name, "exemplar in one style, varied series of it in the other vs another emoji's series",
             pos, wrong, primary=False),
        _row("concept", name, "same vs a drifting series (1 right + 2 other emoji)", pos, drift, primary=False),
    ]


def markdown_table(report: dict[str, Any]) -> str:
    """The validation table in Markdown (one row per metric, extractor and protocol)."""
    lines = ["| metric | extractor | protocol | AUC | bar | status | pos. mean | neg. mean |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for r in report["results"]:
        if r["bar"] is None:
            status = "info"
        else:
            status = "**passed**" if r["passed"] else "**FAILED (validated: false)**"
        bar = f"{r['bar']:.2f}" if r["bar"] is not None else "-"
        lines.append(f"| {r['metric']} | `{r['extractor']}` | {r['protocol']} | {r['auc']:.3f} | {bar} | {status} "
                     f"| {r['positive_mean']:.3f} | {r['negative_mean']:.3f} |")
    for r in report["results"]:
        if "retrieval" in r:
            ret = r["retrieval"]
            lines.append("")
            lines.append(f"Text retrieval with `{r['extractor']}` (image -> its caption): top-1 {ret['top1']:.3f}, "
                         f"top-5 {ret['top5']:.3f} among {ret['candidates']} held-out captions"
                         + (f"; holdout only: top-1 {ret['holdout_top1']:.3f}, top-5 {ret['holdout_top5']:.3f} "
                            f"among {ret['holdout_candidates']}" if "holdout_top1" in ret else "") + ".")
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
