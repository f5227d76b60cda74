"""The sampler math of edit-friendly DDPM inversion: short plain functions (k-diffusion style).

Notation (Huberman-Spiegelglas, Kulikov, Michaeli, CVPR 2024; DDIM = Song et al. 2021):
``abar_t`` is the scheduler's ``alphas_cumprod[t]``; one sampling step goes from timestep ``t``
to the schedule's *next* timestep ``t'`` (``t' < t``; past the last step, the scheduler's
``final_alpha_cumprod``):

    x_{t'} = mu_t(x_t) + sigma_t z_t                                   (paper eq. 2)
    mu_t   = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma_t^2) eps_hat  (DDIM eq. 12)
    sigma_t = eta sqrt((1 - abar_t') / (1 - abar_t) (1 - abar_t / abar_t'))  (DDIM eq. 16)

``ddim_step`` is the one place that evaluates these; everything else calls it. It is
DDIMScheduler.step's own arithmetic, operation for operation (so it gives the same bits), with
two differences: DDIMScheduler derives ``t'`` as ``t - T // N``, which is the schedule's next
timestep only for ``leading`` spacing or when N divides T; here ``t'`` is given. And at
``abar_t = 0`` (zero terminal SNR, Lin et al. 2024: the first step of a ``trailing`` schedule)
DDIM's ``sqrt(1 - abar_t' - sigma_t^2)`` can be the root of a rounding below 0, NaN; here it is
the exact value (``direction_coefficient``). A zero-SNR schedule needs ``v_prediction`` (or
``sample``): eps-prediction cannot give x0_hat at abar_t = 0.

Tensors: ``x_t``/``eps`` are (B, C, h, w) latents (what the UNet sees); ``t`` is a timestep of
the schedule (int or 0-d tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

from consistent_diffusion.core.errors import ConfigError


def alpha_bar(scheduler: DDIMScheduler, t: Any) -> torch.Tensor:
    """abar_t: ``alphas_cumprod[t]`` for t >= 0, the scheduler's ``final_alpha_cumprod`` below 0."""
    return scheduler.alphas_cumprod[t] if int(t) >= 0 else scheduler.final_alpha_cumprod


