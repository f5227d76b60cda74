"""What the bench measures beside identity: subject agreement within the series, the distance to plain
and its "no measurable effect" flag, computed from the cells' images on disk (``bench.image_columns``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from consistent_diffusion.bench.advisor import advise, format_advice
from consistent_diffusion.bench.cell_records import NO_EFFECT_LEVELS, CellRecord
from consistent_diffusion.bench.image_columns import plain_distances, rescore
from consistent_diffusion.bench.records import load_report
from consistent_diffusion.metrics import object_consistency
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.metrics.score import score

PALETTE = {"style": "palette", "object": "palette", "concept": "palette", "text": None}
PROMPTS, SEEDS = ("a cat", "a dog"), (0, 1)


def shapes(count: int = 4, size: int = 32, shift: int = 0) -> list[Image.Image]:
    """Coloured rectangles on white, each of its own size and colour (``shift`` moves them)."""
    images = []
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        image.paste((40 * i + 30, 200 - 40 * i, 90), (4 + i + shift, 6, 20 + 2 * i + shift, 24))
        images.append(image)
    return images


# ----------------------------------------------------------------------------- within the series


def test_object_and_concept_cells_get_within_series_agreement_on_foreground_crops():
    images, references = shapes(), shapes(2, shift=3)
    scores = score(images, kind="object", references=references, extractors=PALETTE, model="embedded")
    within = scores["within_series"]
    expected = object_consistency(images, None, "palette", foreground=True)
    assert within.details["similarity_to_others"] == pytest.approx(expected.per_image)
    assert within.aggregate == pytest.approx(expected.aggregate) == pytest.approx(np.mean(within.per_image))
    r, n = np.asarray(expected.per_image), len(images)
    assert within.per_image == pytest.approx(list(r.mean() + 2 * (n - 1) / (n - 2) * (r - r.mean())))
    assert within.details["foreground"] is True and within.details["mode"] == "within_set"
    assert within.per_image != pytest.approx(scores["object"].per_image), "not identity to the references"
    same = score([images[0]] * 4, kind="object", references=references, extractors=PALETTE, model="embedded")
    assert same["within_series"].per_image == pytest.approx([1.0] * 4), "one subject throughout: maximal"
    assert "within_series" in score(images, kind="concept", references=references, extractors=PALETTE,
                                    model="embedded")
    for kind in ("style", "shape"):
        assert "within_series" not in score(images, kind=kind, references=references, extractors=PALETTE,
                                            model="embedded")


def test_within_series_carries_the_object_extractors_validation():
    within = score(shapes(), metrics=["within_series"], model="embedded")["within_series"]
    assert within.extractor == "emoji-object" and within.validated is True
    assert within.validation["protocols"][0]["protocol_id"] == "object"


@pytest.mark.slow
def test_the_object_extractor_keeps_its_auc_on_foreground_crops():
    """The within-series column crops to the foreground, which the object protocol (whole images)
    never saw: re-measured on the held-out real emoji with the same pairs, crops keep the bar."""
    import os

    import torch

    from consistent_diffusion.metrics.common import cosine_matrix, roc_auc
    from consistent_diffusion.metrics.consistency import foreground_crop
    from consistent_diffusion.metrics.extractors import load_features
    from consistent_diffusion.metrics.validation import BARS, ValidationConfig, load_held_out
    from consistent_diffusion.metrics.validation_protocols import object_pairs

    data = os.environ.get("CD_EMOJI_DATA")
    if not data:
        pytest.skip("set CD_EMOJI_DATA to the emoji dataset")
    config = ValidationConfig(data=data)
    held = load_held_out(config)
    positives, negatives = object_pairs(held, [*held.trained, *held.unseen], config.negatives_per_positive,
                                        np.random.default_rng(0))
    extractor = load_features("emoji-object")
    aucs = {}
    for name, images in (("whole", held.images), ("crops", foreground_crop(held.images))):
        with torch.no_grad():
            sims = cosine_matrix(extractor.embed(images)).numpy()
        aucs[name] = roc_auc(np.array([sims[p] for p in positives]), np.array([sims[n] for n in negatives]))
    assert aucs["crops"] >= BARS["object"], aucs
    assert abs(aucs["crops"] - aucs["whole"]) < 0.01, aucs  # measured: 0.9375 crops, 0.9380 whole images


def test_consistent_subject_is_judged_within_the_series_unless_it_has_a_real_anchor():
    scores = {"object": {"aggregate": 0.1, "per_image": [0.1]}, "within_series": {"aggregate": 0.6, "per_image": [0.6]}}
    generated = CellRecord.from_dict({"task": "t", "kind": "object", "method": "cs", "scores": scores,
                                      "stack": [{"method": "consistent_subject", "subject": "{subject}"}]})
    real = CellRecord.from_dict({"task": "t", "kind": "object", "method": "cs_real", "scores": scores,
                                 "stack": [{"method": "consistent_subject", "reference_image": "{reference}"}]})
    lora = CellRecord.from_dict({"task": "t", "kind": "object", "method": "lora", "scores": scores,
                                 "stack": [{"method": "lora"}]})
    assert generated.target_metric == "within_series"
    assert real.target_metric == "object" and lora.target_metric == "object"


def test_jackknife_pseudo_values_give_the_pairwise_mean_its_own_spread():
    """Leaving image i out changes the mean pairwise similarity by what its pseudo-value says."""
    from consistent_diffusion.metrics.axes import jackknife_pseudo_values

    sims = np.random.default_rng(0).uniform(-1, 1, (6, 6))
    sims = (sims + sims.T) / 2
    np.fill_diagonal(sims, 1.0)
    n = len(sims)

    def pairwise_mean(rows):
        block = sims[np.ix_(rows, rows)]
        return (block.sum() - np.trace(block)) / (len(rows) * (len(rows) - 1))

    to_others = [(sims[i].sum() - 1) / (n - 1) for i in range(n)]
    everything = pairwise_mean(list(range(n)))
    expected = [n * everything - (n - 1) * pairwise_mean([j for j in range(n) if j != i]) for i in range(n)]
    assert jackknife_pseudo_values(to_others) == pytest.approx(expected)
    assert jackknife_pseudo_values([0.3, 0.5]) == [0.3, 0.5]


# ----------------------------------------------------------------------------- distance to plain, re-scoring


def _write_cell(out, task: str, method: str, stack: list, images: list[Image.Image], kind: str = "object") -> dict:
    folder = out / "cells" / f"{task}__{method}" / "series"
    folder.mkdir(parents=True)
    entries = []
    for index, image in enumerate(images):
        name = f"p{index // len(SEEDS):02d}_s{SEEDS[index % len(SEEDS)]:04d}.png"
        image.save(folder / name)
        entries.append({"file": name, "prompt": PROMPTS[index // len(SEEDS)], "seed": SEEDS[index % len(SEEDS)]})
    (folder / "manifest.json").write_text(json.dumps({"images": entries}))
    values = list(np.linspace(0.2, 0.3, len(images)))
    return {"cell": f"{task}__{method}", "task": task, "kind": kind, "method": method, "stack": stack,
            "num_images": len(images), "scores": {kind: {"aggregate": float(np.mean(values)), "per_image": values}}}


def _bench_folder(tmp_path, model_kind: str = "folder"):
    """plain; a cell equal to plain but for one level in a few pixels; one whose subject moved."""
    plain = shapes()
    nearly = []
    for image in plain:
        array = np.asarray(image).copy()
        array[:2, :2] = np.clip(array[:2, :2].astype(int) + 1, 0, 255)
        nearly.append(Image.fromarray(array.astype(np.uint8)))
    cells = [_write_cell(tmp_path, "t", "plain", [], plain),
             _write_cell(tmp_path, "t", "barely", [{"method": "consistent_subject"}], nearly),
             _write_cell(tmp_path, "t", "moved", [{"method": "img2img"}], shapes(shift=8))]
    report = {"suite": {"name": "x", "tasks": [{"name": "t", "kind": "object", "prompts": list(PROMPTS),
                                                  "seeds": list(SEEDS)}]},
              "model": {"kind": model_kind}, "cells": cells}
    (tmp_path / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_plain_distance_is_the_mean_absolute_difference_in_levels():
    a = as_batch(shapes())
    assert plain_distances(a, a) == [0.0] * 4
    b = as_batch([Image.fromarray(np.clip(np.asarray(im).astype(int) + 10, 0, 255).astype(np.uint8))
                  for im in shapes()])
    distances = plain_distances(b, a)
    expected = [float(np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float)).mean())
                for x, y in zip(shapes(), [Image.fromarray(np.clip(np.asarray(im).astype(int) + 10, 0, 255)
                                                           .astype(np.uint8)) for im in shapes()], strict=True)]
    assert distances == pytest.approx(expected, abs=1e-3)


def test_rescore_flags_a_cell_identical_to_plain_and_not_a_changed_one(tmp_path):
    out = _bench_folder(tmp_path)
    rescore(out)
    report = load_report(out)
    cells = {cell.method: cell for cell in report.cells}
    assert cells["barely"].aggregate("plain_distance") < 0.1 and cells["barely"].no_effect
    assert cells["moved"].aggregate("plain_distance") > NO_EFFECT_LEVELS and not cells["moved"].no_effect
    assert "plain_distance" not in cells["plain"].scores and not cells["plain"].no_effect
    assert "within_series" not in cells["moved"].scores, "off the embedded model no extractor is chosen for it"
    assert "plain_distance" in report.intervals["cells"]["t__barely"]
    markdown = (out / "report.md").read_text()
    assert "no measurable effect" in markdown and "distance to plain" in markdown
    first = (out / "report.json").read_bytes()
    rescore(out)
    assert (out / "report.json").read_bytes() == first, "re-scoring is deterministic and idempotent"


def test_rescore_adds_within_series_with_the_models_default_extractor(tmp_path):
    out = _bench_folder(tmp_path, model_kind="embedded")
    report = rescore(out)
    within = {cell.method: cell.scores.get("within_series") for cell in report.cells}
    assert all(score is not None and score.extractor == "emoji-object" for score in within.values())
    assert report.cell_interval("t__moved", "within_series", "vs_plain") is not None, "paired with plain per image"
    assert "within series; vs plain" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- the advisor


def _advisor_cell(method: str, stack: list, object_: float, distance: float | None) -> dict:
    def values(mean, seed):
        return list(mean + 0.01 * np.random.default_rng(seed).standard_normal(8))

    scores = {"object": {"aggregate": object_, "per_image": values(object_, 0), "validated": True},
              "text": {"aggregate": 0.2, "per_image": values(0.2, 1)},
              "diversity": {"aggregate": 0.7, "per_image": values(0.7, 2)}}
    if distance is not None:
        scores["plain_distance"] = {"aggregate": distance, "per_image": [distance] * 8, "higher_is_better": False}
    return {"task": "t", "kind": "object", "method": method, "stack": [{"method": m} for m in stack],
            "num_images": 8, "scores": scores, "cost": {"seconds_per_image": 0.3}}


def test_the_advisor_does_not_recommend_a_method_without_measurable_effect():
    report = {"cells": [_advisor_cell("plain", [], 0.1, None),
                        _advisor_cell("barely", ["consistent_subject"], 0.4, NO_EFFECT_LEVELS / 3),
                        _advisor_cell("works", ["lora"], 0.35, 3 * NO_EFFECT_LEVELS)]}
    dropped: list[tuple[str, str]] = []
    ranked = advise(report, ["object"], dropped=dropped)
    assert "barely" not in [r.method for r in ranked] and "works" in [r.method for r in ranked]
    assert dropped and dropped[0][0] == "barely" and "no measurable effect" in dropped[0][1]
    assert "dropped barely: no measurable effect" in format_advice(ranked, ["object"], dropped)
