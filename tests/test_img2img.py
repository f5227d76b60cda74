"""img2img / SDEdit: validation, the sibling pipeline, strength behaviour, restore."""

import numpy as np
import pytest
import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.methods import GenerationContext, get_method
from consistent_diffusion.methods.img2img import Img2Img
from consistent_diffusion.models.vae import encode_image


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.RandomState(5)
    return Image.fromarray((rng.rand(48, 40, 4) * 255).astype("uint8"), mode="RGBA")  # odd size, alpha


def _ctx(pipe, prompts=("a", "b"), steps=4):
    return GenerationContext(pipe, list(prompts), None, [torch.Generator().manual_seed(i) for i in range(len(prompts))],
                             {"num_inference_steps": steps, "guidance_scale": 3.0, "height": 32, "width": 32})


def _latents(ctx):
    return ctx.pipe(prompt=ctx.prompts, negative_prompt=ctx.negative_prompts, generator=ctx.generators,
                    output_type="latent", **ctx.call_kwargs).images.float()


@pytest.mark.parametrize(
    ("strength", "message"),
    [(0, r"strength must be in \(0, 1\]"), (1.5, r"strength must be in \(0, 1\]"), (True, "must be a number")],
)
def test_strength_is_validated(init_image, strength, message):
    with pytest.raises(ConfigError, match=message):
        Img2Img(image=init_image, strength=strength)


def test_bad_images_are_reported(tmp_path):
    with pytest.raises(ImageInputError, match="image not found"):
        Img2Img(image=tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="corrupt"):
        get_method("img2img", image=str(tmp_path / "bad.png"))


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_lower_strength_stays_closer_to_the_image(request, fixture, init_image):
    pipe = request.getfixturevalue(fixture)
    target = encode_image(pipe, init_image, (32, 32))
    distances = {}
    for strength in (0.25, 1.0):
        ctx = _ctx(pipe)
        with Img2Img(image=init_image, strength=strength).applied(ctx):
            assert type(ctx.pipe).__name__.endswith("Img2ImgPipeline")
            assert ctx.pipe.unet is pipe.unet  # a sibling: shared components
            assert "height" not in ctx.call_kwargs and ctx.call_kwargs["image"].size == (32, 32)
            distances[strength] = (_latents(ctx) - target).abs().mean().item()
    assert distances[0.25] < 0.5 * distances[1.0]


def test_context_is_restored_even_on_error(tiny_sd, init_image):
    ctx = _ctx(tiny_sd)
    kwargs = dict(ctx.call_kwargs)
    with pytest.raises(RuntimeError, match="boom"), Img2Img(image=init_image).applied(ctx):
        raise RuntimeError("boom")
    assert ctx.pipe is tiny_sd and ctx.call_kwargs == kwargs


def test_describe_round_trips(tmp_path, init_image):
    init_image.save(tmp_path / "init.png")
    method = Img2Img(image=str(tmp_path / "init.png"), strength=0.3)
    described = method.describe()
    assert described == {"name": "img2img", "options": {"image": str(tmp_path / "init.png"), "strength": 0.3}}
    assert get_method(described["name"], **described["options"]) == method


def test_a_strength_that_runs_no_step_is_refused(tiny_sd, init_image):
    ctx = _ctx(tiny_sd, steps=2)
    with pytest.raises(ConfigError, match=r"runs no step.*at least 0.5"), Img2Img(image=init_image, strength=0.3).applied(ctx):
        pass


def test_sibling_follows_a_replaced_component(tiny_sd):
    from consistent_diffusion.methods.img2img import image_to_image_pipeline

    sibling = image_to_image_pipeline(tiny_sd)
    assert image_to_image_pipeline(tiny_sd) is sibling, "same components: cached"
    tiny_sd.unet = type(tiny_sd.unet).from_config(tiny_sd.unet.config)
    assert image_to_image_pipeline(tiny_sd).unet is tiny_sd.unet, "a sibling must never run a replaced component"


def test_strength_runs_int_steps_times_strength_unet_steps_from_the_matching_timestep(tiny_sd, init_image):
    """SDEdit's start: with 10 steps and strength 0.35 the pipeline runs int(10 * 0.35) = 3 UNet
    steps, at the last 3 of the scheduler's 10 timesteps (t_start = 10 - 3 = 7)."""
    ctx = _ctx(tiny_sd, prompts=("a",), steps=10)
    seen = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1].flatten()[0])))
    try:
        with Img2Img(image=init_image, strength=0.35).applied(ctx):
            _latents(ctx)
    finally:
        handle.remove()
    tiny_sd.scheduler.set_timesteps(10)
    assert seen == [int(t) for t in tiny_sd.scheduler.timesteps[7:]]
