"""Slow tests of the shipped embedded model and probes (run with: pytest -m slow)."""

from __future__ import annotations

import pytest
import torch

from consistent_diffusion.metrics.extractors.probes import PROBES_DIR, load_probe, predict
from consistent_diffusion.models.embedded import (
    EMBEDDED_DIR,
    embedded_weights_present,
    load_embedded_pipeline,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not embedded_weights_present(), reason=f"no embedded weights in {EMBEDDED_DIR}"),
]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 30) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [-1, 1], one generator per prompt."""
    generators = [torch.Generator().manual_seed(seed + k) for k in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=generators, output_type="pt").images
    return images * 2 - 1


def test_shape_and_range(pipe) -> None:
    images = generate(pipe, ["grinning face, google style"], steps=10)
    assert images.shape == (1, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1


def test_same_seed_same_image(pipe) -> None:
    first = generate(pipe, ["red apple, twitter style"], seed=7, steps=10)
    second = generate(pipe, ["red apple, twitter style"], seed=7, steps=10)
    other = generate(pipe, ["red apple, twitter style"], seed=8, steps=10)
    torch.testing.assert_close(first, second)
    assert (first - other).abs().mean() > 1e-3


@pytest.mark.skipif(not (PROBES_DIR / "style.safetensors").is_file(), reason="no style probe shipped")
def test_style_probe_tells_two_style_prompts_apart(pipe) -> None:
    probe, meta = load_probe("style")
    names = ["grinning face", "red heart", "dog face", "sun", "smiling face with heart-eyes", "thumbs up",
             "pizza", "rocket"]
    google = predict(probe, generate(pipe, [f"{n}, google style" for n in names]))[:, meta["labels"].index("google")]
    twitter = predict(probe, generate(pipe, [f"{n}, twitter style" for n in names]))[:, meta["labels"].index("google")]
    assert google.mean() > twitter.mean() + 0.2
    assert (google > twitter).float().mean() >= 0.75
