"""The validation protocols of ``metrics.validation``: the held-out rows (``HeldOut``) and the
builders of positives and negatives (``style_sets``, ``style_reference_sets``, ``object_pairs``,
``text_pairs``, ``shape_pairs``, ``concept_series``). They read only the records, so their
construction is tested on a tiny synthetic dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core.errors import ConfigError

# ----------------------------------------------------------------------------- held-out rows


@dataclass
class HeldOut:
    """The rows validated on: records (and images (N, 3, H, W) in [-1, 1] when loaded)."""

    records: list[dict]
    trained: list[str]  # styles the heads were trained on (other identities)
    unseen: list[str]  # styles never used to train anything
    images: torch.Tensor | None = None
    by_key: dict[tuple[str, str], int] = field(init=False)
    by_style: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {(r["identity"], r["style"]): i for i, r in enumerate(self.records)}
        styles = sorted({r["style"] for r in self.records})
        self.by_style = {s: np.asarray([i for i, r in enumerate(self.records) if r["style"] == s]) for s in styles}

    @classmethod
    def from_records(cls, records: list[dict], images: torch.Tensor | None = None) -> HeldOut:
        styles = sorted({r["style"] for r in records})
        unseen = sorted({r["style"] for r in records if r.get("style_split") == "heldout"})
        return cls(records, [s for s in styles if s not in unseen], unseen, images)

    def identity(self, row: int) -> str:
        return self.records[row]["identity"]

    def styles_of(self, identity: str, among: Sequence[str]) -> list[str]:
        return [s for s in among if (identity, s) in self.by_key]

    def pick_other(self, style: str, exclude: set[str], rng: np.random.Generator) -> int | None:
        """A random row of ``style`` whose identity is not in ``exclude`` (None if there is none)."""
        pool = self.by_style.get(style, np.zeros(0, dtype=np.int64))
        for _ in range(8):  # rejection sampling: cheap when exclude is small
            row = int(rng.choice(pool))
            if self.identity(row) not in exclude:
                return row
        allowed = [int(r) for r in pool if self.identity(r) not in exclude]
        return int(rng.choice(allowed)) if allowed else None


# ----------------------------------------------------------------------------- protocol builders


def style_sets(held: HeldOut, styles: Sequence[str], count: int, size: int, rng: np.random.Generator
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` sets of ``size`` different emoji in one of ``styles`` (positives) and as many mixed
    sets, half in style a and half in style b != a, all identities distinct (negatives)."""
    if len(styles) < 2:
        raise ConfigError(f"style sets need two styles, got {list(styles)}")
    positives, negatives = [], []
    half = size // 2
    for _ in range(count):
        style = styles[int(rng.integers(len(styles)))]
        positives.append(rng.choice(held.by_style[style], size=size, replace=False))
        a, b = rng.choice(len(styles), size=2, replace=False)
        first = rng.choice(held.by_style[styles[a]], size=half, replace=False)
        taken = {held.identity(r) for r in first}
        second = []
        while len(second) < size - half:
            row = held.pick_other(styles[b], taken, rng)
            taken.add(held.identity(row))
            second.append(row)
        negatives.append(np.concatenate([first, np.asarray(second)]))
    return positives, negatives


def style_reference_sets(held: HeldOut, styles: Sequence[str], count: int, size: int, rng: np.random.Generator,
                         other_styles: Sequence[str] | None = None
                         ) -> tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]:
    """A set of ``size`` emoji in style s with a reference image of another emoji (not in the set):
    in s (positive) or in a style of ``other_styles`` (default ``styles``) other than s (negative).
    Each negative shares its set with a positive."""
    other_styles = list(other_styles if other_styles is not None else styles)
    positives, negatives = [], []
    for _ in range(count):
        style = styles[int(rng.integers(len(styles)))]
        members = rng.choice(held.by_style[style], size=size, replace=False)
        taken = {held.identity(r) for r in members}
        candidates = [s for s in other_styles if s != style]
        other = candidates[int(rng.integers(len(candidates)))]
        same_ref, other_ref = held.pick_other(style, taken, rng), held.pick_other(other, taken, rng)
        if same_ref is None or other_ref is None:
            continue
        positives.append((members, same_ref))
        negatives.append((members, other_ref))
    return positives, negatives


