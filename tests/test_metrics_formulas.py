"""Every consistency aggregate and the AUC against a small hand computation.

The images are constant-colour fields and the extractor reads an image's colour as its feature
vector, so the cosine matrices are written out by hand:

    a = (1, 0, 0), b = (0, 1, 0), c = (1, 1, 0)       s = 1/sqrt(2)

            a   b   c
        a [ 1   0   s ]
        b [ 0   1   s ]
        c [ s   s   1 ]

A pairwise consistency mean leaves the diagonal out: image a's mean similarity to the others is
(0 + s) / 2, not (1 + 0 + s) / 3.
"""

from __future__ import annotations

import math

import pytest
import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.metrics import (
    FeatureExtractor,
    concept_consistency,
    diversity,
    fidelity,
    object_consistency,
    roc_auc,
    shape_consistency,
    style_consistency,
    text_alignment,
)
from consistent_diffusion.metrics.common import mean_off_diagonal

S = 1 / math.sqrt(2)
A, B, C = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)
C1 = 0.01**2  # SSIM's (K1 * L)^2 for L = 1
SSIM_TOL = 5e-4  # the float32 Gaussian window leaves ~1e-7 variance on constant fields, ~1e-4 after / C2


def fields(*colours: tuple[float, float, float], size: int = 16) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: image i is the constant colour ``colours[i]``."""
    return torch.tensor(colours, dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, size, size).clone()


class ColourExtractor(FeatureExtractor):
    """Feature vector = the image's top-left colour (3-d); text vectors from a fixed table."""

    name = "colour"
    has_text = True

    def __init__(self, texts: dict[str, tuple[float, float, float]] | None = None) -> None:
        super().__init__()
        self.texts = texts or {}

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :, 0, 0]

    def embed_text(self, texts):
        return torch.tensor([self.texts[t] for t in texts])


def test_mean_off_diagonal_leaves_the_diagonal_out():
    matrix = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert mean_off_diagonal(matrix).tolist() == pytest.approx([0.3, 0.4, 0.5])


def test_style_within_set_by_hand():
    res = style_consistency(fields(A, B, C), ColourExtractor(), diversity_with=None)
    assert res.per_image == pytest.approx([S / 2, S / 2, S], abs=1e-6)
    assert res.aggregate == pytest.approx(2 * S / 3, abs=1e-6)  # with the diagonal: (2 + 4 s) / 9


def test_style_to_reference_by_hand():
    res = style_consistency(fields(A, B, C), ColourExtractor(), reference=fields(A), diversity_with=None)
    assert res.per_image == pytest.approx([1.0, 0.0, S], abs=1e-6)
    assert res.aggregate == pytest.approx((1 + S) / 3, abs=1e-6)
    assert res.details["within_set"] == pytest.approx(2 * S / 3, abs=1e-6)


def test_object_within_set_and_to_references_by_hand():
    images = fields(A, B, C)
    within = object_consistency(images, None, ColourExtractor(), foreground=False, diversity_with=None)
    assert within.per_image == pytest.approx([S / 2, S / 2, S], abs=1e-6)
    assert within.aggregate == pytest.approx(2 * S / 3, abs=1e-6)
    to_refs = object_consistency(images, fields(A, B), ColourExtractor(), foreground=False, diversity_with=None)
    assert to_refs.per_image == pytest.approx([0.5, 0.5, S], abs=1e-6)
    assert to_refs.aggregate == pytest.approx((1 + S) / 3, abs=1e-6)


