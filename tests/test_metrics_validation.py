"""The validation protocols (``metrics.validation``) are built as specified, on a tiny synthetic
dataset: positives and negatives of each kind, unseen styles kept apart, no identity shared between
the rows the heads train on and the rows they are validated on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.data.emoji import trainable_rows
from consistent_diffusion.metrics.concept import concept_scores
from consistent_diffusion.metrics.consistency import summarise_validation
from consistent_diffusion.metrics.validation import BARS, ValidationConfig, auc_interval, validate_metrics
from consistent_diffusion.metrics.validation_protocols import (
    HeldOut,
    concept_series,
    object_pairs,
    shape_pairs,
    style_reference_sets,
    style_sets,
    text_pairs,
)

TRAINED, UNSEEN = ["a", "b", "c"], ["x", "y"]


def synthetic_records(identities: int = 24, split: str = "val") -> list[dict]:
    """Every identity in every style but a few gaps; subcategories of 3 identities."""
    records = []
    for k in range(identities):
        for style in (*TRAINED, *UNSEEN):
            if style == "c" and k % 7 == 3:
                continue  # a gap: not every identity is drawn in every style
            records.append({"identity": f"id{k:02d}", "style": style, "name": f"thing {k}",
                            "caption": f"thing {k}, {style} style", "subcategory": f"sub{k // 3}",
                            "split": split, "style_split": "heldout" if style in UNSEEN else "trained"})
    return records


@pytest.fixture
def held() -> HeldOut:
    return HeldOut.from_records(synthetic_records())


def identities_of(held: HeldOut, rows) -> list[str]:
    return [held.identity(int(r)) for r in rows]


def styles_of(held: HeldOut, rows) -> list[str]:
    return [held.records[int(r)]["style"] for r in rows]


def test_held_out_knows_trained_and_unseen_styles(held):
    assert held.trained == TRAINED and held.unseen == UNSEEN


@pytest.mark.parametrize("styles", [TRAINED, UNSEEN])
def test_style_sets(held, styles):
    rng = np.random.default_rng(0)
    positives, negatives = style_sets(held, styles, 40, 4, rng)
    assert len(positives) == len(negatives) == 40
    for members in positives:
        assert len(set(styles_of(held, members))) == 1 and styles_of(held, members)[0] in styles
        assert len(set(identities_of(held, members))) == 4
    for members in negatives:
        first, second = styles_of(held, members[:2]), styles_of(held, members[2:])
        assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]
        assert set(first + second) <= set(styles)
        assert len(set(identities_of(held, members))) == 4  # content never repeats inside a set


def test_style_reference_sets(held):
    rng = np.random.default_rng(1)
    positives, negatives = style_reference_sets(held, UNSEEN, 30, 4, rng)
    assert len(positives) == len(negatives) == 30
    for (members, same), (members_neg, other) in zip(positives, negatives, strict=True):
        assert np.array_equal(members, members_neg)  # paired: the reference alone changes
        set_style = styles_of(held, members)[0]
        assert held.records[same]["style"] == set_style
        assert held.records[other]["style"] != set_style and held.records[other]["style"] in UNSEEN
        assert held.identity(same) not in identities_of(held, members)
        assert held.identity(other) not in identities_of(held, members)
    _, crossed = style_reference_sets(held, UNSEEN, 20, 4, rng, other_styles=TRAINED)
    assert all(held.records[r]["style"] in TRAINED for _, r in crossed)


def test_object_pairs(held):
    rng = np.random.default_rng(2)
    styles = TRAINED + UNSEEN
    positives, negatives = object_pairs(held, styles, 3, rng)
    assert len(positives) == len(held.records) and len(negatives) == 3 * len(positives)
    for i, j in positives:
        assert held.identity(i) == held.identity(j) and held.records[i]["style"] != held.records[j]["style"]
    targets = {i: held.records[j]["style"] for i, j in positives}
    for i, j in negatives:
        assert held.identity(i) != held.identity(j) and held.records[j]["style"] == targets[i]


def test_text_and_shape_negatives_are_other_emoji_in_the_same_style(held):
    rng = np.random.default_rng(3)
    positives, negatives = text_pairs(held, TRAINED, 2, rng)
    assert set(styles_of(held, positives)) == set(TRAINED) and len(negatives) == 2 * len(positives)
    for pairs in (negatives, shape_pairs(held, 2, rng)):
        for i, j in pairs:
            assert held.identity(i) != held.identity(j)
            assert held.records[i]["style"] == held.records[j]["style"]


def test_concept_series(held):
    concepts = concept_series(held, np.random.default_rng(4))
    assert len(concepts) == 21  # identities drawn in >= 5 styles (3 of the 24 have a gap: only 4)
    assert any(c["related"] is not None for c in concepts)
    for c in concepts:
        exemplar_styles, series_styles = styles_of(held, c["exemplars"]), styles_of(held, c["positive"])
        assert set(identities_of(held, c["exemplars"] + c["positive"])) == {c["identity"]}
        assert not set(exemplar_styles) & set(series_styles) and len(set(series_styles)) == 3
        drift = identities_of(held, c["drift"])
        assert drift[0] == c["identity"] and len(set(drift)) == 3 and styles_of(held, c["drift"]) == series_styles
        if c["related"] is not None:
            related = identities_of(held, c["related"])
            assert len(set(related)) == 1 and related[0] != c["identity"]
            assert held.records[c["related"][0]]["subcategory"] == held.records[c["positive"][0]]["subcategory"]
            assert styles_of(held, c["related"]) == series_styles
        style_only = identities_of(held, c["style_only"])
        assert c["identity"] not in style_only and len(set(style_only)) == 3
        assert set(styles_of(held, c["style_only"])) <= set(exemplar_styles)


def test_heads_never_train_on_validated_identities_or_unseen_styles():
    records = synthetic_records(12, "train") + synthetic_records(6, "val")
    for r in records[len(records) // 2:]:
        r["identity"] = "v" + r["identity"]  # val identities are distinct from train ones
    train = trainable_rows(records)
    validated = HeldOut.from_records([r for r in records if r["split"] == "val"])
    assert {records[i]["style"] for i in train} == set(TRAINED)
    assert not {records[i]["identity"] for i in train} & {r["identity"] for r in validated.records}


def test_auc_interval_by_hand():
    low, high = auc_interval(0.5, 1, 1)
    assert (low, high) == (0.0, 1.0)  # var = A(1 - A) = 0.25, se 0.5
    auc, n = 0.8, 10
    q1, q2 = 0.8 / 1.2, 2 * 0.64 / 1.8
    se = ((0.16 + 9 * (q1 - 0.64) + 9 * (q2 - 0.64)) / 100) ** 0.5
    assert auc_interval(auc, n, n) == pytest.approx((0.8 - 1.96 * se, min(1.0, 0.8 + 1.96 * se)))


def test_chance_corrected_edge_f1_by_hand():
    reference = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    reference[0, 0, 1, 1] = True
    far = torch.zeros_like(reference)
    far[0, 0, 3, 3] = True
    assert float(pixel.edge_f1_corrected(reference, reference, tolerance=0)) == pytest.approx(1.0)
    # F1 0; chance: p0 = r0 = 1/16, F1_0 = 1/16 -> (0 - 1/16) / (15/16) = -1/15
    assert float(pixel.edge_f1_corrected(far, reference, tolerance=0)) == pytest.approx(-1 / 15)
    assert float(pixel.edge_f1_chance(far, reference, tolerance=1)) == pytest.approx(9 / 16 * 4 / 16 * 2 / (13 / 16))


def test_concept_scores_by_hand():
    series = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    exemplars = torch.tensor([[1.0, 0.0]])
    # A = (1, 1, 0); S = (0.5, 0.5, 0); C = sqrt(A S)
    assert concept_scores(series, exemplars).tolist() == pytest.approx([0.5 ** 0.5, 0.5 ** 0.5, 0.0])


def test_summarise_validation_needs_every_barred_protocol():
    rows = [
        {"metric": "style", "extractor": "s", "protocol_id": "p1", "protocol": "one", "auc": 0.99, "bar": 0.97,
         "passed": True, "primary": True},
        {"metric": "style", "extractor": "s", "protocol_id": "p2", "protocol": "two", "auc": 0.94, "bar": 0.95,
         "passed": False, "primary": True},
        {"metric": "style", "extractor": "s", "protocol_id": "p3", "protocol": "info", "auc": 0.5, "bar": None,
         "passed": None, "primary": False},
        {"metric": "object", "extractor": "o", "protocol_id": "o", "protocol": "o", "auc": 0.95, "bar": 0.92,
         "passed": True, "primary": True},
    ]
    table = summarise_validation(rows)
    assert table[("style", "s")]["passed"] is False and table[("style", "s")]["auc"] == 0.94
    assert len(table[("style", "s")]["protocols"]) == 2 and table[("object", "o")]["passed"] is True


def test_validate_metrics_end_to_end_on_a_tiny_dataset(tmp_path):
    """Every barred protocol produces its row, on pixel extractors (no weights needed)."""
    records = synthetic_records(16)
    rng = np.random.default_rng(0)
    images = np.full((len(records), 32, 32, 3), 255, dtype=np.uint8)
    for i, r in enumerate(records):
        k = int(r["identity"][2:])
        colour = rng.integers(0, 200, 3) if r["style"] in ("a", "x") else np.array([20 * (k % 8), 40, 200 - 10 * k])
        side = 6 + k % 8
        images[i, 16 - side: 16 + side, 16 - side // 2: 16 + side // 2] = colour
    (tmp_path / "labels.json").write_text(json.dumps({"meta": {"styles": TRAINED + UNSEEN, "heldout_styles": UNSEEN,
                                                               "categories": []}, "records": records}))
    np.save(tmp_path / "images.npy", images)
    config = ValidationConfig(data=tmp_path, splits=("val",), sets=20, negatives_per_positive=2,
                              include_probes=False, style_extractors=("palette",),
                              object_extractors=("palette", "silhouette"), text_extractors=(),
                              concept_extractors=("palette",))
    report = validate_metrics(config, log=lambda message: None)
    ids = {r["protocol_id"] for r in report["results"] if r["primary"]}
    assert ids == set(BARS) - {"text"}
    for row in report["results"]:
        assert 0.0 <= row["auc_ci95"][0] <= row["auc"] <= row["auc_ci95"][1] <= 1.0
        assert (row["bar"] is not None) == row["primary"] and (row["passed"] is None) == (row["bar"] is None)
    shape = next(r for r in report["results"] if r["protocol_id"] == "shape")
    assert shape["extractor"] == "edges" and shape["chance_level"] == shape["negative_mean"]
    assert report["meta"]["data"]["unseen_styles"] == UNSEEN
