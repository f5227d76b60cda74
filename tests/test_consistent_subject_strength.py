"""consistent_subject acts enough, not only at all: the non-anchor rows' shared attention outputs move
toward the anchors' by a stated margin (sharing off is the control), for generated anchors and for a
real-image anchor; and the shared attention runs through scaled_dot_product_attention.

The measure: in every shared layer call, the same hidden states go through the shared processor
and through the stock one (sharing off). For each non-anchor row of the conditional half, each
token's output is matched to its most similar anchor token output (cosine); ``closure`` is the share
of the remaining gap to 1 that sharing closes: (sim_on - sim_off) / (1 - sim_off), averaged over
rows, layers and steps. On the tiny pipelines (SD / SDXL-shaped) the faithful implementation closes
0.39 / 0.35 of the gap; sharing scaled down 2x (a -log 2 bias on the anchor keys) 0.24 / 0.23 and
10x 0.05 / 0.06: both fail the 0.25 margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.methods.consistent_subject import ConsistentSubject, SubjectAttentionProcessor
from consistent_diffusion.methods.consistent_subject import attention as sharing
from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a cat on grass", "a cat in snow", "a cat at home", "a cat in a box"]
MARGIN = 0.25  # least share of the gap to the anchors that sharing must close


def _context(pipe, prompts=PROMPTS, steps=6) -> GenerationContext:
    return GenerationContext(
        pipe=pipe, prompts=list(prompts), negative_prompts=None,
        generators=[torch.Generator().manual_seed(s) for s in range(len(prompts))],
        call_kwargs={"num_inference_steps": steps, "guidance_scale": 5.0, "height": 32, "width": 32},
    )


def _nearest_anchor_similarity(out: torch.Tensor, state, row: int) -> torch.Tensor:
    """out: (groups * rows, tokens, C). Mean over the row's tokens of the best cosine to an anchor token."""
    rows = out.reshape(state.groups, -1, *out.shape[1:])[-1]  # conditional half (rows, tokens, C)
    offset = rows.shape[0] - state.n
    anchors = rows[[offset + a for a in state.anchors]].reshape(-1, rows.shape[-1])
    cosine = F.cosine_similarity(rows[offset + row][:, None, :], anchors[None], dim=-1)  # (tokens, A * tokens)
    return cosine.max(dim=-1).values.mean()


def _closure(monkeypatch, pipe, method, prompts=PROMPTS, weaken: float = 0.0) -> float:
    """The mean share of the gap to the anchors closed by sharing (see the module docstring).
    ``weaken``: subtracted from the anchor keys' bias (log 10: sharing scaled down 10x)."""
    closed: list[float] = []
    shared, key_blocks = SubjectAttentionProcessor._shared, SubjectAttentionProcessor.key_blocks

    def weakened_blocks(self, key, value):
        return [(k, v, bias - weaken) for k, v, bias in key_blocks(self, key, value)]

    def measured(self, attn, hidden_states):
        on = shared(self, attn, hidden_states)
        off = self.inner(attn, hidden_states)
        for row in range(self.state.n):
            if row in self.state.anchors:
                continue
            sim_on, sim_off = (_nearest_anchor_similarity(x, self.state, row) for x in (on, off))
            closed.append(float((sim_on - sim_off) / (1 - sim_off).clamp_min(1e-6)))
        return on

    monkeypatch.setattr(SubjectAttentionProcessor, "_shared", measured)
    monkeypatch.setattr(SubjectAttentionProcessor, "key_blocks", weakened_blocks)
    run(_context(pipe, prompts), [method], output_type="latent")
    monkeypatch.undo()
    assert closed, "no shared layer ran"
    return float(np.mean(closed))


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_non_anchor_rows_move_toward_the_anchors_by_a_margin(monkeypatch, make):
    pipe = make()
    faithful = _closure(monkeypatch, pipe, ConsistentSubject(subject="cat"))
    assert faithful >= MARGIN, f"sharing closes only {faithful:.3f} of the gap to the anchors"
    weak = _closure(monkeypatch, pipe, ConsistentSubject(subject="cat"), weaken=math.log(10))
    assert weak < MARGIN, "the measure must tell sharing scaled down 10x from the faithful one"


