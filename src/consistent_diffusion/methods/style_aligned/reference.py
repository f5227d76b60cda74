"""StyleAligned's reference row: a generated entry prepended to the batch, or a real image pinned to its x_t.

The reference is row 0 of each classifier-free-guidance half of the batch (see ``attention``).

- Generated (``prepend_reference``): an internal entry (prompt + seeded generator) put in front of
  the batch. When a previous method fixed the starting latents, its x_T ~ N(0, I) is drawn with
  the entry's generator, (1, C, h, w), and, on a ``ddpm_edit`` scheduler that skips its first
  ``skip`` steps, advanced to the step where the batch starts (``_advance_to_batch_start``).
- Real (``use_real_reference``): an image inverted with edit-friendly DDPM inversion
  (``methods.inversion``; ``cached_reference_inversion`` inverts it at first use). Its row follows
  x_t ~ q(x_t | x0), ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_t`` (eq. 6), step by step:
  ``reference_trajectory`` gives those x_t, (N + 1, C, h, w) with the last = x0, and
  ``_pinned_first_row`` pins row 0 to them in a ``NoiseMapScheduler``. Pinning needs a sampler whose
  samples are the x_t of eq. 6 (``_sampler_for_real_reference``): ``ddpm_edit``'s noise-map
  scheduler or the pipeline's DDIMScheduler is kept; any other scheduler is replaced by DDIM (eta 0)
  over its training schedule for the call, with a warning.

Latents are VAE latents scaled by ``vae.config.scaling_factor`` (what the UNet sees).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import DDIMScheduler

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.methods.common import generation_size, swapped_scheduler
from consistent_diffusion.methods.inversion import (
    NoiseMapScheduler,
    invert,
    match_inversion_size,
    noise_map_scheduler,
    sample_trajectory,
)


def _seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


# -- a generated reference ---------------------------------------------------------------------


def prepend_reference(ctx: GenerationContext, prompt: str, generator: torch.Generator) -> None:
    """Prepend an internal generated reference entry (``prompt``, ``generator``) to the batch in ``ctx``.

    The series' negative prompt applies to it too; starting latents fixed by a previous method get
    the reference's (1, C, h, w) in front, brought to the batch's start step. Needs
    ``num_images_per_prompt=1``.
    """
    if int(ctx.call_kwargs.get("num_images_per_prompt") or 1) != 1:
        raise ConfigError("StyleAligned with an internal reference needs num_images_per_prompt=1")
    negative = None
    if ctx.negative_prompts is not None:  # the series' negative prompt applies to its reference too
        negative = ctx.negative_prompts[0] if ctx.negative_prompts else ""
    if "latents" in ctx.call_kwargs:  # a previous method fixed the starting latents: add the reference's
        latents = ctx.call_kwargs["latents"]
        first = torch.randn((1, *latents.shape[1:]), generator=generator, dtype=torch.float32).to(latents)
        first = _advance_to_batch_start(ctx, prompt, negative, generator, first)
        ctx.call_kwargs["latents"] = torch.cat([first, latents])
    ctx.prompts = [prompt, *ctx.prompts]
    if ctx.negative_prompts is not None:
        ctx.negative_prompts = [negative, *ctx.negative_prompts]
    ctx.generators = [generator, *ctx.generators]
    ctx.num_internal += 1


def _advance_to_batch_start(
    ctx: GenerationContext, prompt: str, negative: str | None, generator: torch.Generator, latent: torch.Tensor
) -> torch.Tensor:
    """A generated reference's latent at the step where the batch starts.

    ``latent`` (1, C, h, w) is pure noise x_T. When the pipeline's scheduler is a noise-map
    scheduler that skips its first ``skip`` steps (``ddpm_edit`` at ``skip > 0``), the other rows
    start at x_{t_skip}; the reference is brought there by running those ``skip`` steps for it
    alone (same noise maps, guidance and conditioning; ``skip`` UNet calls at batch 1), so it
    is the image it would be at ``skip = 0``. Otherwise ``latent`` is returned unchanged.
    """
    scheduler = ctx.pipe.scheduler
    if not isinstance(scheduler, NoiseMapScheduler) or scheduler.skip == 0:
        return latent
    head = GenerationContext(
        pipe=ctx.pipe,
        prompts=[prompt],
        negative_prompts=None if negative is None else [negative],
        generators=[generator],
        call_kwargs={**ctx.call_kwargs, "latents": latent},
    )
    with swapped_scheduler(ctx.pipe, scheduler.leading_part()):
        return run(head, [], output_type="latent")[0].unsqueeze(0).to(latent)


# -- a real reference --------------------------------------------------------------------------


def cached_reference_inversion(
    ctx: GenerationContext,
    image: Any,
    image_prompt: str,
    cfg: float | None,
    seed: int,
    cache: dict,
) -> Any:
    """The ``Inversion`` of the real reference ``image`` for this call, inverted at first use.

    Inverted with the call's steps, guidance ``cfg`` (default: the call's ``guidance_scale``, 3.5
    if unset), guidance rescale and size, its noises seeded with ``seed`` (so the reference row,
    sampled with the same prediction, lands on the image). ``cache`` holds the last one, keyed by
    what it depends on (the pipeline's weights + scheduler identity, steps, guidance, rescale, size).
    """
    if "image" in ctx.call_kwargs:
        raise ConfigError("a real StyleAligned reference cannot be combined with img2img in one call; "
                          "use reference_prompt (a generated reference) with img2img")
    from consistent_diffusion.models.identity import sampling_key

    steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
    if cfg is None:
        cfg = float(ctx.call_kwargs.get("guidance_scale", 3.5))
    size = generation_size(ctx)
    rescale = ctx.call_kwargs.get("guidance_rescale")
    key = (sampling_key(ctx.pipe), steps, cfg, size, rescale)  # weights + scheduler, not id()
    if key not in cache:
        cache.clear()
        cache[key] = invert(
            ctx.pipe,
            image,
            image_prompt,
            steps=steps,
            cfg=cfg,
            size=size,
            generator=_seeded(seed),
            guidance_rescale=rescale,
        )
    return cache[key]


def use_real_reference(ctx: GenerationContext, inversion: Any, seed: int, sampling: dict) -> Any:
    """Prepend the real reference as internal row 0, pinned to its noisy latents x_t.

    The batch takes the inversion's size and keeps the call's steps; missing starting latents are
    drawn as the pipeline would, (B, C, h, w). ``seed`` seeds a redrawn trajectory and the row's
    generator. Returns the context that installs the sampler (the scheduler swap, or the pin on a
    ``ddpm_edit`` scheduler already in place); records what samples in ``sampling`` (cleared first).
    """
    if "image" in ctx.call_kwargs:
        raise ConfigError("a real StyleAligned reference cannot be combined with img2img in one call")
    current = ctx.pipe.scheduler
    composed = isinstance(current, NoiseMapScheduler)  # e.g. ddpm_edit: keep its noise maps, pin row 0
    if ctx.call_kwargs.get("latents") is not None and not composed:
        raise ConfigError("a real StyleAligned reference needs to set the starting latents itself")
    match_inversion_size(ctx, inversion, "style_aligned", steps=False)  # its latent fixes the batch's size
    steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
    ctx.call_kwargs["num_inference_steps"] = steps
    sampler, replaced = _sampler_for_real_reference(current)
    timesteps = sampler.schedule(steps).cpu().long()
    trajectory, source = reference_trajectory(inversion, sampler, timesteps, seed)
    unet = ctx.pipe.unet
    if ctx.call_kwargs.get("latents") is None:
        width, height = inversion.size
        factor = int(ctx.pipe.vae_scale_factor)
        shape = (1, int(unet.config.in_channels), height // factor, width // factor)
        # The same draws the pipeline would make for these generators (diffusers' randn_tensor).
        ctx.call_kwargs["latents"] = torch.cat(
            [torch.randn(shape, generator=g, dtype=torch.float32) for g in ctx.generators]
        ).to(device=unet.device, dtype=unet.dtype)
    start = sampler.skip
    latents = ctx.call_kwargs["latents"]
    ctx.call_kwargs["latents"] = torch.cat([trajectory[start : start + 1].to(latents), latents])
    ctx.prompts = [inversion.prompt, *ctx.prompts]
    if ctx.negative_prompts is not None:
        ctx.negative_prompts = [inversion.negative_prompt or "", *ctx.negative_prompts]
    ctx.generators = [_seeded(seed), *ctx.generators]
    ctx.num_internal += 1
    sampling.clear()
    sampling.update(
        sampler="ddpm_edit noise maps" if composed else "DDIMScheduler",
        replaced=replaced,
        steps=steps,
        eta=float(ctx.call_kwargs.get("eta") or 0.0) if not composed else float(sampler.nm_eta),
        timesteps=[int(t) for t in timesteps],
        reference_trajectory=source,
        size=list(inversion.size),
    )
    if replaced is not None:
        warnings.warn(  # stacklevel: here <- StyleAligned.applied <- contextlib's __enter__ <- the caller's with
            f"StyleAligned: a real reference is pinned to its x_t, which needs DDIM sampling; "
            f"{replaced} is replaced by DDIM (eta 0) over the same training schedule for this call",
            UserWarning,
            stacklevel=4,
        )
    return _pinned_first_row(ctx.pipe, sampler, trajectory, swap=not composed)


def _sampler_for_real_reference(current: Any) -> tuple[Any, str | None]:
    """The NoiseMapScheduler that samples a batch with a pinned real reference, and the name of
    the pipeline's scheduler it replaces (None when the pipeline's own is kept).

    ``ddpm_edit``'s scheduler (already a NoiseMapScheduler) is used as is; the pipeline's
    DDIMScheduler is kept (same config; plain DDIM steps with the call's eta); any other
    scheduler (whose samples are not the x_t of eq. 6, or that steps several times per
    timestep) is replaced by DDIM over its training schedule (betas, spacing, prediction type).
    """
    if isinstance(current, NoiseMapScheduler):
        return current, None
    if isinstance(current, DDIMScheduler):
        return noise_map_scheduler(current, exact=False), None
    return noise_map_scheduler(current), type(current).__name__


def reference_trajectory(
    inversion: Any, scheduler: Any, timesteps: torch.Tensor, seed: int
) -> tuple[torch.Tensor, str]:
    """The real reference's x_t at ``timesteps`` (N,) of ``scheduler``: (N + 1, C, h, w), last = x0.

    The inversion's own trajectory ``xs`` when it was made at these timesteps over the same
    noise levels (alphas_cumprod); else drawn afresh from its x0 by eq. 6 (``sample_trajectory``,
    seeded with ``seed``): the pinned row only needs x_t ~ q(x_t | x0) at each step.
    Returns the trajectory and how it was obtained.
    """
    same_steps = torch.equal(timesteps.cpu().long(), inversion.timesteps.cpu().long())
    if same_steps and inversion.scheduler_config is not None:
        levels = noise_map_scheduler(inversion.scheduler_config).alphas_cumprod
        same_steps = torch.equal(levels.cpu(), scheduler.alphas_cumprod.cpu())
    if same_steps:
        return inversion.xs, "inversion"
    drawn = sample_trajectory(scheduler, inversion.x0, timesteps.cpu().long(), _seeded(seed))
    return drawn, f"redrawn from x0 (eq. 6, seed {int(seed)})"


@contextlib.contextmanager
def _pinned_first_row(pipe: Any, sampler: Any, trajectory: torch.Tensor, swap: bool) -> Iterator[None]:
    """Row 0 (just prepended) follows ``trajectory`` on ``sampler``; with ``swap`` the sampler
    replaces the pipeline's scheduler. Undone on exit, even on error."""
    sampler.shift_pins(1)
    sampler.pin(0, trajectory)
    try:
        with swapped_scheduler(pipe, sampler) if swap else contextlib.nullcontext():
            yield
    finally:
        sampler.unpin(0)
        sampler.shift_pins(-1)
