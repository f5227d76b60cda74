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

    committed = load_report(Path(__file__).resolve().parents[1] / "docs" / "bench" / "report.json")
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
