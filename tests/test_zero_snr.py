"""Every method on a v-prediction, zero-terminal-SNR model (Lin et al. 2024; what SD 2.x-style
models and the embedded model's recipe use): alpha_bar_T = 0 exactly, trailing spacing, so every
schedule starts at t = 999 where x_T is pure noise.

Built on ``tiny_sd_pipeline(zero_snr=True)``: the same random weights as ``tiny_sd_pipeline()``,
with a DDIM scheduler configured so. 32x32 images, 16x16x4 latents.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from _finetune_data import COLOURS, instance_folder, one_thread, random_controlnet, shape_image
from _ip_adapter_files import save_random_adapter
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, available_methods, run
from consistent_diffusion.methods.consistent_subject import ConsistentSubject
from consistent_diffusion.methods.controlnet import ControlNet
from consistent_diffusion.methods.dreambooth import DreamBooth
from consistent_diffusion.methods.img2img import Img2Img
from consistent_diffusion.methods.inversion import (
    DdpmEdit,
    ddim_step,
    ddpm_mean,
    ddpm_std,
    invert,
    next_timestep,
    noise_map_scheduler,
    reconstruct,
    sample_trajectory,
)
from consistent_diffusion.methods.ip_adapter import IPAdapter
from consistent_diffusion.methods.lora import LoRA
from consistent_diffusion.methods.style_aligned import StyleAligned
from consistent_diffusion.methods.textual_inversion import TextualInversion
from consistent_diffusion.series import SeriesConfig, generate_series
from consistent_diffusion.testing import ZERO_SNR_SCHEDULER_CONFIG, tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread
PROMPTS = ("a red circle", "a blue square")


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))


@pytest.fixture
def zsnr():
    return tiny_sd_pipeline(zero_snr=True)


def _invert(pipe, image, steps, cfg=3.5, seed=0):
    return invert(pipe, image, "a cat", steps=steps, cfg=cfg, generator=torch.Generator().manual_seed(seed))


def test_the_tiny_zero_snr_pipeline_is_configured_so():
    pipe, plain = tiny_sd_pipeline(zero_snr=True), tiny_sd_pipeline()
    scheduler = pipe.scheduler
    assert float(scheduler.alphas_cumprod[-1]) == 0.0 and float(plain.scheduler.alphas_cumprod[-1]) > 0
    assert {k: scheduler.config[k] for k in ZERO_SNR_SCHEDULER_CONFIG} == ZERO_SNR_SCHEDULER_CONFIG
    scheduler.set_timesteps(30)
    assert int(scheduler.timesteps[0]) == 999
    plain_state = plain.unet.state_dict()
    assert all(torch.equal(v, plain_state[k]) for k, v in pipe.unet.state_dict().items())  # same weights
    assert not plain.scheduler.config.rescale_betas_zero_snr  # the standard tiny pipelines are unchanged


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_the_first_step_at_alpha_bar_zero_is_finite_for_every_step_count(eta):
    """At abar_T = 0 the DDIM step's sqrt(1 - abar_t' - sigma_t^2) is 0 (eta = 1) but rounded it
    can be the root of -6e-8: NaN for 10, 20, 25 steps here, 30 on the pilot model. Every step
    count from 1 to 100: mu_T = sqrt(abar_t') x0_hat + sqrt((1 - abar_t')(1 - eta^2)) eps_hat
    (DDIM eq. 12 with x0_hat = -v, eps_hat = x_T for v-prediction at abar = 0)."""
    scheduler = noise_map_scheduler(tiny_sd_pipeline(zero_snr=True).scheduler)
    generator = torch.Generator().manual_seed(0)
    x_t, v = torch.randn((2, 1, 4, 4, 4), generator=generator)
    for steps in range(1, 101):
        timesteps = scheduler.schedule(steps)
        t = int(timesteps[0])
        t_prev = next_timestep(scheduler, t)
        abar_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
        mean = ddpm_mean(scheduler, v, t, x_t, eta)
        std = ddpm_std(scheduler, t, eta, x_t)
        assert torch.isfinite(mean).all() and torch.isfinite(std), steps
        direction = ((1 - abar_prev) * (1 - eta**2)) ** 0.5
        assert torch.allclose(mean, abar_prev**0.5 * -v + direction * x_t, atol=1e-6), steps
        assert torch.allclose(std, eta * (1 - abar_prev) ** 0.5, atol=1e-6), steps
        if eta == 1.0:
            assert torch.equal(mean, abar_prev**0.5 * -v), steps  # exactly: no direction term at all
        step = ddim_step(scheduler, v, t, t_prev, x_t, eta, torch.ones_like(x_t))
        assert torch.isfinite(step).all(), steps


@pytest.mark.parametrize("steps", [2, 10, 20, 25, 30])
def test_inversion_reconstructs_exactly_at_several_step_counts(zsnr, image, steps):
    inversion = _invert(zsnr, image, steps)
    assert int(inversion.timesteps[0]) == 999  # trailing: the first step is at abar_T = 0
    assert torch.isfinite(inversion.zs).all() and torch.isfinite(inversion.xs).all()
    latent = reconstruct(zsnr, inversion).float().cpu()
    error = (latent - inversion.x0).abs().max().item()
    assert error < 1e-6, error  # float32 rounding; measured <= 1.1e-7
    assert inversion.zs.abs().max() > 0.1


def test_sdxl_inversion_reconstructs_exactly(image):
    pipe = tiny_sdxl_pipeline(zero_snr=True)
    inversion = _invert(pipe, image, 10)
    assert torch.isfinite(inversion.zs).all()
    assert (reconstruct(pipe, inversion).float().cpu() - inversion.x0).abs().max() < 1e-6


def test_the_trajectory_starts_from_pure_noise_at_alpha_bar_zero(zsnr, image):
    """Eq. 6 at t = T with abar_T = 0: x_T = eps_T exactly, whatever x0; its noise map is finite."""
    scheduler = noise_map_scheduler(zsnr.scheduler)
    timesteps = scheduler.schedule(4).clone().long()
    noise = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    for x0 in (torch.zeros(1, 4, 16, 16), torch.full((1, 4, 16, 16), 5.0)):
        xs = sample_trajectory(scheduler, x0, timesteps, torch.Generator().manual_seed(3))
        assert torch.equal(xs[0], noise[0]) and torch.equal(xs[-1], x0[0])
        assert not torch.equal(xs[1], noise[1])  # later steps keep signal
    inversion = _invert(zsnr, image, 4)
    assert torch.isfinite(inversion.zs[0]).all() and inversion.zs[0].std() > 0.1


def test_an_epsilon_model_on_a_zero_snr_schedule_is_refused(image):
    pipe = tiny_sd_pipeline(zero_snr=True)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="epsilon")
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        _invert(pipe, image, 3)


# -- every method --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory, image):
    """A LoRA and a DreamBooth run trained for 2 steps on the zero-SNR pipeline (v-prediction
    targets), a ControlNet, a reference image file: what each method needs."""
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora
    from consistent_diffusion.training.textual_inversion import (
        TextualInversionConfig,
        train_textual_inversion,
    )

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zero_snr")
    instances = instance_folder(root)
    lora = train_lora(LoraDreamBoothConfig(out=root / "lora", instance_dir=instances, instance_prompt=PROMPTS[0],
                                           steps=2, learning_rate=1e-2, progress=False),
                      tiny_sd_pipeline(zero_snr=True)).result
    dreambooth = train_dreambooth(DreamBoothConfig(out=root / "dreambooth", instance_dir=instances,
                                                   instance_prompt=PROMPTS[0], steps=2, checkpoint_every=2,
                                                   learning_rate=1e-2, progress=False),
                                  tiny_sd_pipeline(zero_snr=True)).out
    inversion = train_textual_inversion(
        TextualInversionConfig(out=root / "ti", instance_dir=instances, placeholder_token="<zs-shape>",
                               initializer_token="circle", steps=2, batch_size=1, progress=False,
                               templates=("a {}",)),
        tiny_sd_pipeline(zero_snr=True)).result
    image.save(root / "reference.png")
    ip_adapter = save_random_adapter(root / "ip_adapter", tiny_sd_pipeline(zero_snr=True).unet)
    torch.set_num_threads(previous)
    return {"lora": lora, "dreambooth": dreambooth, "textual_inversion": inversion, "controlnet": random_controlnet(tiny_sd_pipeline()),
            "image": root / "reference.png", "ip_adapter": ip_adapter}


METHOD_PROMPTS = {"textual_inversion": ("a red <zs-shape>", "a blue <zs-shape>")}  # the learned word in use
METHODS = {
    "img2img": lambda a: [Img2Img(image=a["image"], strength=0.7)],
    "ddpm_edit": lambda a: [DdpmEdit(image=a["image"], source_prompt="a cat", source_cfg=3.0)],
    "style_aligned": lambda a: [StyleAligned(reference_prompt="a green triangle")],
    "style_aligned_real": lambda a: [StyleAligned(reference_image=str(a["image"]), reference_image_prompt="a cat")],
    "lora": lambda a: [LoRA(weights=str(a["lora"]))],
    "dreambooth": lambda a: [DreamBooth(model=str(a["dreambooth"]))],
    "consistent_subject": lambda a: [ConsistentSubject(subject="circle")],
    "consistent_subject_real": lambda a: [ConsistentSubject(subject="cat", reference_image=str(a["image"]),
                                                            reference_image_prompt="a cat")],
    "textual_inversion": lambda a: [TextualInversion(embeddings=str(a["textual_inversion"]))],
    "ip_adapter": lambda a: [IPAdapter(adapters=str(a["ip_adapter"]), images=str(a["image"]))],
    "controlnet": lambda a: [ControlNet(controlnets=a["controlnet"], images=shape_image("circle", COLOURS["red"], 32))],
}


def _context(pipe, seeds=(0, 1), steps=3, prompts=PROMPTS, **call_kwargs) -> GenerationContext:
    """One batch as ``series.generate_batch`` builds it."""
    return GenerationContext(
        pipe=pipe, prompts=list(prompts[: len(seeds)]), negative_prompts=None,
        generators=[torch.Generator().manual_seed(seed) for seed in seeds],
        call_kwargs={"num_inference_steps": steps, "guidance_scale": 3.0, "height": 32, "width": 32, **call_kwargs},
    )


def test_every_registered_method_is_covered():
    assert {name.removesuffix("_real") for name in METHODS} == set(available_methods())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_gives_finite_deterministic_images(zsnr, assets, name):
    prompts = METHOD_PROMPTS.get(name, PROMPTS)
    first = run(_context(zsnr, prompts=prompts), METHODS[name](assets), output_type="np")
    again = run(_context(zsnr, prompts=prompts), METHODS[name](assets), output_type="np")
    assert len(first) == 2 and all(image.shape == (32, 32, 3) for image in first)
    assert all(np.isfinite(image).all() for image in first), "NaN/inf in the decoded images"
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)), "same seeds, same images"
    plain = run(_context(zsnr, prompts=prompts), [], output_type="np")
    assert max(np.abs(a - b).max() for a, b in zip(first, plain, strict=True)) > 1e-4, "the method acted"


def test_ddpm_edit_with_the_source_prompt_reconstructs(zsnr, image):
    inversion = _invert(zsnr, image, 20, cfg=3.0)  # 20 steps: NaN before the fix
    ctx = _context(zsnr, seeds=(0,), steps=20)
    ctx.prompts = ["a cat"]
    latents = run(ctx, [DdpmEdit(inversion=inversion)], output_type="latent")
    assert (latents[0].float().cpu() - inversion.x0[0]).abs().max() < 1e-6


@pytest.mark.parametrize("rescale", [None, 0.7])
def test_ddpm_edit_of_an_image_reconstructs_at_the_calls_guidance_rescale(zsnr, assets, rescale):
    """A series passes guidance_rescale 0.7 on a zero-SNR model: the image is inverted with the
    call's rescale, so skip 0 with the source prompt and cfg lands on its latent (it missed by
    far when the inversion ignored the rescale)."""
    method = DdpmEdit(image=str(assets["image"]), source_prompt="a cat", source_cfg=3.0)
    extra = {} if rescale is None else {"guidance_rescale": rescale}
    ctx = _context(zsnr, seeds=(0,), steps=20, **extra)
    ctx.prompts = ["a cat"]
    latents = run(ctx, [method], output_type="latent")
    inversion = next(iter(method._cache.values()))
    assert inversion.guidance_rescale == rescale
    assert (latents[0].float().cpu() - inversion.x0[0]).abs().max() < 1e-5


def test_invert_defaults_to_the_models_guidance_rescale_and_edit_reuses_it(zsnr, image):
    inversion = _invert(zsnr, image, 10)
    assert inversion.guidance_rescale == 0.7, "a series samples this model at 0.7"
    assert (reconstruct(zsnr, inversion).float().cpu() - inversion.x0).abs().max() < 1e-6


def test_style_aligned_real_reference_ends_on_its_image(zsnr, assets):
    """The reference row (internal, so read from the pipeline's output) follows its inversion and
    lands on the real image's latent; the other rows stay finite."""
    method = StyleAligned(reference_image=str(assets["image"]), reference_image_prompt="a cat")
    ctx = _context(zsnr, steps=20)
    with contextlib.ExitStack() as stack:
        ctx = stack.enter_context(method.applied(ctx))
        latents = ctx.pipe(prompt=ctx.prompts, generator=ctx.generators, output_type="latent",
                           **ctx.call_kwargs).images
    assert ctx.num_internal == 1 and latents.shape == (3, 4, 16, 16) and torch.isfinite(latents).all()
    assert method.describe()["sampling"]["reference_trajectory"] == "inversion"
    x0 = next(iter(method._cache.values())).x0
    assert (latents[0].float() - x0[0]).abs().max() < 1e-6


# -- guidance_rescale (Lin et al. 2024, eq. 16), through SeriesConfig ------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.7", float("nan")])
def test_guidance_rescale_is_validated(value):
    with pytest.raises(ConfigError, match="guidance_rescale"):
        SeriesConfig(prompts=("a",), guidance_rescale=value)


def test_guidance_rescale_passes_through_the_series_and_its_manifest(zsnr):
    def series(**options):
        config = SeriesConfig(prompts=PROMPTS[:1], seeds=(0,), steps=3, guidance_scale=5.0, **options)
        return generate_series(zsnr, config, progress=False)

    unset, zero, rescaled = series(), series(guidance_rescale=0.0), series(guidance_rescale=0.7)
    assert "guidance_rescale" not in unset.manifest["config"]  # unset: manifests as before the field
    assert rescaled.manifest["config"]["guidance_rescale"] == 0.7
    assert SeriesConfig.from_dict(rescaled.manifest["config"]) == rescaled.config
    # unset: the model's default, 0.7 on a zero-terminal-SNR model (Lin et al. 2024, sec. 3.4)
    assert np.array_equal(np.asarray(unset.images[0]), np.asarray(rescaled.images[0]))
    assert np.abs(np.asarray(zero.images[0], float) - np.asarray(rescaled.images[0], float)).max() > 0


def test_the_default_guidance_rescale_is_0_7_only_at_zero_terminal_snr(zsnr):
    from consistent_diffusion.methods.base import default_guidance_rescale

    assert default_guidance_rescale(zsnr) == 0.7
    plain = tiny_sd_pipeline()
    assert default_guidance_rescale(plain) is None  # not passed: the series is made as before the option

    def first_image(pipe, **options):
        config = SeriesConfig(prompts=PROMPTS[:1], seeds=(0,), steps=3, guidance_scale=5.0, **options)
        return np.asarray(generate_series(pipe, config, progress=False).images[0])

    assert np.array_equal(first_image(plain), first_image(plain, guidance_rescale=0.0))


def test_the_unet_hook_gives_the_native_guidance_rescale(zsnr):
    """``rescaled_guidance`` (for pipelines without the argument) equals diffusers' own
    ``guidance_rescale`` in the text-to-image pipeline, which has it."""
    from consistent_diffusion.methods.base import rescaled_guidance

    native = run(_context(zsnr, guidance_rescale=0.7), [], output_type="latent")
    with rescaled_guidance(zsnr.unet, 3.0, 0.7):
        hooked = run(_context(zsnr, guidance_rescale=0.0), [], output_type="latent")
    plain = run(_context(zsnr, guidance_rescale=0.0), [], output_type="latent")
    assert max((a - b).abs().max().item() for a, b in zip(native, hooked, strict=True)) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(native, plain, strict=True)) > 1e-3
    assert not zsnr.unet._forward_hooks, "the hook is removed after the call"


@pytest.mark.parametrize("name", ["img2img", "controlnet"])
def test_pipelines_without_the_argument_get_guidance_rescale_through_the_hook(zsnr, assets, name):
    """diffusers' SD img2img and ControlNet pipelines have no guidance_rescale (they would swallow it
    in **kwargs): ``run`` applies it on the UNet instead, so it changes their images, deterministically."""
    import warnings

    methods = METHODS[name](assets)
    unrescaled = run(_context(zsnr, guidance_rescale=0.0), methods, output_type="np")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rescaled = run(_context(zsnr, guidance_rescale=0.7), methods, output_type="np")
    again = run(_context(zsnr, guidance_rescale=0.7), methods, output_type="np")
    assert max(np.abs(a - b).max() for a, b in zip(unrescaled, rescaled, strict=True)) > 1e-4
    assert all(np.array_equal(a, b) for a, b in zip(rescaled, again, strict=True))
    assert not zsnr.unet._forward_hooks
