"""Diffusion training helpers shared by every task: prompt embeddings, SDXL added conditioning,
VAE latents of a training set, the DDPM noising and its regression target, per-example MSE and
min-SNR loss weights.

Spaces: pixels (B, 3, H, W) in [-1, 1]; latents (B, C, H/f, W/f) already multiplied by the VAE's
``scaling_factor``; timesteps (B,) integers in [0, T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.models.vae import native_size, vae_factor


def encode_text(
    pipe: Any, prompts: Sequence[str], encoders: Sequence[Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings exactly as the pipeline's ``encode_prompt`` makes them (no guidance,
    no clip skip), but through ``encoders`` (default: the pipeline's text encoders, possibly
    wrapped by accelerate) so that gradients flow when a text encoder is trained.

    Returns (embeddings (B, tokens, dim), pooled (B, dim) for SDXL-shaped pipelines else None).
    """
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) is not None else [])
    if encoders is None:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(tokenizers) == 2 else [])
    device = next(_unwrap(encoders[-1]).parameters()).device
    if len(tokenizers) == 1:
        tokens = tokenizers[0](list(prompts), padding="max_length", max_length=tokenizers[0].model_max_length,
                               truncation=True, return_tensors="pt")
        config = _unwrap(encoders[0]).config
        mask = tokens.attention_mask.to(device) if getattr(config, "use_attention_mask", False) else None
        return encoders[0](tokens.input_ids.to(device), attention_mask=mask)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
        if output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(pipe: Any, size: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """SDXL ``time_ids`` (original size, crop top-left, target size) for square ``size`` images;
    None for pipelines without ``text_time`` conditioning."""
    if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        return None
    ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


def added_cond_kwargs(pipe: Any, pooled: torch.Tensor | None, size: int) -> dict[str, Any] | None:
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": sdxl_time_ids(pipe, size, pooled.shape[0], pooled.device, pooled.dtype)}


@dataclass
class LatentCache:
    """VAE posterior of each training image: mean and std (N, C, h, w); sampled per step."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[rows], self.std[rows]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


@torch.no_grad()
def encode_images(pipe: Any, images: Sequence[Any], batch: int = 16) -> LatentCache:
    """Encode RGB PIL images (all the same size) with the pipeline's VAE, once."""
    from consistent_diffusion.core.images import pil_to_tensor

    vae = pipe.vae
    device, dtype = vae.device, vae.dtype
    means, stds = [], []
    for start in range(0, len(images), batch):
        pixels = torch.cat([pil_to_tensor(image) for image in images[start : start + batch]])
        posterior = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))


def training_scheduler(pipe: Any) -> Any:
    """A DDPM scheduler with the pipeline's noise schedule (for ``add_noise`` and velocity targets)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def noise_and_target(
    scheduler: Any, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps (B,), target) for the scheduler's prediction type (DDPM training).

    Draws, in this order from ``generator``: noise e ~ N(0, I) shaped like ``latents`` (B, C, h, w),
    then t ~ U{0..T-1} (B,). z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) e (DDPM eq. 4). Target: e
    (epsilon), v = sqrt(abar_t) e - sqrt(1 - abar_t) z0 (v_prediction, Salimans & Ho 2022 sec. 4)
    or z0 (sample).
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    timesteps = torch.randint(0, int(scheduler.config.num_train_timesteps), (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ConsistentDiffusionError(f"unsupported prediction_type {kind!r}")
    return noisy, timesteps, target


def per_example_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example (B,), in float32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) for the scheduler's prediction type (Hang et al. 2023, eq. 10),
    with SNR(t) = abar_t / (1 - abar_t); ones when gamma <= 0.

    Min-SNR weights the x0 error by min(SNR, gamma). On the MSE of the model's own target that is

    - epsilon: min(SNR, gamma) / SNR, taken as its limit 1 where SNR = 0 (no 0/0 at zero terminal SNR);
    - v_prediction: min(SNR + 1, gamma + 1) / (SNR + 1). The paper's min(SNR, gamma) / (SNR + 1)
      is 0 at zero terminal SNR and ~SNR near it, so the steps where the model must choose the
      image's layout and colour from the text alone (Lin et al. 2024, sec. 3) would not be trained;
      weighting x0 by min(SNR, gamma) + 1 keeps them at the plain v-MSE (weight 1) and has the same
      decay gamma/SNR at high SNR;
    - sample: min(SNR, gamma).
    """
    if gamma <= 0:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        weights = torch.where(snr > gamma, torch.clamp(snr, max=gamma) / snr.clamp(min=1e-30), torch.ones_like(snr))
    elif kind == "v_prediction":
        weights = torch.clamp(snr + 1, max=gamma + 1) / (snr + 1)
    elif kind == "sample":
        weights = torch.clamp(snr, max=gamma)
    else:
        raise ConsistentDiffusionError(f"unsupported prediction_type {kind!r}")
    return weights


def min_snr_mse(
    prediction: torch.Tensor, target: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Scalar loss mean_b w_b MSE_b: per-example MSE (B,) weighted by ``min_snr_weights`` (plain MSE at gamma 0)."""
    weights = min_snr_weights(scheduler, timesteps, gamma).to(prediction.device)
    return (per_example_mse(prediction, target) * weights).mean()


def model_size(pipe: Any, resolution: int | None) -> int:
    """Training image side: ``resolution`` or the model's native size, checked against the VAE factor."""
    factor = vae_factor(pipe)
    size = resolution or native_size(pipe)[0]
    if size % factor:
        raise ConfigError(f"resolution {size} is not divisible by this model's VAE factor {factor}")
    return size


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)
