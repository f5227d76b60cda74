"""Methods stack: two (or three) methods in one generation, through the series and the CLI options."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from consistent_diffusion.cli.options.methods import add_method_arguments, methods_from_args
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.img2img import Img2Img
from consistent_diffusion.methods.inversion import DdpmEdit, invert
from consistent_diffusion.methods.style_aligned import SharedAttentionProcessor, StyleAligned
from consistent_diffusion.series import SeriesConfig, generate_series


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.RandomState(6)
    return Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))


def _arrays(result):
    return [np.asarray(image, dtype=np.float64) for image in result.images]


def test_style_aligned_on_top_of_img2img(tiny_sd, init_image):
    config = SeriesConfig(prompts=("a cat", "a dog", "a cow"), seeds=(1,), steps=4, batch_size=3)
    img2img = Img2Img(image=init_image, strength=0.75)
    alone = _arrays(generate_series(tiny_sd, config, [img2img], progress=False))
    both = _arrays(generate_series(tiny_sd, config, [img2img, StyleAligned()], progress=False))
    assert len(both) == 3
    assert np.abs(alone[0] - both[0]).max() <= 1.0  # the reference (first image) is untouched
    assert max(np.abs(alone[i] - both[i]).max() for i in (1, 2)) > 2.0  # the others follow it
    assert not any(isinstance(p, SharedAttentionProcessor) for p in tiny_sd.unet.attn_processors.values())


def test_ddpm_edit_with_a_real_style_reference(tiny_sd, init_image):
    source = invert(tiny_sd, init_image, "a photo", steps=3, cfg=3.0, generator=torch.Generator().manual_seed(0))
    style = invert(tiny_sd, init_image.transpose(Image.Transpose.ROTATE_90), "a painting", steps=3, cfg=3.0,
                   generator=torch.Generator().manual_seed(1))
    config = SeriesConfig(prompts=("a dog", "a cow"), seeds=(0,), steps=3, guidance_scale=3.0, batch_size=2)
    edits = _arrays(generate_series(tiny_sd, config, [DdpmEdit(inversion=source, skip=1)], progress=False))
    styled = generate_series(tiny_sd, config, [DdpmEdit(inversion=source, skip=1),
                                               StyleAligned(reference_inversion=style)], progress=False)
    assert len(styled.images) == 2
    assert max(np.abs(a - b).max() for a, b in zip(edits, _arrays(styled), strict=True)) > 2.0
    assert [m["name"] for m in styled.manifest["methods"]] == ["ddpm_edit", "style_aligned"]
    assert type(tiny_sd.scheduler).__name__ == "DDIMScheduler"


def test_img2img_after_a_latents_method_is_refused(tiny_sd, init_image):
    source = invert(tiny_sd, init_image, "x", steps=2, cfg=1.0, generator=torch.Generator().manual_seed(0))
    config = SeriesConfig(prompts=("a",), seeds=(0,), steps=2)
    with pytest.raises(ConfigError, match="put img2img first"):
        generate_series(tiny_sd, config, [DdpmEdit(inversion=source), Img2Img(image=init_image)], progress=False)


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=8)
    add_method_arguments(parser)
    return parser.parse_args(argv)


def test_cli_options_build_the_stack_in_order(tmp_path, init_image):
    init_image.save(tmp_path / "i.png")
    methods = methods_from_args(_parse(["--prompt", "a", "--init-image", str(tmp_path / "i.png"), "--strength", "0.4",
                                        "--style-aligned", "--style-score-scale", "0.8", "--no-style-share-group-norm"]))
    assert [m.name for m in methods] == ["img2img", "style_aligned"]
    assert methods[0].strength == 0.4
    assert methods[1].shared_score_scale == 0.8 and methods[1].share_group_norm is False
    assert methods[1].reference_prompt is None  # one batch: the first image is the reference
    many = methods_from_args(_parse(["--prompt", "a", "--prompt", "b", "--seeds", "0", "1", "--batch-size", "2",
                                     "--style-aligned"]))
    assert many[0].reference_prompt is None  # the CLI only parses: sharing the reference is the library's rule
    items = SeriesConfig(prompts=("a", "b"), seeds=(0, 1)).items
    shared = many[0].for_series(items, batch_size=2)
    assert shared.reference_prompt == "a" and shared.reference_seed == 0  # shared across batches
    assert many[0].for_series(items, batch_size=4) is many[0]  # one batch: the first image itself
    assert methods_from_args(_parse([])) == []
    with pytest.raises(ConfigError, match="only apply with --style-aligned"):
        methods_from_args(_parse(["--style-reference-prompt", "x"]))
    with pytest.raises(ConfigError, match="choose one"):
        methods_from_args(_parse(["--init-image", str(tmp_path / "i.png"), "--edit-inversion", str(tmp_path)]))


def test_real_style_reference_with_img2img_is_a_clear_error(tmp_path):
    from consistent_diffusion.methods import get_method
    from consistent_diffusion.testing import tiny_sd_pipeline

    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "ref.png")
    methods = [get_method("img2img", image=str(tmp_path / "ref.png"), strength=0.5),
               get_method("style_aligned", reference_image=str(tmp_path / "ref.png"))]
    with pytest.raises(ConfigError, match="cannot be combined with img2img"):
        generate_series(tiny_sd_pipeline(), SeriesConfig(prompts=("a",), seeds=(0,), steps=2), methods, progress=False)


def _all_rows(pipe, methods, prompts, seeds, **call):
    """Generate one batch with ``methods`` applied; every row's final latent (internal rows included)."""
    import contextlib

    from consistent_diffusion.methods import GenerationContext

    ctx = GenerationContext(pipe, list(prompts), None, [torch.Generator().manual_seed(s) for s in seeds],
                            {"guidance_scale": 3.0, **call})
    with contextlib.ExitStack() as stack:
        for method in methods:
            stack.enter_context(method.applied(ctx))
        out = ctx.pipe(prompt=ctx.prompts, negative_prompt=ctx.negative_prompts, generator=ctx.generators,
                       output_type="latent", **ctx.call_kwargs)
    return out.images.float(), ctx.num_internal