def test_a_real_anchor_pulls_the_series_and_sharing_off_is_plain(monkeypatch, tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "subject.png"
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(path)
    pipe = tiny_sd_pipeline()
    options = {"subject": "cat", "reference_image": str(path), "reference_image_prompt": "a cat"}
    prompts = PROMPTS[:3]
    plain = run(_context(pipe, prompts), [], output_type="latent")
    off = run(_context(pipe, prompts), [ConsistentSubject(share=False, **options)], output_type="latent")
    assert all(torch.equal(a, b) for a, b in zip(plain, off, strict=True)), "sharing off: the stock images"
    closure = _closure(monkeypatch, pipe, ConsistentSubject(**options), prompts)
    assert closure >= MARGIN, f"the real anchor closes only {closure:.3f} of the gap"
    weak = _closure(monkeypatch, pipe, ConsistentSubject(**options), prompts, weaken=math.log(10))
    assert weak < MARGIN


def test_shared_attention_runs_through_sdpa_with_an_additive_mask(monkeypatch):
    """No materialised score matrix in the shared layers: every shared call is one SDPA call with a
    float attn_mask (0 / -inf), and its output equals the explicit masked softmax within 1e-5."""
    calls: list[torch.Tensor | None] = []
    inside: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        if not inside:  # the text encoder's, the VAE's, the stock processors' calls
            return out
        calls.append(attn_mask)
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) * scale + (attn_mask if attn_mask is not None else 0)
        assert torch.allclose(out, scores.softmax(-1) @ v, atol=1e-5)
        return out

    monkeypatch.setattr(sharing.F, "scaled_dot_product_attention", spy)
    processor_calls = []
    shared = SubjectAttentionProcessor._shared

    def counted(self, attn, hidden_states):
        processor_calls.append(self.name)
        before = len(calls)
        inside.append(True)
        try:
            out = shared(self, attn, hidden_states)
        finally:
            inside.pop()
        assert len(calls) == before + 1
        return out

    monkeypatch.setattr(SubjectAttentionProcessor, "_shared", counted)
    run(_context(tiny_sd_pipeline()), [ConsistentSubject(subject="cat", mask_dropout=0.0)], output_type="latent")
    assert processor_calls and len(calls) == len(processor_calls)
    assert all(mask is not None and mask.dtype.is_floating_point for mask in calls)
    assert any(bool(torch.isinf(mask).any()) for mask in calls), "the -inf bias hides masked anchor tokens"


def test_subject_maps_are_at_least_16x16_where_the_unet_has_them():
    """The map grid: the short side nearest max(16, latent / 4): SDXL at 1024 px -> 32x32 (the
    reference's), SD 1.5 at 512 -> 16x16, the embedded model's 16x16 latents -> 16x16 (8x8 maps there
    mark the border, not the subject)."""
    from types import SimpleNamespace

    from consistent_diffusion.methods.consistent_subject.attention import choose_map_level

    def unet(levels_with_cross: list[int]) -> SimpleNamespace:
        names = [f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.processor" for i in levels_with_cross]
        return SimpleNamespace(down_blocks=[0, 1, 2, 3], up_blocks=[0, 1, 2, 3], attn_processors=dict.fromkeys(names))

    sdxl, sd15, embedded = unet([1, 2]), unet([0, 1, 2]), unet([0, 1])
    assert choose_map_level(sdxl, (128, 128)) == 2  # 128 / 2**2 = 32
    assert choose_map_level(sd15, (64, 64)) == 2  # 16x16
    assert choose_map_level(embedded, (16, 16)) == 0  # 16x16, not 8x8
