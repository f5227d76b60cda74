"""The embedded model's default sampling keeps zero terminal SNR (Lin et al. 2024) from the first
step to the last, and every entry point uses the one default step count (models.sampling)."""

from __future__ import annotations

import pytest
import torch

from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.models.embedded import EMBEDDED_DIR
from consistent_diffusion.models.loading import SCHEDULERS, set_scheduler
from consistent_diffusion.models.sampling import (
    DEFAULT_STEPS,
    EMBEDDED_SAMPLER,
    embedded_scheduler,
    scheduler_from_config,
)
from consistent_diffusion.testing import tiny_sd_pipeline

ZERO_SNR_FLOOR = 2.0**-24  # the sigma-based solvers clamp alpha_bar_T = 0 to this (sigma_T finite)


def _alpha_bar(scheduler, index: int, t) -> float:
    """alpha_bar at the ``index``-th timestep ``t``: from the solver's sigma where it keeps one
    (sigma^2 = (1 - alpha_bar) / alpha_bar), else from the training schedule."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > len(scheduler.timesteps) - 1:
        return float(1.0 / (1.0 + sigmas[index].double() ** 2))
    return float(scheduler.alphas_cumprod[int(t)])


def _oracle_sample(scheduler, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(final sample, x0): the scheduler's loop driven by the exact v-prediction of one fixed x0.

    At each step the model input is x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (``scale_model_input``
    of the solver's sample); the oracle returns v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans &
    Ho 2022) with eps solved from x_t. Every consistent solver then ends on x0 when its last step
    reaches sigma = 0 (alpha_bar = 1)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn((1, 4, 8, 8), generator=generator, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    sample = torch.randn((1, 4, 8, 8), generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    for index, t in enumerate(scheduler.timesteps):
        abar = _alpha_bar(scheduler, index, t)
        x_t = scheduler.scale_model_input(sample, t)
        eps = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        v = abar**0.5 * eps - (1 - abar) ** 0.5 * x0
        sample = scheduler.step(v, t, sample).prev_sample
    return sample, x0


def test_default_sampler_is_built_over_the_zero_snr_training_schedule():
    scheduler = embedded_scheduler(EMBEDDED_DIR)
    assert type(scheduler).__name__ == SCHEDULERS[EMBEDDED_SAMPLER]
    config = scheduler.config
    assert config.rescale_betas_zero_snr and config.prediction_type == "v_prediction"
    assert config.timestep_spacing == "trailing"


def test_default_sampler_starts_at_zero_snr():
    """The first step is t = T - 1, where alpha_bar is 0 (DDIM) or the solvers' 2**-24 clamp."""
    scheduler = embedded_scheduler(EMBEDDED_DIR)
    scheduler.set_timesteps(DEFAULT_STEPS)
    first = scheduler.timesteps[0]
    assert int(first) == scheduler.config.num_train_timesteps - 1
    assert _alpha_bar(scheduler, 0, first) <= ZERO_SNR_FLOOR * 1.0001


def test_default_sampler_ends_on_the_clean_image():
    """Driven by the exact v-prediction, the default's last step returns x0 (sigma_last = 0):
    fails for a final sigma left at sigma_min, or DDIM's final alpha_bar = alpha_bar_0 < 1."""
    sample, x0 = _oracle_sample(embedded_scheduler(EMBEDDED_DIR), DEFAULT_STEPS)
    assert torch.isfinite(sample).all()
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=1e-4)


def test_oracle_check_fails_without_zero_final_sigma():
    """The check above can fail: the same solver ending at sigma_min misses x0."""
    config = dict(embedded_scheduler(EMBEDDED_DIR).config)
    if "final_sigmas_type" not in config:
        pytest.skip("the default sampler has no final sigma setting")
    broken = type(embedded_scheduler(EMBEDDED_DIR)).from_config(config, final_sigmas_type="sigma_min")
    sample, x0 = _oracle_sample(broken, DEFAULT_STEPS)
    assert (sample - x0).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["dpm++", "unipc", "euler"])
def test_swapped_solvers_keep_zero_snr_and_end_at_sigma_zero(name):
    scheduler = scheduler_from_config(name, embedded_scheduler(EMBEDDED_DIR, "ddim").config)
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.final_sigmas_type == "zero"
    sample, x0 = _oracle_sample(scheduler, 10)
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=1e-4)


def test_default_sampler_on_a_tiny_zero_snr_pipeline_gives_finite_images():
    pipe = set_scheduler(tiny_sd_pipeline(zero_snr=True), EMBEDDED_SAMPLER)
    assert pipe.scheduler.config.rescale_betas_zero_snr
    ctx = GenerationContext(pipe=pipe, prompts=["a red heart", "a cat"], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in (0, 1)],
                            call_kwargs={"num_inference_steps": DEFAULT_STEPS, "guidance_scale": 5.0,
                                         "guidance_rescale": 0.7, "height": 32, "width": 32})
    images = run(ctx, output_type="pt")
    assert all(torch.isfinite(image).all() for image in images)


def test_entry_points_default_to_the_one_step_count():
    from consistent_diffusion.app.jobs import SeriesForm
    from consistent_diffusion.bench.suite import Suite, load_suite
    from consistent_diffusion.cli.main import build_parser
    from consistent_diffusion.series import SeriesConfig
    from consistent_diffusion.training.recipes.evaluation.run import EvalConfig

    assert SeriesConfig(prompts=["a"], seeds=(0,)).steps == DEFAULT_STEPS
    assert SeriesForm.__dataclass_fields__["steps"].default == DEFAULT_STEPS
    assert Suite.__dataclass_fields__["steps"].default == DEFAULT_STEPS
    assert EvalConfig.__dataclass_fields__["steps"].default == DEFAULT_STEPS
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    steps = next(a for a in generate._actions if a.dest == "steps")
    assert steps.default is None and f"default: {DEFAULT_STEPS} on the embedded model" in steps.help % {}
    # the built-in suites pin 20 steps: their ddpm_edit skip (12 of 20) and tuned options count steps
    for name in ("quick", "standard", "full", "new-subject", "tuning"):
        assert load_suite(name).steps == 20, name


def test_other_models_keep_more_steps_for_the_scheduler_they_ship():
    """8 steps suit the embedded model's DPM-Solver++; an SD 1.5 folder samples with its own scheduler
    (PNDM, Euler...), so the CLI and the app give it OTHER_MODEL_STEPS unless the user sets --steps."""
    from consistent_diffusion.models.loading import EMBEDDED, default_steps
    from consistent_diffusion.models.sampling import OTHER_MODEL_STEPS

    assert default_steps(EMBEDDED) == DEFAULT_STEPS
    assert default_steps("path/to/sd15") == OTHER_MODEL_STEPS > DEFAULT_STEPS
