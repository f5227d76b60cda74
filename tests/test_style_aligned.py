"""StyleAligned: the attention math against naive oracles, reversible installation, the reference."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods import GenerationContext
from consistent_diffusion.methods.style_aligned import (
    SharedAttentionProcessor,
    StyleAligned,
    _switch_vector,
    adain,
    calc_mean_std,
    shared_attention,
    shared_group_norm,
)


def _generate(pipe, methods, prompts, seeds, output_type="np", **kwargs):
    call = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32, **kwargs}
    ctx = GenerationContext(pipe, list(prompts), None, [torch.Generator().manual_seed(s) for s in seeds], call)
    with contextlib.ExitStack() as stack:
        for method in methods:
            stack.enter_context(method.applied(ctx))
        out = ctx.pipe(prompt=ctx.prompts, negative_prompt=ctx.negative_prompts, generator=ctx.generators,
                       output_type=output_type, **ctx.call_kwargs)
    return out.images, ctx.num_internal


def test_adain_gives_the_reference_statistics():
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 50, 8) * 3 + 1
    ref = torch.randn(2, 1, 50, 8) * 0.5 - 2
    out = adain(feat, ref)
    mean, std = calc_mean_std(out)
    ref_mean, ref_std = calc_mean_std(ref)
    assert torch.allclose(mean, ref_mean.expand_as(mean), atol=1e-5)
    assert torch.allclose(std, ref_std.expand_as(std), atol=1e-4)
    assert not torch.allclose(calc_mean_std(feat)[1], ref_std.expand_as(std), atol=1e-1)


def test_adain_against_a_hand_computation():
    """AdaIN(x, y) = std(y) (x - mean(x)) / std(x) + mean(y), per channel over the tokens
    (population std, sqrt(var + eps)). Three tokens, two channels:

    channel 0: x = [1, 3, 2] (mean 2, var 2/3), y = [10, 14, 12] (mean 12, var 8/3): gain 2,
               so AdaIN = 2 (x - 2) + 12 = [10, 14, 12];
    channel 1: x = [0, 0, 6] (mean 2, var 8), y = [1, 1, 1] (mean 1, var 0): every token becomes 1.
    """
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 6.0]])  # (tokens, channels)
    y = torch.tensor([[10.0, 1.0], [14.0, 1.0], [12.0, 1.0]])
    mean, std = calc_mean_std(x, eps=0.0)
    assert mean[0].tolist() == pytest.approx([2.0, 2.0])
    assert std[0].tolist() == pytest.approx([(2 / 3) ** 0.5, 8**0.5])
    out = adain(x, y, eps=0.0)
    assert out[:, 0].tolist() == pytest.approx([10.0, 14.0, 12.0], abs=1e-5)
    assert out[:, 1].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    # with the default eps = 1e-5 the gain of channel 0 is sqrt((8/3 + eps) / (2/3 + eps))
    gain = ((8 / 3 + 1e-5) / (2 / 3 + 1e-5)) ** 0.5
    assert adain(x, y)[:, 0].tolist() == pytest.approx([12 - gain, 12 + gain, 12.0], abs=1e-5)


def _heads(x, heads=2):
    """(tokens, heads * dim) -> (heads, tokens, dim)"""
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)


def _naive_row(q, k_own, v_own, k_ref, v_ref, scale_keys=1.0, shift=0.0, heads=2):
    """softmax([q k_own^T, q (s k_ref)^T + shift] / sqrt(d)) [v_own; v_ref], per head, written out."""
    q, k_own, v_own, k_ref, v_ref = (_heads(x, heads) for x in (q, k_own, v_own, k_ref, v_ref))
    d = q.shape[-1]
    logits_own = q @ k_own.transpose(-1, -2) / d**0.5
    logits_ref = q @ (scale_keys * k_ref).transpose(-1, -2) / d**0.5 + shift
    probs = torch.cat([logits_own, logits_ref], -1).softmax(-1)
    out = probs @ torch.cat([v_own, v_ref], -2)
    return out.transpose(0, 1).reshape(out.shape[1], -1)


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (0.7, 0.0), (1.0, 1.5), (1.3, -0.5)])
def test_shared_attention_matches_a_naive_oracle(scale, shift):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))  # 2 heads of 4
    options = StyleAligned(adain_queries=True, adain_keys=True, adain_values=True, shared_score_scale=scale,
                           shared_score_shift=shift)
    out = shared_attention(q, k, v, options, heads=2)
    assert out.shape == q.shape
    for g in range(2):
        ref_q, ref_k, ref_v = q[g, 0], k[g, 0], v[g, 0]
        # the reference attends to itself only
        expected_ref = (_heads(ref_q) @ _heads(ref_k).transpose(-1, -2) / 2).softmax(-1) @ _heads(ref_v)
        assert torch.allclose(out[g, 0], expected_ref.transpose(0, 1).reshape(10, 8), atol=1e-10)
        for i in (1, 2):
            qi, ki, vi = adain(q[g, i], ref_q), adain(k[g, i], ref_k), adain(v[g, i], ref_v)
            expected = _naive_row(qi, ki, vi, ref_k, ref_v, scale, shift)
            assert torch.allclose(out[g, i], expected, atol=1e-10)


def test_full_attention_share_attends_to_every_image():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    options = StyleAligned(full_attention_share=True, adain_queries=False, adain_keys=False)
    out = shared_attention(q, k, v, options, heads=1)
    keys, values = k[0].reshape(15, 4), v[0].reshape(15, 4)
    for i in (1, 2):
        expected = (q[0, i] @ keys.T / 2).softmax(-1) @ values
        assert torch.allclose(out[0, i], expected, atol=1e-10)


def test_shared_keys_grow_linearly_not_with_the_batch(monkeypatch):
    import consistent_diffusion.methods.style_aligned.attention as sa

    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        shapes.append(tuple(k.shape))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sa.F, "scaled_dot_product_attention", spy)
    q = k = v = torch.randn(2, 6, 9, 8)
    shared_attention(q, k, v, StyleAligned(), heads=2)
    assert shapes == [(12, 2, 18, 4)]  # one call; every image sees 2n keys, whatever the batch size


def test_shared_group_norm_pools_statistics_with_the_reference():
    torch.manual_seed(3)
    norm = torch.nn.GroupNorm(2, 4)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(6, 4, 5, 5) * torch.arange(1, 7).view(6, 1, 1, 1)  # 2 CFG halves of 3
    out = shared_group_norm(norm, x, per_group=3)
    for ref, i in ((0, 1), (0, 2), (3, 4), (3, 5)):
        joined = torch.cat([x[i], x[ref]], dim=-1).unsqueeze(0)  # the reference code concatenates along space
        expected = F.group_norm(joined, 2, norm.weight, norm.bias, norm.eps)[..., :5]
        assert torch.allclose(out[i], expected[0], atol=1e-5)


def test_switch_vector_leaves_the_asked_fraction_unshared():
    assert _switch_vector(8, 0.0) == [False] * 8
    assert _switch_vector(8, 1.0) == [True] * 8
    assert sum(_switch_vector(8, 0.25)) == 2
    assert sum(_switch_vector(8, 0.75)) == 6
    assert sum(_switch_vector(2, 0.5)) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shared_score_scale": 0}, "shared_score_scale must be a finite number > 0, got 0"),
        ({"shared_score_shift": float("nan")}, "shared_score_shift must be a finite number"),
        ({"only_self_level": 1.5}, r"only_self_level must be a fraction in \[0, 1\], got 1.5"),
        ({"adain_keys": "yes"}, "adain_keys must be True or False, got 'yes'"),
        ({"reference_prompt": "a", "reference_image": "b.png"}, "at most one StyleAligned reference source"),
        ({"reference_seed": 1.5}, "reference_seed must be an integer"),
        ({"min_shared_tokens": -1}, "min_shared_tokens must be an integer >= 0, got -1"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StyleAligned(**kwargs)


def test_disabled_sharing_equals_stock_processors_bit_for_bit(tiny_sd):
    plain, _ = _generate(tiny_sd, [], ["a", "b", "c"], [1, 2, 3])
    off = StyleAligned(share_attention=False, adain_queries=False, adain_keys=False, share_group_norm=False)
    shared_off, _ = _generate(tiny_sd, [off], ["a", "b", "c"], [1, 2, 3])
    assert np.array_equal(plain, shared_off)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_reference_unchanged_others_changed(request, fixture):
    pipe = request.getfixturevalue(fixture)
    plain, _ = _generate(pipe, [], ["a red cat", "b", "c"], [1, 2, 3])
    shared, internal = _generate(pipe, [StyleAligned()], ["a red cat", "b", "c"], [1, 2, 3])
    assert internal == 0
    assert np.abs(plain[0] - shared[0]).max() < 1e-5  # the reference never sees the others
    assert np.abs(plain[1] - shared[1]).max() > 1e-3 and np.abs(plain[2] - shared[2]).max() > 1e-3


def test_internal_reference_prompt_is_prepended_and_not_returned(tiny_sd):
    alone, _ = _generate(tiny_sd, [], ["the style"], [7])
    images, internal = _generate(tiny_sd, [StyleAligned(reference_prompt="the style", reference_seed=7)],
                                 ["a", "b"], [1, 2])
    assert internal == 1 and len(images) == 3
    assert np.abs(images[0] - alone[0]).max() < 1e-5  # the internal entry is the plain reference


def test_processors_and_hooks_restored_even_on_error(tiny_sd):
    unet = tiny_sd.unet
    before = dict(unet.attn_processors)
    ctx = GenerationContext(tiny_sd, ["a", "b"], None, [torch.Generator(), torch.Generator()],
                            {"num_inference_steps": 2})
    with pytest.raises(RuntimeError, match="boom"), StyleAligned(reference_prompt="r").applied(ctx):
        shared = [p for p in unet.attn_processors.values() if isinstance(p, SharedAttentionProcessor)]
        assert len(shared) == sum(name.endswith("attn1.processor") for name in before) > 0
        assert any(m._forward_hooks for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
        assert ctx.prompts == ["r", "a", "b"]
        raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert not any(m._forward_hooks for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    assert ctx.prompts == ["a", "b"] and len(ctx.generators) == 2 and ctx.call_kwargs == {"num_inference_steps": 2}


def test_only_self_level_shares_a_fraction_of_layers(tiny_sd):
    unet = tiny_sd.unet
    with StyleAligned(only_self_level=0.5).installed(unet, per_group=2):
        kinds = [type(p).__name__ for n, p in unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert kinds.count("SharedAttentionProcessor") == len(kinds) // 2 and len(kinds) >= 2


def test_share_parts_shares_only_the_named_unet_parts(tiny_sd):
    unet = tiny_sd.unet
    with StyleAligned(share_parts=["up"]).installed(unet, per_group=2):
        shared = {n.split(".")[0] for n, p in unet.attn_processors.items() if isinstance(p, SharedAttentionProcessor)}
    assert shared == {"up_blocks"}
    with pytest.raises(ConfigError, match="share_parts must name some of down, mid, up"):
        StyleAligned(share_parts=["decoder"])


def test_min_shared_tokens_leaves_smaller_layers_unshared(tiny_sd):
    # every self-attention layer of the tiny UNet works on 8x8 = 64 tokens
    plain, _ = _generate(tiny_sd, [], ["a", "b"], [1, 2])
    above, _ = _generate(tiny_sd, [StyleAligned(share_group_norm=False, min_shared_tokens=65)], ["a", "b"], [1, 2])
    at, _ = _generate(tiny_sd, [StyleAligned(share_group_norm=False, min_shared_tokens=64)], ["a", "b"], [1, 2])
    assert np.array_equal(plain, above)
    assert np.abs(at[1] - plain[1]).max() > 1e-3


def test_loading_a_lora_while_active_keeps_the_processors(tiny_sd):
    from peft import LoraConfig

    unet = tiny_sd.unet
    before = dict(unet.attn_processors)
    with StyleAligned().installed(unet, per_group=2):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
        shared = [p for n, p in unet.attn_processors.items() if n.endswith("attn1.processor")]
        assert shared and all(isinstance(p, SharedAttentionProcessor) for p in shared)
        # the LoRA is live inside the shared processor: outputs change when it is disabled
        images_on, _ = _generate(tiny_sd, [], ["a", "b"], [1, 2])
        unet.disable_adapters()
        images_off, _ = _generate(tiny_sd, [], ["a", "b"], [1, 2])
        unet.enable_adapters()
        assert np.abs(images_on - images_off).max() > 1e-4
    assert all(unet.attn_processors[name] is before[name] for name in before)


def test_processors_replaced_while_active_are_left_with_a_warning(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_sd.unet
    with pytest.warns(UserWarning, match="replaced while it was active"), StyleAligned().installed(unet, 2):
        unet.set_attn_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())


def test_real_reference_follows_its_inverted_trajectory(tiny_sd):
    from consistent_diffusion.methods.inversion import invert

    rng = np.random.RandomState(4)
    real = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    inversion = invert(tiny_sd, real, "a painting", steps=3, cfg=3.0, generator=torch.Generator().manual_seed(0))
    method = StyleAligned(reference_inversion=inversion)
    latents, internal = _generate(tiny_sd, [method], ["a", "b"], [1, 2], output_type="latent", num_inference_steps=3)
    assert internal == 1 and latents.shape[0] == 3
    assert torch.allclose(latents[0].float(), inversion.x0[0], atol=1e-6)  # row 0 ends on the real image
    plain, _ = _generate(tiny_sd, [], ["a", "b"], [1, 2], output_type="latent", num_inference_steps=3)
    assert (latents[1:] - plain).abs().max() > 1e-3  # and the others were steered by it
    # the scheduler and processors are back
    assert type(tiny_sd.scheduler).__name__ == "DDIMScheduler"
    assert not any(isinstance(p, SharedAttentionProcessor) for p in tiny_sd.unet.attn_processors.values())


def _real_inversion(pipe, steps=3):
    from consistent_diffusion.methods.inversion import invert

    rng = np.random.RandomState(4)
    real = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    return invert(pipe, real, "a painting", steps=steps, cfg=3.0, generator=torch.Generator().manual_seed(0))


def test_real_reference_keeps_the_callers_ddim_scheduler_and_steps(tiny_sd):
    """Bug 2: the user's DDIM (here trailing spacing) and step count are kept; the reference is
    pinned to x_t redrawn from its x0 at those timesteps; describe() records what sampled."""
    import warnings

    from diffusers import DDIMScheduler

    inversion = _real_inversion(tiny_sd, steps=3)  # leading spacing, 3 steps
    tiny_sd.scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, timestep_spacing="trailing")
    expected = DDIMScheduler.from_config(tiny_sd.scheduler.config)
    expected.set_timesteps(4)
    seen = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    method = StyleAligned(reference_inversion=inversion)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            latents, internal = _generate(tiny_sd, [method], ["a", "b"], [1, 2], output_type="latent",
                                          num_inference_steps=4)
    finally:
        handle.remove()
    assert not [w for w in caught if "replaced" in str(w.message)]
    assert seen == expected.timesteps.tolist() == [999, 749, 499, 249]  # the caller's schedule
    assert internal == 1 and torch.allclose(latents[0].float(), inversion.x0[0], atol=1e-6)
    sampling = method.describe()["sampling"]
    assert sampling["sampler"] == "DDIMScheduler" and sampling["replaced"] is None and sampling["steps"] == 4
    assert sampling["timesteps"] == [999, 749, 499, 249]
    assert sampling["reference_trajectory"].startswith("redrawn from x0")
    assert isinstance(tiny_sd.scheduler, DDIMScheduler) and tiny_sd.scheduler.config.timestep_spacing == "trailing"


def test_real_reference_with_a_non_ddim_scheduler_swaps_explicitly_and_the_manifest_says_so(tiny_sd):
    """Bug 2: a scheduler that cannot pin a row is replaced by DDIM for the call, with a warning,
    and the manifest records the sampler that ran (not only the restored scheduler)."""
    from diffusers import EulerDiscreteScheduler

    from consistent_diffusion.series import SeriesConfig, generate_series

    inversion = _real_inversion(tiny_sd, steps=3)
    tiny_sd.scheduler = EulerDiscreteScheduler.from_config(tiny_sd.scheduler.config)
    config = SeriesConfig(prompts=("a", "b"), seeds=(0,), steps=3, guidance_scale=3.0, batch_size=2)
    with pytest.warns(UserWarning, match="EulerDiscreteScheduler is replaced by DDIM"):
        result = generate_series(tiny_sd, config, [StyleAligned(reference_inversion=inversion)], progress=False)
    sampling = result.manifest["methods"][0]["sampling"]
    assert sampling["sampler"] == "DDIMScheduler" and sampling["replaced"] == "EulerDiscreteScheduler"
    assert sampling["timesteps"] == [999, 500, 0] and sampling["eta"] == 0.0  # Euler's linspace spacing, kept
    assert sampling["reference_trajectory"].startswith("redrawn from x0")  # not the inversion's (leading) levels
    assert result.manifest["runtime"]["scheduler_class"] == "EulerDiscreteScheduler"  # restored after the call
    assert isinstance(tiny_sd.scheduler, EulerDiscreteScheduler)


@pytest.mark.slow
def test_style_aligned_raises_style_consistency_on_the_embedded_model():
    """Same prompts and seeds: StyleAligned's set agrees more in style than plain generation."""
    from consistent_diffusion.models.embedded import embedded_weights_present

    if not embedded_weights_present():
        pytest.skip("the embedded model's weights are not installed")
    from consistent_diffusion.metrics import style_consistency
    from consistent_diffusion.models.loading import load_pipeline
    from consistent_diffusion.series import SeriesConfig, generate_series

    pipe = load_pipeline("embedded")
    prompts = ("grinning face", "red heart", "cat face", "rocket", "sun", "pine tree", "car", "fish")
    config = SeriesConfig(prompts=prompts, seeds=(0,), steps=20, guidance_scale=4.0, batch_size=8)
    plain = generate_series(pipe, config, progress=False).images
    styled = generate_series(pipe, config, [StyleAligned()], progress=False).images
    plain_score = style_consistency(plain).aggregate
    styled_score = style_consistency(styled).aggregate
    assert styled_score > plain_score, (styled_score, plain_score)