def test_generated_style_reference_on_ddpm_edit_starts_at_the_edits_noise_level(tiny_sd, init_image):
    """Bug 1: at skip > 0 the edited rows start at x_{t_skip}; the generated reference must too.

    It is brought there by running the skipped steps for it alone, so it ends as the same image
    as at skip = 0 (where every row starts at x_T); before the fix it started from N(0, 1) at t_skip.
    """
    source = invert(tiny_sd, init_image, "a photo", steps=4, cfg=3.0, generator=torch.Generator().manual_seed(0))
    style = StyleAligned(reference_prompt="a red painting", reference_seed=5)
    ends = {}
    for skip in (0, 2):
        rows, internal = _all_rows(tiny_sd, [DdpmEdit(inversion=source, skip=skip), style], ["a dog", "a cow"], [0, 1])
        assert internal == 1 and rows.shape[0] == 3
        ends[skip] = rows[0]
    assert (ends[0] - ends[2]).abs().max() < 1e-4, (ends[0] - ends[2]).abs().max()
    assert type(tiny_sd.scheduler).__name__ == "DDIMScheduler"


def test_one_style_reference_for_a_series_larger_than_a_batch(tiny_sd):
    """Bug 3: StyleAligned without reference_prompt, from Python: every batch shares the series'
    first image as its reference, so the images do not depend on the batch size."""
    prompts, seeds = ("a red cat", "b", "c"), (1, 2)
    one_batch = _arrays(generate_series(tiny_sd, SeriesConfig(prompts=prompts, seeds=seeds, steps=3, batch_size=6),
                                        [StyleAligned()], progress=False))
    method = StyleAligned()
    config = SeriesConfig(prompts=prompts, seeds=seeds, steps=3, batch_size=2)
    batches = generate_series(tiny_sd, config, [method], progress=False)
    assert len(batches.images) == 6
    assert max(np.abs(a - b).max() for a, b in zip(one_batch, _arrays(batches), strict=True)) <= 1.0
    plain = _arrays(generate_series(tiny_sd, config, [], progress=False))
    assert np.abs(plain[2] - one_batch[2]).max() > 2.0  # (the first image of batch 2 is styled, not a reference)
    assert batches.manifest["methods"] == [method.describe()]  # the manifest records the options given
    assert method.reference_prompt is None
