"""Colour measurements: an sRGB -> Lab colour classifier (validated on the real hearts), colour
binding of colour-named prompts, and how much of the output colour the starting noise explains."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from consistent_diffusion.core.images import tensor_to_uint8
from consistent_diffusion.data.emoji import EmojiDataset
from consistent_diffusion.training.recipes.evaluation.prompts import (
    COLOURS,
    NOISE_SEED_OFFSET,
    colour_prompts,
)
from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate, starting_noise
from consistent_diffusion.training.recipes.evaluation.stats import r_squared, wilson_interval


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) -> CIELAB (..., 3) (D65 white; L in [0, 100]); CIE 15 / IEC 61966-2-1."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


# Lab hue-angle bins (degrees) of the chromatic colours; brown is told from red/orange by chroma and
# lightness. Set on the real hearts (median foreground hue: red 16-36, orange 45-68, yellow 80-98,
# green 113-156, blue 261-290, purple 307-323; brown chroma 23-44 and L 33-54 vs >= 63 chroma of
# red and orange) and checked there by ``validate_colour_classifier``.
HUE_BINS = ((0.0, 42.0, "red"), (42.0, 75.0, "orange"), (75.0, 105.0, "yellow"), (105.0, 200.0, "green"),
            (200.0, 298.0, "blue"), (298.0, 345.0, "purple"), (345.0, 360.1, "red"))
BACKGROUND_L, BACKGROUND_C = 90.0, 10.0  # lighter and greyer than this: the white background
R2_BOOTSTRAP_DRAWS = 1000  # resamples of the noise R^2's percentile interval
BLACK_L, GREY_L, NEUTRAL_C = 25.0, 50.0, 15.0  # darker than BLACK_L, or grey (C < NEUTRAL_C) below GREY_L
BROWN_C, BROWN_L, BROWN_HUE = 50.0, 62.0, (15.0, 75.0)


def pixel_colours(image: np.ndarray) -> np.ndarray:
    """Colour name per pixel (H*W,) of a uint8 RGB image (H, W, 3): one of COLOURS, or "" for the
    white background and light/mid greys (highlights, shading), which vote for nothing."""
    lab = srgb_to_lab(image).reshape(-1, 3)
    lightness, chroma = lab[:, 0], np.hypot(lab[:, 1], lab[:, 2])
    hue = np.degrees(np.arctan2(lab[:, 2], lab[:, 1])) % 360
    background = (lightness > BACKGROUND_L) & (chroma < BACKGROUND_C)
    black = ~background & ((lightness < BLACK_L) | ((chroma < NEUTRAL_C) & (lightness < GREY_L)))
    chromatic = ~background & ~black & (chroma >= NEUTRAL_C)
    names = np.full(len(lab), "", dtype=object)
    for low, high, name in HUE_BINS:
        names[chromatic & (hue >= low) & (hue < high)] = name
    brown = chromatic & (chroma < BROWN_C) & (lightness < BROWN_L) & (hue >= BROWN_HUE[0]) & (hue < BROWN_HUE[1])
    names[brown] = "brown"
    names[black] = "black"
    return names


def dominant_colour(image: np.ndarray) -> str | None:
    """The colour (one of COLOURS) most foreground pixels of a uint8 RGB image (H, W, 3) have, by
    ``pixel_colours`` (a plurality vote, so outlines and highlights do not outweigh the fill);
    None when no pixel votes (a blank image)."""
    votes = pixel_colours(image)
    votes = votes[votes != ""]
    if not len(votes):
        return None
    names, counts = np.unique(votes.astype(str), return_counts=True)
    return str(names[counts.argmax()])


def heart_rows(dataset: EmojiDataset, styles: Sequence[str]) -> list[tuple[str, int]]:
    """(colour, row) of the real "<colour> heart" images of ``styles``, COLOURS order."""
    wanted = set(styles)
    return [(colour, i) for colour in COLOURS for i, r in enumerate(dataset.records)
            if r["name"] == f"{colour} heart" and r["style"] in wanted]


def validate_colour_classifier(dataset: EmojiDataset) -> dict:
    """``dominant_colour`` on the real eight hearts in every trained style: accuracy and the misses."""
    pairs = heart_rows(dataset, dataset.trained_styles)
    predicted = [dominant_colour(dataset.images[i]) for _, i in pairs]
    misses = [f"{dataset.records[i]['style']} {colour} heart -> {p}"
              for (colour, i), p in zip(pairs, predicted, strict=True) if p != colour]
    correct = len(pairs) - len(misses)
    return {"images": len(pairs), "accuracy": round(correct / len(pairs), 4) if pairs else None, "misses": misses}


def colour_binding(pipe, dataset: EmojiDataset, styles: Sequence[str], sampling: Sampling, seeds: int) -> dict:
    """Share of "<colour> heart" images whose ``dominant_colour`` is the colour word, Wilson 95%."""
    prompts = colour_prompts(styles, seeds)
    predicted = [dominant_colour(image) for image in tensor_to_uint8(generate(pipe, prompts, sampling))]
    correct = [p == item["colour"] for p, item in zip(predicted, prompts, strict=True)]
    low, high = wilson_interval(sum(correct), len(correct))
    per_colour = {c: round(float(np.mean([ok for ok, item in zip(correct, prompts, strict=True)
                                          if item["colour"] == c])), 4) for c in COLOURS}
    confusion = {c: {name: sum(1 for p, item in zip(predicted, prompts, strict=True)
                               if item["colour"] == c and (p or "none") == name)
                     for name in (*COLOURS, "none")} for c in COLOURS}
    return {"images": len(prompts), "seeds_per_prompt": seeds, "accuracy": round(sum(correct) / len(correct), 4),
            "interval95": [round(low, 4), round(high, 4)], "chance": round(1 / len(COLOURS), 4),
            "per_colour": per_colour, "predicted": {c: {k: v for k, v in row.items() if v} for c, row in confusion.items()},
            "classifier_on_real_hearts": validate_colour_classifier(dataset)}


def noise_colour_r2(pipe, sampling: Sampling, prompt: str, seeds: int = 48, shuffles: int = 20) -> dict:
    """How much of each output's mean R, G, B the starting noise's C channel means explain.

    One prompt, ``seeds`` noises (NOISE_SEED_OFFSET+); R^2 (``r_squared``) of each colour channel's
    image mean on the noise's channel means; a control with the noise rows permuted (the mean over
    ``shuffles`` permutations of rng 0), the R^2 that p random predictors reach on n points by
    chance, E[R^2] = p / (n - 1), and each channel's 95% percentile bootstrap interval over the seeds
    (R2_BOOTSTRAP_DRAWS resamples of the n (noise, image) pairs, rng 0 after the permutations).
    """
    seed_list = [NOISE_SEED_OFFSET + j for j in range(seeds)]
    noise = starting_noise(pipe, seed_list)
    images = generate(pipe, [{"prompt": prompt, "seed": s} for s in seed_list], sampling, latents=noise)
    x = noise.mean((2, 3)).double().numpy()  # (n, C)
    y = images.mean((2, 3)).double().numpy()  # (n, 3)
    rng = np.random.default_rng(0)
    fit = r_squared(x, y)
    control = np.mean([r_squared(x[rng.permutation(len(x))], y) for _ in range(shuffles)], axis=0)
    draws = [rng.integers(0, len(x), len(x)) for _ in range(R2_BOOTSTRAP_DRAWS)]
    low, high = np.nanpercentile([r_squared(x[rows], y[rows]) for rows in draws], [2.5, 97.5], axis=0)

    def per_channel(values):
        return {c: round(float(v), 4) for c, v in zip("RGB", values, strict=True)}

    return {"prompt": prompt, "seeds": seeds, "r2": per_channel(fit), "r2_max": round(float(np.nanmax(fit)), 4),
            "r2_interval95": {c: [round(float(a), 4), round(float(b), 4)] for c, a, b in zip("RGB", low, high,
                                                                                            strict=True)},
            "shuffled_r2": per_channel(control), "shuffles": shuffles, "chance_r2": round(x.shape[1] / (len(x) - 1), 4)}
