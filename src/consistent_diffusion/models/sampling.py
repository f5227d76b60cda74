"""Sampling defaults, in one place: the schedulers a pipeline can swap in, the embedded model's
default scheduler and the default step count (chosen by ``scripts/bench_sampling.py``; the
measurements are in the embedded model card, section "Default sampling").

The embedded model is trained to zero terminal SNR (alpha_bar_T = 0, Lin et al. 2024 sec. 3.1)
with v-prediction and trailing timesteps; its scheduler asset (``assets/embedded/scheduler``) holds
that training schedule. ``embedded_scheduler`` builds the default sampler over it with
``from_config``, which keeps betas, ``rescale_betas_zero_snr``, ``timestep_spacing`` and
``prediction_type``: the first step is at t = T - 1 (trailing), where the sigma-based solvers
(DPM-Solver++, UniPC, Euler) clamp alpha_bar to 2**-24 (SNR ~ 6e-8: pure noise in float32) since
sigma = sqrt((1 - alpha_bar) / alpha_bar) is infinite at zero SNR, and the last step lands on
sigma = 0 (``final_sigmas_type="zero"``), returning the model's x0 prediction.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from consistent_diffusion.core.errors import ConfigError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}
EMBEDDED_SAMPLER = "dpm++"  # the embedded model's default scheduler, a name in SCHEDULERS
DEFAULT_STEPS = 8  # the embedded model's denoising steps when the user sets none
OTHER_MODEL_STEPS = 30  # a real SD 1.x/2.x/SDXL model keeps its own scheduler (PNDM, Euler...): 30 steps
# Keys every sampler of the embedded model must be given so it keeps zero terminal SNR to the end.
ZERO_SNR_OVERRIDES = {"final_sigmas_type": "zero"}


def scheduler_from_config(name: str, config: Any) -> Any:
    """The scheduler ``name`` (one of ``SCHEDULERS``) over ``config`` (a scheduler config or dict):
    same training schedule (betas, zero-SNR rescale, spacing, prediction type)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    scheduler_class = getattr(diffusers, SCHEDULERS[name])
    overrides = {}
    if dict(config).get("rescale_betas_zero_snr", False):
        accepted = inspect.signature(scheduler_class.__init__).parameters
        overrides = {k: v for k, v in ZERO_SNR_OVERRIDES.items() if k in accepted}
    return scheduler_class.from_config(config, **overrides)


def embedded_scheduler(folder: str | os.PathLike, name: str = EMBEDDED_SAMPLER) -> Any:
    """The embedded model's sampler ``name`` over the training schedule saved in ``folder``/scheduler."""
    from diffusers import DDIMScheduler

    return scheduler_from_config(name, DDIMScheduler.load_config(os.fspath(folder), subfolder="scheduler"))
