"""consistent_subject equals NVlabs/consistory part by part: the shared self-attention on SDXL-architecture
layers, the subject masks, the feature injection and the vanilla-query strengths.

The numbers below were recorded by running the reference's own attention processor
(``ConsistoryExtendedAttnXFormersAttnProcessor`` with its ``AttentionStore`` extended mask, xformers
swapped for PyTorch's SDPA) outside the project, on these exact inputs: SDXL's self-attention shapes
(640 channels / 10 heads at 16x16 tokens, 1280 / 20 at 8x8; head size 64), random init under
``torch.manual_seed(0)``, a batch of 2 CFG halves x 4 images with anchors 0 and 1, the reference's
``create_anchor_mapping`` (every image sees itself and the anchors), and the anchors' subject masks
after dropout ``rand > 0.6``. Our processor matched it to 8.2e-8 (docs/consistent_subject.md). No reference
code is in the project: only its outputs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from consistent_diffusion.methods.consistent_subject import SubjectAttentionProcessor, SubjectState

# (channels, heads, grid side) -> the reference's outputs at (row, token, channel), and the mean and
# mean absolute value of the non-anchor rows (2, 3 unconditional half; 6, 7 conditional half).
REFERENCE = {
    (640, 10, 16): {"values": [-0.0391788, -0.045064, -0.0258009, -0.0141958],
                    "mean": -0.00157381, "absmean": 0.02348638},
    (1280, 20, 8): {"values": [0.0074398, -0.028133, -0.0416508, 0.0200129],
                    "mean": 0.00020737, "absmean": 0.0284112},
}
POSITIONS = ((2, 0, 0), (3, 5, 7), (6, 10, 100), (7, 3, 33))
ROWS = [2, 3, 6, 7]


def _shared_output(dim: int, heads: int, width: int, share: bool = True) -> torch.Tensor:
    torch.manual_seed(0)
    attn = Attention(query_dim=dim, heads=heads, dim_head=64, bias=False, out_bias=True).eval()
    n, anchors = 4, [0, 1]
    hidden = torch.randn(2 * n, width * width, dim)
    masks = torch.rand(n, width * width) > 0.6
    state = SubjectState(n=n, groups=2, anchors=anchors, positions=[[1]] * n, steps=50, latent_size=(width, width),
                         step=3, share=share)
    state.share_levels = {0}
    state.visible = {(width, width): masks[anchors]}
    processor = SubjectAttentionProcessor(state, AttnProcessor2_0(), "up_blocks.0.attentions.0.attn1.processor", 0)
    with torch.no_grad():
        return processor(attn, hidden)


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(REFERENCE))
def test_shared_attention_equals_the_reference_on_sdxl_layers(shape):
    out = _shared_output(*shape)
    expected = REFERENCE[shape]
    got = [float(out[p]) for p in POSITIONS]
    assert got == pytest.approx(expected["values"], abs=1e-6)
    assert float(out[ROWS].mean()) == pytest.approx(expected["mean"], abs=1e-7)
    assert float(out[ROWS].abs().mean()) == pytest.approx(expected["absmean"], abs=1e-7)
    plain = _shared_output(*shape, share=False)
    assert float(plain[ROWS].abs().mean()) != pytest.approx(expected["absmean"], abs=1e-5), "the pins tell sharing on from off"


# The reference's masks (``AttentionStore.aggregate_last_steps_attention``, scikit-image's Otsu, no
# dropout) from the synthetic cross-attention below, at its 32x32 map and 32x32 / 64x64 mask grids:
# per image the number of subject patches and the first and last one (flat index). Ours matched
# them pixel for pixel.
REFERENCE_MASKS = {
    32: {"counts": [69, 70, 70, 70], "first": [138, 268, 398, 528], "last": [398, 528, 658, 817]},
    64: {"counts": [310, 304, 288, 304], "first": [470, 987, 1503, 2019], "last": [1691, 2206, 2660, 3239]},
}


@pytest.mark.slow
def test_subject_masks_equal_the_reference_on_sdxl_maps():
    """4 images, 10 heads, 32x32 maps, 77 text tokens, 3 layers x 25 steps (the last 20 averaged):
    softmax of noise plus a subject blob per image on token 5, the conditional half's maps."""
    from consistent_diffusion.methods.consistent_subject import masks_from_maps, subject_map

    torch.manual_seed(0)
    bsz, heads, hw, tokens, token = 4, 10, 32 * 32, 77, 5
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    step_maps = []
    for _step in range(25):
        layer_maps = []
        for _layer in range(3):
            logits = torch.randn(2 * bsz, heads, hw, tokens)
            for i in range(bsz):
                blob = torch.exp(-((yy - 8 - 4 * i) ** 2 + (xx - 12 - 2 * i) ** 2) / 40.0).flatten()
                logits[bsz + i, :, :, token] += 3 * blob
            layer_maps.append(subject_map(logits.softmax(-1)[bsz:], [[token]] * bsz))
        step_maps.append(torch.stack(layer_maps).mean(0))
    masks = masks_from_maps(torch.stack(step_maps[-20:]).mean(0), (32, 32), [(32, 32), (64, 64)])
    for side, expected in REFERENCE_MASKS.items():
        mask = masks[(side, side)]
        assert mask.sum(1).tolist() == expected["counts"]
        assert [int(torch.nonzero(row)[0]) for row in mask] == expected["first"]
        assert [int(torch.nonzero(row)[-1]) for row in mask] == expected["last"]