def test_text_alignment_by_hand():
    # x = (1, 0, 0), y = (0, 1, 1): cos(a, x) = 1, cos(b, y) = s, cos(c, y) = 1/2, cos(c, x) = s > 1/2
    extractor = ColourExtractor({"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 1.0)})
    res = text_alignment(fields(A, B, C), ["x", "y", "y"], extractor)
    assert res.per_image == pytest.approx([1.0, S, 0.5], abs=1e-6)
    assert res.aggregate == pytest.approx((1.5 + S) / 3, abs=1e-6)
    assert res.details["retrieval_top1"] == pytest.approx(2 / 3)  # c's nearest prompt is x, not its own y


def test_feature_diversity_by_hand():
    res = diversity(fields(A, B, C), ColourExtractor())
    # distances 1 - cos: d(a, b) = 1, d(a, c) = d(b, c) = 1 - s
    assert res.per_image == pytest.approx([1 - S / 2, 1 - S / 2, 1 - S], abs=1e-6)
    assert res.aggregate == pytest.approx(1 - 2 * S / 3, abs=1e-6)


def test_pixel_diversity_by_hand():
    # grey fields at 1, 0.5 and 0 in [0, 1] units: SSIM of constant fields p, q is (2pq + C1) / (p^2 + q^2 + C1)
    images = fields((1.0,) * 3, (0.0,) * 3, (-1.0,) * 3)
    d_white_grey = 1 - (2 * 0.5 + C1) / (1 + 0.25 + C1)
    d_white_black = 1 - C1 / (1 + C1)
    d_grey_black = 1 - C1 / (0.25 + C1)
    res = diversity(images)
    expected = [(d_white_grey + d_white_black) / 2, (d_white_grey + d_grey_black) / 2,
                (d_white_black + d_grey_black) / 2]
    assert res.extractor == "pixel"
    assert res.per_image == pytest.approx(expected, abs=SSIM_TOL)
    assert res.aggregate == pytest.approx(sum(expected) / 3, abs=SSIM_TOL)


def test_shape_silhouette_iou_by_hand():
    # a dark 4x4 square on white; the control maps: the same square, and the square shifted 2 px right
    image = torch.ones(1, 3, 12, 12)
    image[:, :, 4:8, 4:8] = -1.0
    same, shifted = torch.full((1, 3, 12, 12), -1.0), torch.full((1, 3, 12, 12), -1.0)
    same[:, :, 4:8, 4:8] = 1.0
    shifted[:, :, 4:8, 6:10] = 1.0
    res = shape_consistency(image.repeat(2, 1, 1, 1), torch.cat([same, shifted]), mode="silhouette",
                            control_kind="map", diversity_with=None)
    # shifted: intersection 4x2 = 8, union 16 + 16 - 8 = 24
    assert res.per_image == pytest.approx([1.0, 1 / 3], abs=1e-6)
    assert res.aggregate == pytest.approx(2 / 3, abs=1e-6)


def test_shape_edge_f1_by_hand():
    # predicted: a 6-px horizontal line; reference: 3 px of it plus a 3-px line far away
    predicted = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    predicted[0, 0, 2, 2:8] = True
    reference = torch.zeros_like(predicted)
    reference[0, 0, 2, 2:5] = True
    reference[0, 0, 13, 10:13] = True
    # tolerance 0: precision 3/6, recall 3/6 -> F1 1/2
    # tolerance 1: predicted x = 5 is 1 px from reference x = 4: precision 4/6, recall 3/6 -> F1 4/7
    assert pixel.edge_f1(predicted, reference, tolerance=0).item() == pytest.approx(0.5)
    assert pixel.edge_f1(predicted, reference, tolerance=1).item() == pytest.approx(4 / 7)


def test_fidelity_by_hand():
    images, sources = fields((0.2,) * 3, A), fields((0.5,) * 3, B)
    res = fidelity(images, sources, extractor=ColourExtractor())
    # image 0: 0.6 vs 0.75 in [0, 1] units: MSE 0.15^2 -> PSNR 10 log10(1 / 0.0225)
    assert res["psnr"].per_image[0] == pytest.approx(10 * math.log10(1 / 0.0225), abs=1e-4)
    assert res["ssim"].per_image[0] == pytest.approx((2 * 0.6 * 0.75 + C1) / (0.36 + 0.5625 + C1), abs=SSIM_TOL)
    # image 1: a vs b in feature space: distance 1 - cos = 1; image 0: identical grey directions
    assert res["feature_distance"].per_image == pytest.approx([0.0, 1.0], abs=1e-6)
    assert res["feature_distance"].aggregate == pytest.approx(0.5, abs=1e-6)


def test_concept_by_hand():
    # exemplar e = a: definition A = (1, 0, s); series S = (s/2, s/2, s); C_i = sqrt(max(A, 0) max(S, 0))
    res = concept_consistency(fields(A, B, C), exemplars=fields(A), extractor=ColourExtractor(), foreground=False)
    expected = [math.sqrt(S / 2), 0.0, S]
    assert res.per_image == pytest.approx(expected, abs=1e-6)
    assert res.aggregate == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert res.details["series_agreement"] == pytest.approx(2 * S / 3, abs=1e-6)
    assert res.details["definition_agreement"] == pytest.approx((1 + S) / 3, abs=1e-6)


def test_concept_with_text_averages_both_definitions_by_hand():
    # text t = (0, 1, 0): to text (0, 1, s); with the exemplar a: A = ((1 + 0) / 2, (0 + 1) / 2, s)
    extractor = ColourExtractor({"t": (0.0, 1.0, 0.0)})
    res = concept_consistency(fields(A, B, C), exemplars=fields(A), text="t", extractor=extractor,
                              text_extractor=extractor, foreground=False)
    expected = [math.sqrt(0.5 * S / 2), math.sqrt(0.5 * S / 2), S]
    assert res.per_image == pytest.approx(expected, abs=1e-6)


def test_roc_auc_by_hand():
    # pairs (pos > neg): 0.9 beats both, 0.6 beats both, 0.4 loses to 0.5 and ties 0.4: (2 + 2 + 0.5) / 6
    assert roc_auc([0.9, 0.4, 0.6], [0.5, 0.4]) == pytest.approx(0.75)
    assert roc_auc([0.1], [0.2, 0.3]) == 0.0


@pytest.mark.parametrize("metric", ["style", "object", "shape"])
def test_diversity_with_none_skips_the_guard(metric):
    """Bug 8: ``diversity_with=None`` computed pixel diversity instead of skipping it."""
    images = fields(A, B, C)
    if metric == "style":
        res = style_consistency(images, ColourExtractor(), diversity_with=None)
    elif metric == "object":
        res = object_consistency(images, None, ColourExtractor(), diversity_with=None)
    else:
        res = shape_consistency(images, images, diversity_with=None)
    assert "diversity" not in res.details
    with_guard = style_consistency(images, ColourExtractor())  # the default still reports it
    assert with_guard.details["diversity"] == pytest.approx(diversity(images).aggregate)