def ddim_step(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    t: Any,
    t_prev: Any,
    x_t: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One DDIM(eta) step from ``t`` to ``t_prev``: ``mu_t(x_t) + sigma_t noise`` (DDIM eqs. 12, 16).

    eps: the model output (its meaning set by ``prediction_type``); noise: the variance noise
    (broadcastable to x_t; ignored when eta == 0). Same operations, in the same order, as
    ``DDIMScheduler.step`` (without ``use_clipped_model_output``).
    """
    config = scheduler.config
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = alpha_bar(scheduler, t_prev)
    beta_prod_t = 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        pred_original_sample = (x_t - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
        pred_epsilon = eps
    elif config.prediction_type == "sample":
        pred_original_sample = eps
        pred_epsilon = (x_t - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif config.prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * x_t - (beta_prod_t**0.5) * eps
        pred_epsilon = (alpha_prod_t**0.5) * eps + (beta_prod_t**0.5) * x_t
    else:
        raise ConfigError(f"unknown prediction_type {config.prediction_type!r}")
    if config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = direction_coefficient(alpha_prod_t, alpha_prod_t_prev, std_dev_t, eta) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if eta > 0:
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample


def direction_coefficient(
    alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, std_dev_t: torch.Tensor, eta: float
) -> torch.Tensor:
    """sqrt(1 - abar_t' - sigma_t^2), the weight of eps_hat in mu_t (DDIM eq. 12), a 0-d tensor.

    Mathematically ``1 - abar_t' - sigma_t^2 = (1 - abar_t') (1 - eta^2 (1 - abar_t / abar_t') / (1 - abar_t))``
    >= 0, and 0 for eta = 1 at abar_t = 0 (the first step of a zero-terminal-SNR schedule, Lin et
    al. 2024). DDIM's rounding there (sigma_t^2 = (sqrt(1 - abar_t'))^2) can land a few ulps below 0,
    and its square root is NaN. So at abar_t = 0 the exact value ``(1 - abar_t')(1 - eta^2)`` is
    used, and the term is clamped at 0; wherever it is already >= 0 (every step of a schedule
    with abar_t > 0) the bits are DDIMScheduler.step's.
    """
    variance_left = 1 - alpha_prod_t_prev - std_dev_t**2
    # (``final_alpha_cumprod`` stays on the CPU when ``alphas_cumprod`` moved: align before ``where``.)
    exact = ((1 - alpha_prod_t_prev) * (1 - eta**2)).to(variance_left)
    at_zero = (alpha_prod_t == 0).to(variance_left.device)
    return torch.where(at_zero, exact, variance_left).clamp(min=0) ** (0.5)


def ddpm_mean(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: Any, x_t: torch.Tensor, eta: float, t_prev: Any = None
) -> torch.Tensor:
    """mu_t(x_t): the DDIM(eta) posterior mean (eta = 1: DDPM's), landing at ``t_prev``
    (default: the schedule's next timestep after ``t``)."""
    t_prev = next_timestep(scheduler, t) if t_prev is None else t_prev
    return ddim_step(scheduler, eps, t, t_prev, x_t, eta, torch.zeros_like(x_t))


def ddpm_std(
    scheduler: DDIMScheduler, t: Any, eta: float, like: torch.Tensor, t_prev: Any = None
) -> torch.Tensor:
    """sigma_t of the DDIM(eta) step from ``t`` to ``t_prev`` (default: the schedule's next), a 0-d tensor.

    With a zero sample and zero model output every prediction type gives a zero mean, so the
    step returns exactly ``0 + sigma_t * 1``.
    """
    t_prev = next_timestep(scheduler, t) if t_prev is None else t_prev
    zero = torch.zeros_like(like[:1, :1, :1, :1])
    return ddim_step(scheduler, zero, t, t_prev, zero, eta, torch.ones_like(zero))[0, 0, 0, 0]


def ddpm_step(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    t: Any,
    x_t: torch.Tensor,
    z: torch.Tensor,
    eta: float,
    t_prev: Any = None,
) -> torch.Tensor:
    """One DDPM sampling step with a given noise map: x_{t'} = mu_t(x_t) + sigma_t z (paper eq. 2)."""
    t_prev = next_timestep(scheduler, t) if t_prev is None else t_prev
    return ddim_step(scheduler, eps, t, t_prev, x_t, eta, z.expand_as(x_t))


def noise_map(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    t: Any,
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    eta: float,
    t_prev: Any = None,
) -> torch.Tensor:
    """z_t = (x_{t'} - mu_t(x_t)) / sigma_t (paper eq. 5): the noise that lands the step on x_{t'}."""
    t_prev = next_timestep(scheduler, t) if t_prev is None else t_prev
    sigma = ddpm_std(scheduler, t, eta, x_t, t_prev)
    if float(sigma) == 0.0:
        raise ConfigError(
            f"the scheduler has sigma_t = 0 at timestep {int(t)}: no noise map can reach x_(t-1); "
            "use eta > 0 and set_alpha_to_one=False"
        )
    return (x_prev - ddpm_mean(scheduler, eps, t, x_t, eta, t_prev)) / sigma


def next_timestep(scheduler: DDIMScheduler, t: Any) -> int:
    """The timestep the sampler lands on after ``t``: the schedule's next entry, -1 after the last.

    The schedule is the scheduler's full one (``full_timesteps`` on a NoiseMapScheduler, which
    may hide skipped leading steps from the pipeline), else ``timesteps``.
    """
    schedule = getattr(scheduler, "full_timesteps", None)
    if schedule is None:
        schedule = scheduler.timesteps
    matches = (schedule.to("cpu") == int(t)).nonzero()
    if len(matches) != 1:
        raise RuntimeError(f"timestep {int(t)} is not in the scheduler's schedule")
    index = int(matches[0, 0])
    return int(schedule[index + 1]) if index + 1 < len(schedule) else -1


def sample_trajectory(
    scheduler: DDIMScheduler, x0: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw x_t for every timestep independently from x0 (paper eq. 6):
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_t``, the eps_t independent N(0, I).

    x0: (1, C, h, w) latent. Returns xs of shape (N + 1, C, h, w): ``xs[i]`` is the latent that
    enters sampling step ``i`` (at ``timesteps[i]``), ``xs[N]`` is x0 itself.
    """
    noise = torch.randn((len(timesteps), *x0.shape[1:]), generator=generator, dtype=torch.float32)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    noisy = scheduler.add_noise(x0.expand(len(timesteps), -1, -1, -1), noise, timesteps.to(x0.device))
    return torch.cat([noisy, x0], dim=0)
