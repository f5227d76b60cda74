"""The prompt sets of the evaluation and the dataset rows they are measured against: the measured
and tuning sets, the colour, noise and comparison-sheet prompts, held-out real rows, measured styles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.data.emoji import EmojiDataset
from consistent_diffusion.metrics.extractors.probes import load_probe

MIN_PROMPT_IMAGES = 300  # the measured prompt set has at least this many images (when the data allow)
MEASURE_SEED_OFFSET, TUNING_SEED_OFFSET = 1000, 50000  # noise seeds of the measured and tuning sets
COLOUR_SEED_OFFSET, NOISE_SEED_OFFSET = 2000, 3000  # noise seeds of the colour and noise->colour sets
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black")
NOISE_PROMPT_STYLE = "twitter"  # "red heart, twitter style" when the model knows twitter
# The comparison sheet: 24 fixed prompts over the categories, the five trained styles and the
# unstyled form (4 each).
SHEET_PROMPTS = (
    "red heart", "rocket", "pizza", "cat face",
    "grinning face, google style", "red heart, google style", "sunflower, google style", "soccer ball, google style",
    "rocket, twitter style", "dog face, twitter style", "hamburger, twitter style", "light bulb, twitter style",
    "pizza, openmoji style", "fox, openmoji style", "automobile, openmoji style", "thumbs up, openmoji style",
    "face with tears of joy, fluent-flat style", "butterfly, fluent-flat style", "guitar, fluent-flat style",
    "check mark button, fluent-flat style",
    "ghost, fluent-3d style", "birthday cake, fluent-3d style", "house, fluent-3d style",
    "chequered flag, fluent-3d style",
)


def heldout_rows(dataset: EmojiDataset, styles: Sequence[str] | None = None) -> np.ndarray:
    """Rows of identities no model was trained on (val + holdout) in ``styles`` (None: every style)."""
    rows = np.concatenate([dataset.indices("val"), dataset.indices("holdout")])
    if styles is None:
        return rows
    keep = set(styles)
    return np.asarray([i for i in rows if dataset.records[i]["style"] in keep], dtype=np.int64)


def measured_styles(dataset: EmojiDataset, styles: Sequence[str] | None, probes_dir: Path | None) -> list[str]:
    """The styles a model is measured on: ``styles`` if given (each must be a trained style the style
    probe labels), else the dataset's trained styles the style probe labels, in dataset order."""
    labels = load_probe("style", probes_dir)[1]["labels"]
    if styles is None:
        chosen = [s for s in dataset.trained_styles if s in labels]
    else:
        chosen = list(styles)
        unknown = [s for s in chosen if s not in dataset.trained_styles or s not in labels]
        if unknown:
            raise ConfigError(f"styles {unknown} are not trained styles of the dataset known to the style probe "
                              f"(trained: {dataset.trained_styles}; probe: {labels})")
    if not chosen:
        raise ConfigError(f"no style to measure: the style probe knows {labels}, the dataset trains "
                          f"{dataset.trained_styles}")
    return chosen


def default_per_category(dataset: EmojiDataset, styles: Sequence[str]) -> int:
    """Identities per category so that categories x identities x styles >= MIN_PROMPT_IMAGES:
    7 for 9 categories and 5 styles (315 images), 17 for 2 styles (306 images)."""
    return math.ceil(MIN_PROMPT_IMAGES / (len(dataset.categories) * len(styles)))


def eligible_identities(dataset: EmojiDataset) -> dict[str, list[dict]]:
    """{category: records of train-split identities drawn in every trained style}, first-row order.

    The pool does not depend on the styles measured, so every model is prompted with the same
    identities (a 2-style model's set contains the 5-style model's)."""
    trained = set(dataset.trained_styles)
    drawn: dict[str, set[str]] = {}
    first: dict[str, dict] = {}
    for record in dataset.records:
        if record["split"] == "train" and record["style"] in trained:
            drawn.setdefault(record["identity"], set()).add(record["style"])
            first.setdefault(record["identity"], record)
    pool: dict[str, list[dict]] = {c: [] for c in dataset.categories}
    for identity, record in first.items():
        if drawn[identity] == trained and record["category"] in pool:
            pool[record["category"]].append(record)
    return pool


def prompt_set(dataset: EmojiDataset, per_category: int | None = None, styles: Sequence[str] | None = None,
               seed: int = 0, seed_offset: int = MEASURE_SEED_OFFSET, tuning: bool = False) -> list[dict]:
    """``per_category`` train identities of each category x every style of ``styles``, deterministic.

    styles: default ``dataset.trained_styles``. per_category: default ``default_per_category`` (at
    least MIN_PROMPT_IMAGES images: 7 identities per category for the 5 trained styles, 315 images).
    Identities come from one fixed permutation per category (rng ``seed``) of ``eligible_identities``:
    the measured set takes its head, so a larger set contains a smaller one; ``tuning=True`` takes its
    tail, so a tuning set shares no identity with a measured set (while per_category of both fit).
    Returns dicts {prompt, name, style, category, identity, seed}, seed = seed_offset + position.
    """
    styles = list(styles) if styles is not None else dataset.trained_styles
    count = per_category if per_category is not None else default_per_category(dataset, styles)
    rng = np.random.default_rng(seed)
    prompts = []
    for category, pool in eligible_identities(dataset).items():
        order = rng.permutation(len(pool))
        for index in (order[::-1] if tuning else order)[:count]:
            record = pool[int(index)]
            for style in styles:
                prompts.append({"prompt": f"{record['name']}, {style} style", "name": record["name"], "style": style,
                                "category": category, "identity": record["identity"]})
    for k, item in enumerate(prompts):
        item["seed"] = seed_offset + k
    return prompts


def colour_prompts(styles: Sequence[str], seeds: int) -> list[dict]:
    """"<colour> heart, <style> style" for COLOURS x styles x seeds; the same seeds for every colour,
    so a model whose colour follows the noise scores 1/8."""
    return [{"prompt": f"{colour} heart, {style} style", "colour": colour, "style": style,
             "seed": COLOUR_SEED_OFFSET + j}
            for colour in COLOURS for style in styles for j in range(seeds)]


def noise_prompt(styles: Sequence[str]) -> str:
    """"red heart, twitter style", or in the first measured style when twitter is not among them."""
    return f"red heart, {NOISE_PROMPT_STYLE if NOISE_PROMPT_STYLE in styles else styles[0]} style"


def sheet_prompts(prompts: Sequence[str], seeds: int) -> list[dict]:
    """One item per (prompt, seed 0..seeds-1), prompt-major."""
    return [{"prompt": p, "seed": s} for p in prompts for s in range(seeds)]