def object_pairs(held: HeldOut, styles: Sequence[str], negatives: int, rng: np.random.Generator
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Each row i (a style of ``styles``): the same emoji in another style t (positive) and
    ``negatives`` other emoji drawn in t (negatives)."""
    positive, negative = [], []
    for style in styles:
        for i in held.by_style.get(style, []):
            identity = held.identity(int(i))
            others = [s for s in held.styles_of(identity, styles) if s != style]
            if not others:
                continue
            target = others[int(rng.integers(len(others)))]
            positive.append((int(i), held.by_key[(identity, target)]))
            for _ in range(negatives):
                negative.append((int(i), held.pick_other(target, {identity}, rng)))
    return positive, negative


def text_pairs(held: HeldOut, styles: Sequence[str], negatives: int, rng: np.random.Generator
               ) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows of ``styles`` with their own caption (positives: row i) vs the caption of ``negatives``
    other emoji in the same style (negatives: (image row, caption row))."""
    positive, negative = [], []
    for style in styles:
        for i in held.by_style.get(style, []):
            positive.append(int(i))
            negative.extend((int(i), held.pick_other(style, {held.identity(int(i))}, rng)) for _ in range(negatives))
    return positive, negative


def shape_pairs(held: HeldOut, negatives: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(row i, control row j): for each row, ``negatives`` controls of other emoji in its style
    (the positive of row i is its own control)."""
    return [(i, held.pick_other(held.records[i]["style"], {held.identity(i)}, rng))
            for i in range(len(held.records)) for _ in range(negatives)]


def concept_series(held: HeldOut, rng: np.random.Generator, exemplars: int = 2, length: int = 3
                   ) -> list[dict[str, Any]]:
    """One concept per identity drawn in at least ``exemplars + length`` styles.

    exemplars: the identity in ``exemplars`` styles; positive: a series of it in ``length`` other
    styles; negatives: "drift" (the series with all but its first image replaced by other emoji in
    the same styles), "related" (another identity of the same subcategory in the same styles; absent
    when the subcategory has no other identity drawn so), "style_only" (``length`` other emoji, each in
    an exemplar style: the series matches the definition only in style).
    """
    styles = sorted(held.by_style)
    subcategory: dict[str, list[str]] = {}
    for r in held.records:
        members = subcategory.setdefault(r.get("subcategory", ""), [])
        if r["identity"] not in members:
            members.append(r["identity"])
    out = []
    for identity in sorted({r["identity"] for r in held.records}):
        drawn = held.styles_of(identity, styles)
        if len(drawn) < exemplars + length:
            continue
        chosen = [drawn[k] for k in rng.permutation(len(drawn))[: exemplars + length]]
        exemplar_styles, series_styles = chosen[:exemplars], chosen[exemplars:]
        positive = [held.by_key[(identity, s)] for s in series_styles]
        taken = {identity}
        drift = [positive[0]]
        for s in series_styles[1:]:
            row = held.pick_other(s, taken, rng)
            taken.add(held.identity(row))
            drift.append(row)
        sub = held.records[positive[0]].get("subcategory", "")
        related_pool = [o for o in subcategory.get(sub, []) if o != identity
                        and all((o, s) in held.by_key for s in series_styles)]
        related = None
        if related_pool:
            other = related_pool[int(rng.integers(len(related_pool)))]
            related = [held.by_key[(other, s)] for s in series_styles]
        taken = {identity}
        style_only = []
        for k in range(length):
            row = held.pick_other(exemplar_styles[k % exemplars], taken, rng)
            taken.add(held.identity(row))
            style_only.append(row)
        out.append({"identity": identity, "exemplars": [held.by_key[(identity, s)] for s in exemplar_styles],
                    "positive": positive, "drift": drift, "related": related, "style_only": style_only})
    return out
