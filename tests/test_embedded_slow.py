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
from consistent_diffusion.models.sampling import DEFAULT_STEPS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not embedded_weights_present(), reason=f"no embedded weights in {EMBEDDED_DIR}"),
]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [-1, 1], one generator per prompt, with the model's guidance rescale."""
    from consistent_diffusion.methods.base import default_guidance_rescale

    generators = [torch.Generator().manual_seed(seed + k) for k in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=generators, output_type="pt",
                  guidance_rescale=default_guidance_rescale(pipe) or 0.0).images
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


def test_same_seed_same_image_at_any_thread_count(pipe) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate(pipe, ["sunflower, fluent-flat style", "dog face"], seed=3, steps=10)
        torch.set_num_threads(2)
        two = generate(pipe, ["sunflower, fluent-flat style", "dog face"], seed=3, steps=10)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=0)


# Colourful emoji in every trained style (none is drawn grey or black in any of them).
COLOURFUL = ["grinning face", "red heart", "dog face", "sun", "pizza", "sunflower", "red apple", "butterfly"]


@pytest.mark.skipif(not (PROBES_DIR / "style.safetensors").is_file(), reason="no style probe shipped")
def test_style_probe_tells_the_trained_styles_apart(pipe) -> None:
    """Each style the model was trained on, prompted by name, is the probe's most frequent choice
    for its images, and the probe names the prompted style for at least 75% of all of them (chance:
    20% for five styles). The flat styles (google, fluent-flat, twitter) are the ones the probe
    confuses, on real images too (its val accuracy: 90.8%)."""
    probe, meta = load_probe("style")
    labels = meta["labels"]
    hits = []
    for style in labels:
        chosen = predict(probe, generate(pipe, [f"{n}, {style} style" for n in COLOURFUL])).argmax(1)
        counts = torch.bincount(chosen, minlength=len(labels))
        assert counts.argmax() == labels.index(style) and counts.max() > counts.sort().values[-2], (style, chosen)
        hits.append((chosen == labels.index(style)).float())
    assert torch.cat(hits).mean() >= 0.75, [h.mean().item() for h in hits]


def _foreground_chroma(images: torch.Tensor) -> list[float]:
    """Mean CIELAB chroma of each image's non-background pixels; images (B, 3, H, W) in [-1, 1].
    The held-out styles' real images (line art, monochrome) measure 0.0 at their 95th percentile,
    the trained styles' 10-21 at their 5th."""
    import numpy as np

    from consistent_diffusion.core.images import tensor_to_uint8
    from consistent_diffusion.training.recipes.evaluation.colour import (
        BACKGROUND_C,
        BACKGROUND_L,
        srgb_to_lab,
    )

    lab = srgb_to_lab(tensor_to_uint8(images))
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    foreground = ~((lab[..., 0] > BACKGROUND_L) & (chroma < BACKGROUND_C))  # colour binding's background
    return [float(c[f].mean()) if f.any() else 0.0 for c, f in zip(chroma, foreground, strict=True)]


def test_a_held_out_style_is_never_produced_from_its_style_word(pipe) -> None:
    """openmoji-line (black line art) and fluent-contrast (monochrome) were never trained on: their
    style words must not give their look. Colourful emoji keep their colour under those words."""
    from consistent_diffusion.data.styles import HELDOUT_STYLES

    for style in HELDOUT_STYLES:
        chroma = _foreground_chroma(generate(pipe, [f"{n}, {style} style" for n in COLOURFUL]))
        assert sum(c < 5.0 for c in chroma) <= 1, (style, [round(c, 1) for c in chroma])


def test_the_committed_reference_report_reproduces_at_any_thread_count(tmp_path) -> None:
    """Two cells of the committed quick-suite report re-run in fresh processes, one at
    OMP_NUM_THREADS=1 and one at 2 (cells and trainings run at the suite's one thread): a trained
    one (LoRA DreamBooth on the cricket, prior preservation included) and plain generation; every
    score within 1e-6 of the committed numbers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from consistent_diffusion.bench.records import load_report
    from consistent_diffusion.bench.suite import load_suite

    committed = load_report(Path(__file__).resolve().parents[1] / "docs" / "bench-quick" / "report.json")
    quick = load_suite("quick")
    task = next(t for t in quick.tasks if t.name == "object-cricket")
    script = ("import dataclasses, sys\n"
              "from consistent_diffusion.bench.runner import run_bench\n"
              "from consistent_diffusion.bench.scoring import make_scorer\n"
              "from consistent_diffusion.bench.suite import load_suite\n"
              "from consistent_diffusion.models.loading import load_pipeline\n"
              "suite = load_suite('quick')\n"
              "task = next(t for t in suite.tasks if t.name == 'object-cricket')\n"
              "suite = dataclasses.replace(suite, tasks=(dataclasses.replace(task, methods=('plain', 'lora')),))\n"
              "run_bench(suite, sys.argv[1], lambda: load_pipeline('embedded'), make_scorer(), progress=False)\n")
    assert "lora" in task.methods
    for threads in ("1", "2"):
        out = tmp_path / f"threads{threads}"
        completed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                                   timeout=1200, check=False, env={**os.environ, "OMP_NUM_THREADS": threads})
        assert completed.returncode == 0, completed.stderr[-3000:]
        for cell_id in ("object-cricket__plain", "object-cricket__lora"):
            cell = json.loads((out / "cells" / cell_id / "cell.json").read_text())
            expected = next(c for c in committed.cells if c.id == cell_id)
            for name, score in cell["scores"].items():
                want = expected.scores[name].per_image
                assert len(score["per_image"]) == len(want), (threads, cell_id, name)
                assert all(abs(a - b) <= 1e-6 for a, b in zip(score["per_image"], want, strict=True)), \
                    (threads, cell_id, name)