# The reference's feature injection (``cyclic_nn_map`` + ``FeatureInjector.inject_outputs`` at step 6
# of its (5, 16, 0.8) range) on the inputs below: each row's sum after injection, values at
# (row, token, channel), and the injected pixels per row. Ours matched it exactly (0.0).
REFERENCE_INJECTION = {"row_sums": [-387.382, 937.464, -674.437, 165.778],
                       "values": [0.651271, 0.954415, -0.610096, 0.689819], "changed": [182, 163, 144, 144]}


@pytest.mark.slow
def test_feature_injection_equals_the_reference():
    """4 images (anchors 0, 1), 64-channel DIFT features at 32x32 (the targets share a patch with
    anchor 0), box masks, 640-channel attention outputs: rows updated in place one after another."""
    from types import SimpleNamespace

    from consistent_diffusion.methods.consistent_subject.injection import (
        InjectionPlan,
        _injection_hook,
        correspondences,
    )

    torch.manual_seed(0)
    n, side = 4, 32
    features = torch.randn(n, 64, side, side)
    features[2:, :, 8:20, 8:20] = features[0, :, 10:22, 6:18]
    masks = torch.zeros(n, side * side, dtype=torch.bool)
    for i in range(n):
        box = torch.zeros(side, side, dtype=torch.bool)
        box[4 + i:24 + i, 4:26] = True
        masks[i] = box.flatten()
    output = torch.randn(n, side * side, 640)
    plan = InjectionPlan(found=correspondences(features, masks, [0, 1]), grid=(side, side), first=5, last=16, alpha=0.8)
    state = SimpleNamespace(in_vanilla_pass=False, step=6, groups=1, n=n)
    out = _injection_hook(state, plan)(None, (), output.clone())
    expected = REFERENCE_INJECTION
    assert [float(out[i].sum()) for i in range(n)] == pytest.approx(expected["row_sums"], abs=2e-2)
    positions = ((0, 4 * 32 + 4, 0), (1, 300, 5), (2, 10 * 32 + 10, 7), (3, 12 * 32 + 12, 100))
    assert [float(out[p]) for p in positions] == pytest.approx(expected["values"], abs=1e-5)
    assert [int(((out[i] - output[i]).abs().amax(-1) > 0).sum()) for i in range(n)] == expected["changed"]


def test_vanilla_query_strengths_equal_the_reference():
    """The reference's QueryStore at 50 steps: t_range [0, 5], strengths linspace(0.9, 0.81836735, 6),
    injected only where extended attention runs (steps >= 1): 0.88367347 .. 0.81836735 at steps 1..5."""
    reference = [0.88367347, 0.86734694, 0.85102041, 0.83469388, 0.81836735]
    state = SubjectState(n=2, groups=2, anchors=[0], positions=[[1]] * 2, steps=50, blend_steps=50 // 10)
    strengths = []
    for step in range(8):
        state.step = step
        strengths.append(state.blend_strength())
    assert strengths[0] is None and strengths[6:] == [None, None]
    assert strengths[1:6] == pytest.approx(reference, abs=1e-8)
