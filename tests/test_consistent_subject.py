"""consistent_subject: ConsiStory's subject-driven shared attention and StoryDiffusion's variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.methods.consistent_subject import (
    ConsistentSubject,
    SubjectAttentionProcessor,
    SubjectMapRecorder,
    SubjectState,
    extended_attention,
    installed_subject_sharing,
    keep_mask,
    masks_from_maps,
    otsu_threshold,
    subject_token_positions,
)
from consistent_diffusion.methods.style_aligned import StyleAligned
from consistent_diffusion.series import SeriesConfig, generate_series
from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a cat on grass", "a cat in snow", "a cat at home", "a dog"]


def _context(pipe, prompts=PROMPTS, steps=6, seeds=None, **call_kwargs) -> GenerationContext:
    seeds = seeds if seeds is not None else range(len(prompts))
    return GenerationContext(
        pipe=pipe, prompts=list(prompts), negative_prompts=None,
        generators=[torch.Generator().manual_seed(s) for s in seeds],
        call_kwargs={"num_inference_steps": steps, "guidance_scale": 5.0, "height": 32, "width": 32, **call_kwargs},
    )


def _latents(pipe, methods, **kwargs):
    return [x.float() for x in run(_context(pipe, **kwargs), methods, output_type="latent")]


# -- masks -------------------------------------------------------------------------------------


def test_the_mask_is_where_queries_attend_to_the_subject_token():
    """A cross-attention layer built so that the top-left quarter of a 4x4 grid attends to text token
    2 (the subject) and the rest to token 1: the recorded map, thresholded, is that quarter."""
    attn = Attention(query_dim=4, cross_attention_dim=4, heads=1, dim_head=4, bias=False)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(4))
        attn.to_k.weight.copy_(torch.eye(4))
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True
    hidden = torch.where(region.reshape(16, 1), torch.tensor([3.0, 0, 0, 0]), torch.tensor([0, 3.0, 0, 0])).unsqueeze(0)
    text = torch.tensor([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0]]).unsqueeze(0)  # start, other, subject
    state = SubjectState(n=1, groups=1, anchors=[0], positions=[[2]], steps=10, map_level=0, latent_size=(4, 4))
    recorder = SubjectMapRecorder(state, attn.processor, level=0)
    out = recorder(attn, hidden, text)
    assert torch.equal(out, attn.processor(attn, hidden, text)), "the output is the inner processor's"
    masks = masks_from_maps(state.layer_maps[0], (4, 4), [(4, 4), (8, 8)])
    assert torch.equal(masks[(4, 4)][0], region.flatten())
    upsampled = masks[(8, 8)][0].reshape(8, 8)
    assert upsampled[:3, :3].all() and not upsampled[5:, :].any() and not upsampled[:, 5:].any()


def test_otsu_splits_two_groups_and_a_flat_map_gives_no_mask():
    values = torch.tensor([0.1] * 30 + [0.9] * 10)
    threshold = otsu_threshold(values)
    assert 0.1 < threshold < 0.9
    assert masks_from_maps(torch.full((1, 16), 0.3), (4, 4), [(4, 4)])[(4, 4)].sum() == 0


def test_subject_tokens_are_found_in_each_prompt():
    from consistent_diffusion.models.embedded import load_text_encoder

    tokenizer, _ = load_text_encoder(max_length=16)  # the embedded model's MiniLM (BERT word pieces)
    positions = subject_token_positions(tokenizer, ["a red heart, twitter style", "red heart", "a cat"], "red heart")
    assert positions == [[2, 3], [1, 2], []]  # [CLS] is position 0
    clip = tiny_sd_pipeline().tokenizer
    found = subject_token_positions(clip, PROMPTS, "cat")
    assert all(found[:3]) and found[3] == []
    ids = clip(PROMPTS[0], padding="max_length", max_length=clip.model_max_length).input_ids
    assert [ids[p] for p in found[0]] == clip("cat", add_special_tokens=False).input_ids


def test_mask_dropout_hides_about_p_of_the_patches_reproducibly():
    mask = torch.ones(4096, dtype=torch.bool)
    kept = keep_mask(mask, 0.5, seed=0, step=3, grid=(64, 64), anchor=1)
    assert 0.45 < kept.float().mean() < 0.55
    assert torch.equal(kept, keep_mask(mask, 0.5, seed=0, step=3, grid=(64, 64), anchor=1))
    assert not torch.equal(kept, keep_mask(mask, 0.5, seed=0, step=4, grid=(64, 64), anchor=1)), "redrawn per step"
    assert torch.equal(keep_mask(mask, 0.0, 0, 0, (64, 64), 0), mask)


# -- the shared attention ------------------------------------------------------------------------


def test_shared_attention_is_the_papers_masked_softmax():
    """softmax(Q_i [K_i ; K_a]^T / sqrt(d) + log M) [V_i ; V_a], by hand, per row and CFG half."""
    torch.manual_seed(0)
    groups, rows, tokens, channels, heads = 2, 4, 6, 8, 2
    q, k, v = (torch.randn(groups, rows, tokens, channels) for _ in range(3))
    state = SubjectState(n=3, groups=groups, anchors=[0, 1], positions=[[1]] * 3, steps=10, latent_size=(2, 3), step=2)
    state.share_levels = {0}
    visible = torch.rand(2, tokens) > 0.4
    state.visible = {(2, 3): visible}
    processor = SubjectAttentionProcessor(state, None, "up_blocks.0.attn1", level=0)
    out = extended_attention(q, k, v, processor.key_blocks(k, v), heads=heads)
    offset = rows - state.n  # row 0 belongs to a method stacked later (not shared)
    for g in range(groups):
        for i in range(rows):
            keys, values = [k[g, i]], [v[g, i]]
            if i >= offset:
                for j, anchor in enumerate(state.anchors):
                    if offset + anchor != i:
                        keys.append(k[g, offset + anchor][visible[j]])
                        values.append(v[g, offset + anchor][visible[j]])
            kk, vv = torch.cat(keys), torch.cat(values)
            expected = []
            for h in range(heads):
                part = slice(h * channels // heads, (h + 1) * channels // heads)
                weights = (q[g, i][:, part] @ kk[:, part].T / (channels // heads) ** 0.5).softmax(-1)
                expected.append(weights @ vv[:, part])
            assert torch.allclose(out[g, i], torch.cat(expected, dim=-1), atol=1e-5), (g, i)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_sharing_disabled_is_stock_bit_for_bit_and_enabled_acts(request, fixture):
    pipe = request.getfixturevalue(fixture)
    plain = _latents(pipe, [])
    off = _latents(pipe, [ConsistentSubject(subject="cat", share=False)])
    assert all(torch.equal(a, b) for a, b in zip(plain, off, strict=True))
    on = _latents(pipe, [ConsistentSubject(subject="cat")])
    assert max(float((a - b).abs().max()) for a, b in zip(plain[2:3], on[2:3], strict=True)) > 1e-5, "non-anchor changed"


def test_processors_and_hook_are_removed_after_an_exception(tiny_sd, monkeypatch):
    original = dict(tiny_sd.unet.attn_processors)
    method = ConsistentSubject(subject="cat")
    calls = {"n": 0}
    real_step = tiny_sd.scheduler.step

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tiny_sd.scheduler, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        run(_context(tiny_sd), [method])
    assert all(tiny_sd.unet.attn_processors[k] is v for k, v in original.items())
    assert not tiny_sd.unet._forward_pre_hooks


def test_masks_come_only_for_rows_naming_the_subject(tiny_sd):
    ctx = _context(tiny_sd)
    positions = subject_token_positions(tiny_sd.tokenizer, ctx.prompts, "cat")
    state = SubjectState(n=4, groups=2, anchors=[0, 1], positions=positions, steps=6, map_level=1, latent_size=(4, 4))
    with installed_subject_sharing(tiny_sd.unet, state, ("up",)):
        run(ctx, [], output_type="latent")
    assert state.step == 5 and len(state.step_maps) == 5, "one mean map per finished step"
    masks = next(iter(state.masks.values()))
    assert masks[:3].any(dim=1).all() and not masks[3].any(), "the dog's prompt has no cat"


def test_anchors_do_not_depend_on_the_rest_of_the_batch(tiny_sd):
    method = ConsistentSubject(subject="cat")
    small = _latents(tiny_sd, [method], prompts=PROMPTS[:3])
    large = _latents(tiny_sd, [method], prompts=[*PROMPTS, "a cat in a box"])
    for a, b in zip(small[:2], large[:2], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_series_over_several_batches_keeps_the_same_anchors(tiny_sd):
    config = SeriesConfig(prompts=("a cat on grass", "a cat in snow", "a cat in a box"), seeds=(0, 1), steps=4,
                          height=32, width=32, batch_size=6)
    one = generate_series(tiny_sd, config, [ConsistentSubject(subject="cat")], progress=False).images
    from dataclasses import replace

    split = generate_series(tiny_sd, replace(config, batch_size=2), [ConsistentSubject(subject="cat")],
                            progress=False).images
    for a, b in zip(one, split, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_vanilla_queries_change_the_early_steps(tiny_sd):
    steps = 20  # blend steps 1..2
    with_blend = _latents(tiny_sd, [ConsistentSubject(subject="cat")], steps=steps)
    without = _latents(tiny_sd, [ConsistentSubject(subject="cat", vanilla_queries=False)], steps=steps)
    assert max(float((a - b).abs().max()) for a, b in zip(with_blend, without, strict=True)) > 1e-6


def test_story_mode_shares_sampled_tokens_without_masks(tiny_sd):
    plain = _latents(tiny_sd, [])
    story = _latents(tiny_sd, [ConsistentSubject(mode="story", anchors=4)])
    assert max(float((a - b).abs().max()) for a, b in zip(plain, story, strict=True)) > 1e-5


# -- anchors from a real image, composition ---------------------------------------------------


@pytest.fixture
def reference(tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "subject.png"
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_a_real_reference_is_the_anchor(make, reference):
    pipe = make()
    method = ConsistentSubject(subject="cat", reference_image=str(reference), reference_image_prompt="a cat")
    latents = _latents(pipe, [method], prompts=PROMPTS[:2])
    assert len(latents) == 2, "the reference row is internal"
    plain = _latents(pipe, [], prompts=PROMPTS[:2])
    assert max(float((a - b).abs().max()) for a, b in zip(plain, latents, strict=True)) > 1e-5
    assert method.describe()["sampling"]["reference_trajectory"] == "inversion"
    with pytest.raises(ConfigError, match="must name the subject"):
        ConsistentSubject(subject="dog", reference_image=str(reference), reference_image_prompt="a cat")


def test_stacks_with_style_aligned_after_it_and_refuses_the_other_order(tiny_sd):
    subject, style = ConsistentSubject(subject="cat"), StyleAligned(reference_prompt="a green triangle")
    both = _latents(tiny_sd, [subject, style])
    only_style = _latents(tiny_sd, [style])
    only_subject = _latents(tiny_sd, [subject])
    assert len(both) == 4
    assert max(float((a - b).abs().max()) for a, b in zip(both[2:], only_style[2:], strict=True)) > 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(both[2:], only_subject[2:], strict=True)) > 1e-6
    with pytest.raises(ConfigError, match="before style_aligned"):
        run(_context(tiny_sd), [style, subject])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of subject"),
        ({"subject": "cat", "subject_tokens": (1,)}, "exactly one of subject"),
        ({"subject": "cat", "mask_dropout": 1.0}, "mask_dropout"),
        ({"subject": "cat", "mode": "tale"}, "mode must be one of"),
        ({"subject": "cat", "anchors": -1}, "anchors"),
        ({"subject": "cat", "share_parts": ("top",)}, "share_parts"),
        ({"mode": "story", "sample_rate": 0.0}, "sample_rate"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        ConsistentSubject(**options)


def test_no_anchor_naming_the_subject_is_an_error(tiny_sd):
    with pytest.raises(ConfigError, match="no anchor prompt names the subject"):
        run(_context(tiny_sd, prompts=["a dog", "a cow", "a cat"]), [ConsistentSubject(subject="cat")])


def test_masks_average_the_last_window_steps():
    from consistent_diffusion.methods.consistent_subject.attention import _update_masks

    left, right = torch.zeros(1, 16), torch.zeros(1, 16)
    left.view(4, 4)[:, :2] = 1.0
    right.view(4, 4)[:, 3:] = 1.0
    for window, expected_columns in ((1, [3]), (2, [0, 1, 3])):
        state = SubjectState(n=1, groups=1, anchors=[0], positions=[[1]], steps=10, window=window, map_level=0,
                             latent_size=(4, 4), step=2, dropout=0.0)
        state.share_levels = {0}
        state.step_maps = [left, right]
        _update_masks(state)
        columns = state.masks[(4, 4)][0].view(4, 4).any(dim=0).nonzero().flatten().tolist()
        assert columns == expected_columns, window
        assert torch.equal(state.visible[(4, 4)][0], state.masks[(4, 4)][0]), "no dropout at p = 0"


def test_cli_stacks_subject_before_style_and_the_manifest_replays(tiny_sd_folder, tmp_path):
    import json

    from consistent_diffusion.cli.main import main

    out = tmp_path / "series"
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a cat on grass", "--prompt", "a cat in snow",
                 "--seeds", "0", "1", "--steps", "3", "--quiet", "--subject", "cat", "--subject-anchors", "1",
                 "--style-aligned", "--batch-size", "2", "--out", str(out)]) == 0
    methods = json.loads((out / "manifest.json").read_text())["methods"]
    assert [m["name"] for m in methods] == ["consistent_subject", "style_aligned"]
    assert methods[0]["options"]["subject"] == "cat" and methods[0]["options"]["anchors"] == 1
    assert main(["generate", "--from-manifest", str(out / "manifest.json"), "--quiet", "--out", str(tmp_path / "again")]) == 0
    for name in ("p00_s0000.png", "p01_s0001.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "again" / name)))
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a cat", "--subject-reference-image",
                 str(tmp_path / "x.png"), "--out", str(tmp_path / "bad")]) == 2


# -- feature injection ---------------------------------------------------------------------------


def test_correspondences_match_the_nearest_subject_pixel_of_an_anchor():
    from consistent_diffusion.methods.consistent_subject.injection import correspondences

    torch.manual_seed(0)
    features = torch.randn(2, 8, 2, 2)  # row 0 is the anchor, row 1 the target
    features[1, :, 0, 0] = features[0, :, 1, 1]  # target pixel 0 copies anchor pixel 3
    masks = torch.tensor([[False, False, True, True], [True, True, False, True]])
    found = correspondences(features, masks, anchors=[0])
    assert 0 not in found.apply, "an anchor with no other anchor injects nothing"
    assert found.source_row[1].tolist() == [0, 0, 0, 0]
    assert found.source_pixel[1][0] == 3
    assert set(found.source_pixel[1].tolist()) <= {2, 3}, "sources lie inside the anchor's mask"
    assert not found.apply[1][2], "outside the target's mask nothing is injected"
    assert found.apply[1][0], "the exact match is below the Otsu threshold"


def test_gaussian_smoothing_keeps_a_constant_inside_and_sums_to_one():
    from consistent_diffusion.methods.consistent_subject.injection import gaussian_smooth

    smoothed = gaussian_smooth(torch.ones(1, 3, 5, 5))
    assert torch.allclose(smoothed[..., 1:-1, 1:-1], torch.ones(1, 3, 3, 3), atol=1e-6)
    assert smoothed[0, 0, 0, 0] < 1, "zero padding at the border, as the reference"


def test_feature_injection_acts_and_its_first_pass_rewinds_the_noise(tiny_sd):
    plain_sharing = _latents(tiny_sd, [ConsistentSubject(subject="cat")], steps=12)
    injected = _latents(tiny_sd, [ConsistentSubject(subject="cat", feature_injection=True)], steps=12)
    assert max(float((a - b).abs().max()) for a, b in zip(plain_sharing, injected, strict=True)) > 1e-5
    again = _latents(tiny_sd, [ConsistentSubject(subject="cat", feature_injection=True)], steps=12)
    assert all(torch.equal(a, b) for a, b in zip(injected, again, strict=True))
    # alpha 0 blends nothing in: what is left is the second pass, from the same noise as without injection
    zero = _latents(tiny_sd, [ConsistentSubject(subject="cat", feature_injection=True, injection_alpha=0.0)], steps=12)
    assert all(torch.equal(a, b) for a, b in zip(plain_sharing, zero, strict=True))


def test_subject_style_controlnet_and_lora_stack(tmp_path):
    """Subject from the anchors, style from a generated reference, a ControlNet and a LoRA, in one
    series: every part is active during the call and everything is restored after it."""
    from _finetune_data import COLOURS, instance_folder, random_controlnet, shape_image, step_spy
    from consistent_diffusion.methods.controlnet import ControlNet
    from consistent_diffusion.methods.lora import LoRA
    from consistent_diffusion.methods.style_aligned import SharedAttentionProcessor
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora

    lora = train_lora(LoraDreamBoothConfig(out=tmp_path / "lora", instance_dir=instance_folder(tmp_path),
                                           instance_prompt="a photo of sks cat", steps=2, learning_rate=1e-2,
                                           progress=False), tiny_sd_pipeline()).result
    pipe = tiny_sd_pipeline()
    original = dict(pipe.unet.attn_processors)
    seen: dict = {}

    def spy(pipeline, step, timestep, callback_kwargs):
        processors = list(pipeline.unet.attn_processors.values())
        seen["style"] = any(isinstance(p, SharedAttentionProcessor) for p in processors)
        seen["subject"] = any(isinstance(getattr(p, "inner", None), SubjectAttentionProcessor) for p in processors)
        seen["lora"] = any("lora" in n for n, _ in pipeline.unet.named_parameters())
        seen["controlnet"] = type(pipeline).__name__
        return callback_kwargs

    methods = [
        ConsistentSubject(subject="cat"),
        StyleAligned(reference_prompt="a green triangle"),
        ControlNet(controlnets=random_controlnet(pipe), images=shape_image("circle", COLOURS["red"], 32)),
        LoRA(weights=str(lora), scales=0.8),
    ]
    config = SeriesConfig(prompts=("a cat on grass", "a cat in snow"), seeds=(0, 1), steps=3, batch_size=4)
    result = generate_series(pipe, config, [*methods, step_spy(spy)], progress=False)
    assert len(result.images) == 4
    assert seen == {"style": True, "subject": True, "lora": True, "controlnet": "StableDiffusionControlNetPipeline"}
    assert all(pipe.unet.attn_processors[k] is v for k, v in original.items()), "everything restored"
    assert not pipe.unet._forward_pre_hooks
