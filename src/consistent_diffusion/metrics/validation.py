"""Validation of every metric on held-out real emoji (``consistent-diffusion metrics validate``).

On the val + holdout identities of the emoji dataset (never used to train the metric heads, the
probes or the embedded model) we know which images share a house style and which share an identity,
so each metric must separate same from different. Styles are of two kinds: the *trained* styles
(the heads learned them, on other identities) and the *unseen* styles (``style_split == "heldout"``:
never used to train anything). Each protocol gives positives and negatives; we report ROC AUC
(P(score of a positive > score of a negative), ties half) with a Hanley-McNeil 95% interval, against
the bars of the issue "Metrics that hold on styles they never saw" (``BARS``):

- style, sets: sets of 4 different emoji in one style vs mixed sets (2 + 2 styles), scored by the
  mean pairwise style similarity (``style_consistency``); trained styles (bar 0.97) and unseen
  styles, every set drawn from the unseen styles (bar 0.95).
- style, to a reference: a set of 4 in one style vs one reference image of another emoji, in the
  same style vs in another style, scored by the mean similarity to the reference; trained and
  unseen styles separately (bar 0.95 each).
- object: an image vs the same emoji drawn in another style vs another emoji in that style,
  foreground-cropped cosine (``object_consistency``), all seven styles (bar 0.92).
- text: an image vs its own caption vs another held-out emoji's caption in the same style
  (``text_alignment``), trained styles (bar 0.92); unseen styles and captions without a style word
  reported for information.
- shape: an appearance-changed copy of an image (colours permuted, blur, noise, 1 px shift: what a
  ControlNet output with a new style looks like) vs its own control vs another emoji's control
  (``shape_consistency``); the score's chance level, its mean on those unrelated pairs, must stay
  <= ``SHAPE_CHANCE_BAR`` (bar 0.95 on the AUC).
- concept: the concept given by exemplars (the identity in two styles), a series of it in three
  other styles (one concept, varied rendering) vs three kinds of negatives: a drifting series (mixed
  identities), a related wrong concept (another identity of the same subcategory, same styles), and
  a series that matches the definition only in style (other identities in the exemplars' style),
  scored by ``concept_consistency``'s C (bar 0.90 on each kind).

The protocol builders live in ``metrics.validation_protocols``, the Markdown table and the atomic
write in ``metrics.validation_report``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics.common import cosine_matrix, roc_auc
from consistent_diffusion.metrics.concept import concept_scores
from consistent_diffusion.metrics.consistency import (
    control_maps,
    foreground_crop,
    shape_scores,
)
from consistent_diffusion.metrics.extractors import available_features, load_features
from consistent_diffusion.metrics.validation_protocols import (
    HeldOut,
    concept_series,
    object_pairs,
    shape_pairs,
    style_reference_sets,
    style_sets,
    text_pairs,
)

FORMAT = "consistent-diffusion/metrics-validation/v2"
BARS = {
    "style-sets-trained": 0.97,
    "style-sets-unseen": 0.95,
    "style-reference-trained": 0.95,
    "style-reference-unseen": 0.95,
    "object": 0.92,
    "text": 0.92,
    "shape": 0.95,
    "concept-drift": 0.90,
    "concept-related": 0.90,
    "concept-style-only": 0.90,
}
SHAPE_CHANCE_BAR = 0.35  # the shape score's mean on unrelated pairs must stay under this
STYLE_EXTRACTORS = ("emoji-style", "style-stats", "palette", "efficientnet-lite0-stats", "efficientnet-lite0")
OBJECT_EXTRACTORS = ("emoji-object", "efficientnet-lite0", "palette", "edges", "silhouette", "emoji-style")
TEXT_EXTRACTORS = ("emoji-text",)
CONCEPT_EXTRACTORS = ("emoji-object", "efficientnet-lite0")
HEAD_EXTRACTORS = ("emoji-style", "emoji-object", "emoji-text", "style-stats")  # read a heads file


@dataclass
class ValidationConfig:
    """What to validate on."""

    data: Path  # emoji dataset folder (consistent-diffusion data emoji --out DIR)
    splits: tuple[str, ...] = ("val", "holdout")  # identities never trained on
    sets: int = 500  # positive and negative sets per style protocol
    negatives_per_positive: int = 5  # object / text / shape pairs
    set_size: int = 4
    seed: int = 0
    device: str = "cpu"
    include_probes: bool = True  # validate the embedded model's probe-* extractors too
    concept: bool = True  # run the concept protocols (extra feature passes)
    heads: Path | None = None  # metric heads file for emoji-*; None: the shipped one
    style_extractors: tuple[str, ...] = STYLE_EXTRACTORS
    object_extractors: tuple[str, ...] = OBJECT_EXTRACTORS
    text_extractors: tuple[str, ...] = TEXT_EXTRACTORS
    concept_extractors: tuple[str, ...] = CONCEPT_EXTRACTORS

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.splits = tuple(self.splits)
        for name in ("style_extractors", "object_extractors", "text_extractors", "concept_extractors"):
            setattr(self, name, tuple(getattr(self, name)))
        self.heads = Path(self.heads) if self.heads is not None else None
        if self.set_size < 2 or self.set_size % 2:
            raise ConfigError("set_size must be an even number >= 2 (mixed sets split it between two styles)")
        if self.sets < 10 or self.negatives_per_positive < 1:
            raise ConfigError("sets must be >= 10 and negatives_per_positive >= 1")
        if not self.splits:
            raise ConfigError("give at least one identity split to validate on")


def load_held_out(config: ValidationConfig) -> HeldOut:
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(config.data)
    rows = np.concatenate([dataset.indices(split=s) for s in config.splits])
    records = [dataset.records[i] for i in rows]
    images = torch.from_numpy(np.asarray(dataset.images[rows])).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    held = HeldOut.from_records(records, images)
    if len(held.trained) < 2:
        raise ConfigError(f"validation needs at least two trained styles; {config.data} has {held.trained}")
    return held




# ----------------------------------------------------------------------------- rows


def auc_interval(auc: float, positives: int, negatives: int, z: float = 1.96) -> tuple[float, float]:
    """Hanley & McNeil (1982) 95% interval of an AUC from its positives and negatives (treats the
    scores as independent; our pairs share images, so read it as a lower bound on the uncertainty)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    se = math.sqrt(max(variance, 0.0) / max(positives * negatives, 1))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def _row(metric: str, extractor: str, protocol_id: str, protocol: str, positive, negative,
         primary: bool = True, **extra: Any) -> dict[str, Any]:
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    auc = roc_auc(positive, negative)
    bar = BARS.get(protocol_id) if primary else None
    low, high = auc_interval(auc, positive.size, negative.size)
    return {
        "metric": metric, "extractor": extractor, "protocol_id": protocol_id, "protocol": protocol,
        "auc": round(auc, 4), "auc_ci95": [round(low, 4), round(high, 4)], "bar": bar,
        "passed": (auc >= bar) if bar is not None else None, "primary": bar is not None,
        "positives": int(positive.size), "negatives": int(negative.size),
        "positive_mean": round(float(positive.mean()), 4), "negative_mean": round(float(negative.mean()), 4),
        **extra,
    }


