"""The pipeline's VAE: image <-> latent, and the native image size.

Spaces: images are pixels in [-1, 1] (``core.images.pil_to_tensor``); latents are the VAE's
posterior mean shifted by ``vae.config.shift_factor`` (0 for SD/SDXL) and scaled by
``vae.config.scaling_factor``, i.e. what the UNet sees: shape (B, C, H/f, W/f) with f the
pipeline's ``vae_scale_factor``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from consistent_diffusion.core.images import load_image, pil_to_tensor, tensor_to_pil

DEFAULT_VAE_FACTOR = 8  # SD/SDXL's VAE downsampling; used when a pipeline does not say


def vae_factor(pipe: Any) -> int:
    """Pixels per latent cell along each side (``pipe.vae_scale_factor``, 8 for SD/SDXL)."""
    return int(getattr(pipe, "vae_scale_factor", DEFAULT_VAE_FACTOR))


def native_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's native (width, height) in pixels: UNet sample size x VAE factor (square)."""
    side = int(pipe.unet.config.sample_size) * vae_factor(pipe)
    return side, side


@contextlib.contextmanager
def vae_precision(vae: Any) -> Iterator[Any]:
    """The VAE in float32 when it is fp16 and its config asks for upcasting (SDXL's overflows);
    back to fp16 on exit, even on error."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield vae
        return
    vae.to(torch.float32)
    try:
        yield vae
    finally:
        vae.to(torch.float16)


@torch.no_grad()
def encode_image(pipe: Any, image: Any, size: tuple[int, int]) -> torch.Tensor:
    """Image (path or PIL) -> (1, C, h, w) float32 latent: VAE posterior mean times ``scaling_factor``.

    The image passes ``load_image`` (mode, alpha, corrupt-file checks) and is resized +
    centre-cropped to ``size`` = (width, height).
    """
    pixels = pil_to_tensor(load_image(image, size))
    with vae_precision(pipe.vae) as vae:
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latent = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """(B, C, h, w) scaled latents -> list of RGB PIL images (inverse of ``encode_image``)."""
    with vae_precision(pipe.vae) as vae:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        return tensor_to_pil(vae.decode(latents).sample.float().cpu())