def test_stock_load_lora_weights_while_active_keeps_the_processors(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from consistent_diffusion.testing import tiny_sd_pipeline

    source = tiny_sd_pipeline(seed=1)
    source.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(source.unet))
    pipe = tiny_sd_pipeline()
    with StyleAligned().installed(pipe.unet, per_group=2):
        pipe.load_lora_weights(tmp_path, adapter_name="style")
        assert pipe.get_active_adapters() == ["style"]
        assert sum(isinstance(p, SharedAttentionProcessor) for p in pipe.unet.attn_processors.values()) > 0
    assert not any(isinstance(p, SharedAttentionProcessor) for p in pipe.unet.attn_processors.values())



def test_cli_min_shared_tokens_reaches_the_method():
    import argparse

    from consistent_diffusion.cli.options.methods import add_method_arguments, methods_from_args

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    assert methods_from_args(parser.parse_args(["--style-aligned", "--style-min-shared-tokens", "256"]))[0].min_shared_tokens == 256
    assert methods_from_args(parser.parse_args(["--style-aligned"]))[0].min_shared_tokens == StyleAligned().min_shared_tokens
    with pytest.raises(ConfigError, match="only apply with --style-aligned"):
        methods_from_args(parser.parse_args(["--style-min-shared-tokens", "256"]))


def test_cli_share_parts_reaches_the_method():
    import argparse

    from consistent_diffusion.cli.options.methods import add_method_arguments, methods_from_args

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    assert methods_from_args(parser.parse_args(["--style-aligned", "--style-share-parts", "up"]))[0].share_parts == ("up",)
    assert methods_from_args(parser.parse_args(["--style-aligned"]))[0].share_parts == StyleAligned().share_parts
    with pytest.raises(SystemExit):  # argparse: not a UNet part
        parser.parse_args(["--style-aligned", "--style-share-parts", "encoder"])
    with pytest.raises(ConfigError, match="only apply with --style-aligned"):
        methods_from_args(parser.parse_args(["--style-share-parts", "up"]))