def _set_similarity(sims: np.ndarray, members: np.ndarray) -> float:
    """Mean pairwise similarity inside a set (what ``style_consistency`` averages)."""
    block = sims[np.ix_(members, members)]
    return float((block.sum() - np.trace(block)) / (len(members) * (len(members) - 1)))


def _to_reference(sims: np.ndarray, members: np.ndarray, reference: int) -> float:
    return float(sims[members, reference].mean())


# ----------------------------------------------------------------------------- the run


class _Embeddings:
    """Each extractor's features of every held-out image, computed once (None: unavailable)."""

    def __init__(self, held: HeldOut, config: ValidationConfig, log: Callable[[str], None]) -> None:
        self.held, self.config, self.log = held, config, log
        self.cache: dict[tuple[str, str], torch.Tensor | None] = {}
        self.extractors: dict[str, Any] = {}

    def extractor(self, name: str):
        if name not in self.extractors:
            options = {"heads": self.config.heads} if name in HEAD_EXTRACTORS and self.config.heads else {}
            try:
                self.extractors[name] = load_features(name, device=self.config.device, **options)
            except Exception as error:  # noqa: BLE001 - an unavailable extractor is reported, not fatal
                self.log(f"skipping {name}: {error}")
                self.extractors[name] = None
        return self.extractors[name]

    def __call__(self, name: str, foreground: bool = False) -> torch.Tensor | None:
        """Features of every held-out image; ``foreground``: of their foreground crops where the
        extractor compares crops (``FeatureExtractor.foreground``), as the object and concept metrics do."""
        extractor = self.extractor(name)
        foreground = foreground and extractor is not None and extractor.foreground
        key = (name, "foreground" if foreground else "plain")
        if key not in self.cache:
            if extractor is None:
                self.cache[key] = None
            else:
                self.log(f"embedding {len(self.held.records)} images with {name} ({key[1]})")
                images = self.held.images
                self.cache[key] = extractor.embed(foreground_crop(images) if foreground else images)
        return self.cache[key]


def validate_metrics(config: ValidationConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every protocol; return {"format", "meta", "results": [rows]}."""
    held = load_held_out(config)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    identities = {r["identity"] for r in held.records}
    log(f"validating on {len(held.records)} images, {len(identities)} identities ({'+'.join(config.splits)}); "
        f"trained styles {held.trained}, unseen styles {held.unseen}")
    embed = _Embeddings(held, config, log)
    probes = [n for n in available_features() if n.startswith("probe-")] if config.include_probes else []
    results: list[dict[str, Any]] = []
    results += _style_rows(held, embed, config, rng, [*config.style_extractors, *[n for n in probes if "style" in n]])
    results += _object_rows(held, embed, config, rng,
                            [*config.object_extractors, *[n for n in probes if "style" not in n]])
    results += _text_rows(held, embed, config, rng)
    results += _shape_rows(held, config, rng, generator, log)
    results += _fidelity_rows(held, rng, generator)
    if config.concept:
        results += _concept_rows(held, embed, config, rng, log)
    meta = {
        "data": {"images": len(held.records), "identities": len(identities), "splits": list(config.splits),
                 "trained_styles": held.trained, "unseen_styles": held.unseen},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()
                   if k not in ("data", "heads")},
        "heads": str(config.heads.name) if config.heads else "shipped",
        "bars": BARS, "shape_chance_bar": SHAPE_CHANCE_BAR,
    }
    return {"format": FORMAT, "meta": meta, "results": results}


def _style_rows(held, embed, config, rng, extractors) -> list[dict[str, Any]]:
    protocols = []
    for kind, styles in (("trained", held.trained), ("unseen", held.unseen)):
        if len(styles) < 2:
            continue
        sets = style_sets(held, styles, config.sets, config.set_size, rng)
        reference = style_reference_sets(held, styles, config.sets, config.set_size, rng)
        protocols.append((f"style-sets-{kind}", f"sets of {config.set_size}, {kind} styles: one style vs mixed",
                          sets, _set_similarity, True))
        protocols.append((f"style-reference-{kind}",
                          f"set of {config.set_size} vs a reference of another emoji, {kind} styles: same vs other style",
                          reference, _to_reference, True))
    if held.unseen:
        cross = style_reference_sets(held, held.unseen, config.sets, config.set_size, rng, other_styles=held.trained)
        protocols.append(("style-reference-unseen-vs-trained",
                          f"set of {config.set_size} in an unseen style vs a reference: same style vs a trained style",
                          cross, _to_reference, False))
    rows = []
    for name in extractors:
        features = embed(name)
        if features is None:
            continue
        sims = cosine_matrix(features).numpy()
        for protocol_id, text, (positives, negatives), score, primary in protocols:
            if score is _set_similarity:
                pos = [score(sims, m) for m in positives]
                neg = [score(sims, m) for m in negatives]
            else:
                pos = [score(sims, m, r) for m, r in positives]
                neg = [score(sims, m, r) for m, r in negatives]
            rows.append(_row("style", name, protocol_id, text, pos, neg, primary=primary))
    return rows


def _object_rows(held, embed, config, rng, extractors) -> list[dict[str, Any]]:
    styles = [*held.trained, *held.unseen]
    positives, negatives = object_pairs(held, styles, config.negatives_per_positive, rng)
    unseen = set(held.unseen)

    def touches_unseen(pair):
        return held.records[pair[0]]["style"] in unseen or held.records[pair[1]]["style"] in unseen

    rows = []
    for name in extractors:
        features = embed(name, foreground=True)
        if features is None:
            continue
        sims = cosine_matrix(features).numpy()
        cropped = embed.extractor(name).foreground
        rows.append(_row("object", name, "object", f"same emoji in another style vs another emoji, all "
                         f"{len(styles)} styles ({'foreground crops' if cropped else 'whole images'})",
                         [sims[p] for p in positives], [sims[n] for n in negatives], foreground=cropped))
        if unseen:
            rows.append(_row("object", name, "object-unseen", "the same, pairs that involve an unseen style",
                             [sims[p] for p in positives if touches_unseen(p)],
                             [sims[n] for n in negatives if touches_unseen(n)], primary=False))
    return rows


def _text_rows(held, embed, config, rng) -> list[dict[str, Any]]:
    rows = []
    for name in config.text_extractors:
        features = embed(name)
        if features is None:
            continue
        extractor = embed.extractor(name)
        captions = [r["caption"] for r in held.records]
        names = [r["name"] for r in held.records]
        caption_sims = cosine_matrix(features, extractor.embed_text(captions)).numpy()  # image i vs caption of row j
        name_sims = cosine_matrix(features, extractor.embed_text(names)).numpy()
        for protocol_id, styles, sims, text, primary in (
            ("text", held.trained, caption_sims, "own caption vs another held-out emoji's caption, trained styles", True),
            ("text-unseen", held.unseen, caption_sims, "the same, unseen styles (their style word never trained)", False),
            ("text-no-style-word", held.trained, name_sims, "own name without a style word vs another emoji's name, "
             "trained styles", False),
        ):
            if not styles:
                continue
            positives, negatives = text_pairs(held, styles, config.negatives_per_positive, rng)
            extra = {"retrieval": _retrieval(features, captions, positives, extractor)} if primary else {}
            rows.append(_row("text", name, protocol_id, text, [sims[i, i] for i in positives],
                             [sims[i, j] for i, j in negatives], primary=primary, **extra))
        trained_rows = [int(i) for s in held.trained for i in held.by_style[s]]
        style_negatives = [caption_sims[i, held.by_key[(held.identity(i), s)]] for i in trained_rows
                           for s in held.styles_of(held.identity(i), held.trained) if s != held.records[i]["style"]]
        rows.append(_row("text", name, "text-style-word", "own caption vs the same name with another trained "
                         "style word", [caption_sims[i, i] for i in trained_rows], style_negatives, primary=False))
    return rows


def _retrieval(features: torch.Tensor, captions: list[str], rows: list[int], extractor) -> dict[str, Any]:
    """Image -> caption retrieval among the distinct captions of ``rows``: top-1 / top-5."""
    chosen = [captions[i] for i in rows]
    distinct = sorted(set(chosen))
    truth = np.asarray([distinct.index(c) for c in chosen])
    sims = cosine_matrix(features[rows], extractor.embed_text(distinct)).numpy()
    ranks = (sims > sims[np.arange(len(rows)), truth][:, None]).sum(1)
    return {"top1": float((ranks < 1).mean()), "top5": float((ranks < 5).mean()), "candidates": len(distinct)}


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


def _shape_rows(held, config, rng, generator, log) -> list[dict[str, Any]]:
    """Maps are extracted once per image (``control_maps``) and paired by index: the same arithmetic
    as ``shape_consistency`` (``shape_scores``) on every pair."""
    log("shape protocols")
    images = held.images
    outputs = perturb_appearance(images, generator)
    negatives = shape_pairs(held, config.negatives_per_positive, rng)
    cross_pos, cross_neg = object_pairs(held, [*held.trained, *held.unseen], config.negatives_per_positive, rng)
    rows = []
    for mode in ("edges", "edges-f1", "silhouette"):
        output_maps, image_maps = control_maps(outputs, mode), control_maps(images, mode)

        def scores(pairs, from_maps, mode=mode, image_maps=image_maps) -> np.ndarray:
            index = torch.tensor(pairs, dtype=torch.long).view(-1, 2)
            return shape_scores(from_maps[index[:, 0]], image_maps[index[:, 1]], mode).numpy()

        pos = scores([(i, i) for i in range(len(images))], output_maps)
        neg = scores(negatives, output_maps)
        chance = float(np.mean(neg))
        primary = mode == "edges"
        row = _row("shape", mode, "shape", "appearance-changed copy vs its own control vs another emoji's control",
                   pos, neg, primary=primary, chance_level=round(chance, 4), chance_bar=SHAPE_CHANCE_BAR)
        if primary:
            row["passed"] = bool(row["passed"] and chance <= SHAPE_CHANCE_BAR)
        rows.append(row)
        rows.append(_row("shape", mode, "shape-redrawn", "the same emoji redrawn in another style vs another emoji",
                         scores(cross_pos, image_maps), scores(cross_neg, image_maps), primary=False))
    return rows


def _fidelity_rows(held, rng, generator) -> list[dict[str, Any]]:
    images = held.images
    light = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    others = images[[held.pick_other(r["style"], {r["identity"]}, rng) for r in held.records]]
    return [_row("fidelity", name, "fidelity", "noisy copy (sigma 0.03) vs another emoji",
                 fn(light, images).numpy(), fn(others, images).numpy(), primary=False)
            for name, fn in (("psnr", pixel.psnr), ("ssim", pixel.ssim))]


CONCEPT_NEGATIVES = {
    "drift": "a drifting series (first image right, the others other emoji)",
    "related": "a related wrong concept (another emoji of the same subcategory)",
    "style_only": "a series that matches the definition only in style (other emoji in the exemplars' style)",
}


def _concept_rows(held, embed, config, rng, log) -> list[dict[str, Any]]:
    """Concept C = mean_i sqrt(max(A_i, 0) max(S_i, 0)) with A the agreement with the exemplars and
    S the agreement across the series (``concept_scores``), one row per negative kind."""
    log("concept protocols")
    concepts = concept_series(held, rng)
    rows = []
    for name in config.concept_extractors:
        features = embed(name, foreground=True)
        if features is None:
            continue

        def score(series: list[int], exemplars: list[int], features=features) -> float:
            return float(concept_scores(features[series], features[exemplars]).mean())

        positive = [score(c["positive"], c["exemplars"]) for c in concepts]
        for kind, text in CONCEPT_NEGATIVES.items():
            kept = [(p, c) for p, c in zip(positive, concepts, strict=True) if c[kind] is not None]
            rows.append(_row("concept", name, f"concept-{kind.replace('_', '-')}",
                             f"a series of the concept in 3 other styles vs {text}", [p for p, _ in kept],
                             [score(c[kind], c["exemplars"]) for _, c in kept]))
    return rows
