"""Inversion and editing as library calls, and the ``ddpm_edit`` method.

``invert`` records an image's noise maps in one pipeline call; ``edit`` re-samples them with
target prompts through ``methods.run`` (the one pipeline call site) with ``DdpmEdit`` applied;
``reconstruct`` is ``edit`` with the source prompt and cfg from step 0.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import load_image
from consistent_diffusion.methods.base import (
    GenerationContext,
    Method,
    default_guidance_rescale,
    register,
    run,
)
from consistent_diffusion.methods.common import batch_size, generation_size, restoring, swapped_scheduler
from consistent_diffusion.methods.inversion.math import sample_trajectory
from consistent_diffusion.methods.inversion.record import Inversion, inversion_reference
from consistent_diffusion.methods.inversion.scheduler import noise_map_scheduler
from consistent_diffusion.models.vae import encode_image, native_size


def _validate(steps: int, cfg: float, eta: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(cfg, (int, float)) and cfg >= 0):
        raise ConfigError(f"cfg (guidance scale) must be a number >= 0, got {cfg!r}")
    if not (isinstance(eta, (int, float)) and 0 < eta <= 1):
        raise ConfigError(f"eta must be in (0, 1] (1 = DDPM, as in the paper), got {eta!r}")


MODEL_DEFAULT = "model default"  # guidance_rescale: the model's own (``methods.base.default_guidance_rescale``)


@torch.no_grad()
def invert(
    pipe: Any,
    image: Any,
    prompt: str = "",
    *,
    steps: int = 50,
    cfg: float = 3.5,
    eta: float = 1.0,
    negative_prompt: str | None = None,
    generator: torch.Generator | None = None,
    size: tuple[int, int] | None = None,
    model: str | None = None,
    guidance_rescale: float | None | str = MODEL_DEFAULT,
) -> Inversion:
    """Edit-friendly DDPM inversion of ``image`` (Huberman-Spiegelglas et al. 2024, Algorithm 1).

    pipe: any SD-family text-to-image pipeline (SD 1.x/2.x, SDXL, the embedded model).
    image: path or PIL image; resized + centre-cropped to ``size`` = (width, height), default
    the pipeline's native size. prompt / cfg: the source description and guidance (the paper
    inverts with the source prompt and cfg 3.5). eta: 1 is DDPM. generator: draws the
    independent noises of eq. 6 (seed it for reproducible noise maps). guidance_rescale: the
    rescale of the guided prediction (Lin et al. 2024, eq. 16) the noise maps are computed with;
    by default the model's, as a series samples it (0.7 at zero terminal SNR), None for none. A
    reconstruction is exact only with the same prediction, so ``edit`` re-uses it.
    One pipeline call with ``steps`` UNet evaluations (conditional + unconditional batched).
    """
    _validate(steps, cfg, eta)
    if guidance_rescale == MODEL_DEFAULT:
        guidance_rescale = default_guidance_rescale(pipe)
    width, height = size or native_size(pipe)
    x0 = encode_image(pipe, image, (width, height))
    scheduler = noise_map_scheduler(pipe.scheduler)
    timesteps = scheduler.schedule(steps).clone().long()
    xs = sample_trajectory(scheduler, x0, timesteps, generator)
    scheduler.configure(eta=eta, targets=xs)
    dtype = pipe.unet.dtype
    ctx = GenerationContext(
        pipe=pipe,
        prompts=[prompt],
        negative_prompts=None if negative_prompt is None else [negative_prompt],
        generators=[torch.Generator()],  # unused: the starting latents and every step's noise are given
        call_kwargs={
            "num_inference_steps": steps,
            "guidance_scale": cfg,
            "height": height,
            "width": width,
            "latents": xs[:1].to(device=pipe.unet.device, dtype=dtype),
            **({} if guidance_rescale is None else {"guidance_rescale": float(guidance_rescale)}),
        },
    )
    with swapped_scheduler(pipe, scheduler):
        run(ctx, [], output_type="latent")
    if len(scheduler.nm_recorded) != steps:
        raise RuntimeError(f"the pipeline ran {len(scheduler.nm_recorded)} steps, expected {steps}")
    zs = torch.cat(scheduler.nm_recorded).float().cpu()
    # The trajectory the sampler really follows (equal to eq. 6's draws up to float rounding).
    xs = torch.cat([xs[:1].float().cpu(), torch.cat(scheduler.nm_landed).float().cpu()])
    config = {
        "steps": steps,
        "eta": float(eta),
        "height": height,
        "width": width,
        "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "pipeline": type(pipe).__name__,
        "guidance_rescale": None if guidance_rescale is None else float(guidance_rescale),
    }
    if model is not None:
        config["model"] = model
    config["seed"] = generator.initial_seed() if generator is not None else None
    return Inversion(
        x0=x0.cpu(),
        xs=xs.float().cpu(),
        zs=zs,
        timesteps=timesteps.cpu(),
        prompt=prompt,
        cfg=float(cfg),
        negative_prompt=negative_prompt,
        config=config,
    )


@torch.no_grad()
def edit(
    pipe: Any,
    inversion: Inversion,
    prompt: str | list[str] | None = None,
    *,
    cfg_tar: float | None = None,
    skip: int = 0,
    negative_prompt: str | None = None,
    output_type: str = "pil",
) -> Any:
    """Re-sample an inversion with a target prompt from step ``skip`` (paper section 5).

    prompt: target prompt(s) (default: the source prompt); one output per prompt, all sharing
    the inversion's noise maps. cfg_tar: target guidance (default: the inversion's cfg); the
    guidance rescale is the inversion's.
    skip: number of leading steps skipped (0..steps-1; larger keeps more of the input).
    With the source prompt, source cfg and skip=0 this reconstructs the input exactly.
    Returns a list of PIL images, or for ``output_type="latent"`` a (B, C, h, w) latent tensor.
    """
    prompts = [inversion.prompt] if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
    negative = negative_prompt if negative_prompt is not None else inversion.negative_prompt
    ctx = GenerationContext(
        pipe=pipe,
        prompts=prompts,
        negative_prompts=None if negative is None else [negative] * len(prompts),
        generators=[torch.Generator() for _ in prompts],  # unused: the noise is the inversion's
        call_kwargs={"guidance_scale": inversion.cfg if cfg_tar is None else cfg_tar,
                     **({} if inversion.guidance_rescale is None else {"guidance_rescale": inversion.guidance_rescale})},
    )
    images = run(ctx, [DdpmEdit(inversion=inversion, skip=skip)], output_type=output_type)
    if output_type in ("latent", "pt"):
        return torch.stack(images)
    if output_type == "np":
        import numpy as np

        return np.stack(images)
    return images


def reconstruct(pipe: Any, inversion: Inversion, output_type: str = "latent") -> Any:
    """Re-sample with the source prompt and cfg from step 0: gives back ``inversion.x0``."""
    return edit(pipe, inversion, None, cfg_tar=inversion.cfg, skip=0, output_type=output_type)


def match_inversion_size(ctx: GenerationContext, inversion: Inversion, name: str, steps: bool = True) -> None:
    """Set height/width (and with ``steps`` the step count) to the inversion's; warn when the
    caller asked for others. The inversion's latents fix the image size of the whole batch."""
    width, height = inversion.size
    wanted = {"height": height, "width": width}
    if steps:
        wanted = {"num_inference_steps": inversion.steps, **wanted}
    for key, value in wanted.items():
        given = ctx.call_kwargs.get(key)
        if given is not None and int(given) != value:
            warnings.warn(f"{name}: {key}={given} replaced by the inversion's {value}", UserWarning, stacklevel=4)
        ctx.call_kwargs[key] = value


@register("ddpm_edit")
@dataclass(frozen=True)
class DdpmEdit(Method):
    """Edit an inverted image: every batch element re-samples the inversion with its own prompt.

    Either ``inversion`` (an ``Inversion`` or the folder it was saved in) or ``image`` (a path,
    inverted at first use with the call's steps, size and guidance rescale, ``source_prompt``,
    ``source_cfg`` (default: the call's guidance scale) and ``seed``, then cached). The batch's
    guidance scale (``guidance_scale``) is the target cfg: with the source prompt, the source cfg
    and skip 0 the batch reconstructs the image exactly.
    The call's steps and size become the inversion's (a warning says so when they differ).
    """

    inversion: Any = None  # Inversion | str | os.PathLike
    skip: int = 0  # steps skipped at the start (0 = start from x_T), 0 <= skip < steps
    image: Any = None  # instead of an inversion: an image to invert (path or PIL)
    source_prompt: str = ""  # with image: its description, used to invert it
    source_cfg: float | None = None  # with image: guidance of its inversion (None: the call's guidance_scale)
    seed: int = 0  # with image: seed of the inversion's independent noises
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if (self.inversion is None) == (self.image is None):
            raise ConfigError("ddpm_edit needs exactly one of inversion (a folder from `invert`) or image")
        if isinstance(self.inversion, (str, os.PathLike)):
            object.__setattr__(self, "inversion", Inversion.load(self.inversion))
        if self.inversion is not None and not isinstance(self.inversion, Inversion):
            raise ConfigError(f"inversion must be an Inversion or its folder, got {type(self.inversion).__name__}")
        if not isinstance(self.skip, int) or isinstance(self.skip, bool) or self.skip < 0:
            raise ConfigError(f"skip must be an integer >= 0, got {self.skip!r}")
        if self.inversion is not None:
            _check_skip(self.skip, self.inversion.steps)
        if self.image is not None:
            load_image(self.image)  # fail early: missing, corrupt or empty image
            if self.source_cfg is not None:
                _validate(1, self.source_cfg, 1.0)
            if not isinstance(self.seed, int) or isinstance(self.seed, bool):
                raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def describe(self) -> dict[str, Any]:
        """Options that re-create the method (``get_method("ddpm_edit", **options)``)."""
        if self.inversion is not None:
            return {"name": self.name, "options": {"inversion": inversion_reference(self.inversion), "skip": self.skip}}
        image = os.path.abspath(os.fspath(self.image)) if isinstance(self.image, (str, os.PathLike)) else "<in-memory image>"
        return {"name": self.name, "options": {"image": image, "skip": self.skip, "source_prompt": self.source_prompt,
                                               "source_cfg": self.source_cfg, "seed": self.seed}}

    def inversion_for(self, ctx: GenerationContext) -> Inversion:
        """The inversion to edit: given, or the image inverted for this call's steps and size."""
        if self.inversion is not None:
            return self.inversion
        steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
        size = generation_size(ctx)
        from consistent_diffusion.models.identity import sampling_key

        rescale = ctx.call_kwargs.get("guidance_rescale")
        cfg = float(ctx.call_kwargs.get("guidance_scale", 3.5)) if self.source_cfg is None else self.source_cfg
        key = (sampling_key(ctx.pipe), steps, size, rescale, cfg)  # weights + scheduler, not id()
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = invert(ctx.pipe, self.image, self.source_prompt, steps=steps, cfg=cfg,
                                      size=size, generator=torch.Generator().manual_seed(self.seed),
                                      guidance_rescale=rescale)
        return self._cache[key]

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        if "latents" in ctx.call_kwargs or "image" in ctx.call_kwargs:
            raise ConfigError("ddpm_edit sets the starting latents itself: it cannot follow img2img or another "
                              "method that sets `latents`/`image`")
        inv = self.inversion_for(ctx)
        _check_skip(self.skip, inv.steps)
        with restoring(ctx):
            match_inversion_size(ctx, inv, "ddpm_edit")
            if "guidance_rescale" not in ctx.call_kwargs and inv.guidance_rescale is not None:
                ctx.call_kwargs["guidance_rescale"] = inv.guidance_rescale  # the call gives none: the inversion's
            unet = ctx.pipe.unet
            batch = batch_size(ctx)
            start = inv.xs[self.skip : self.skip + 1].expand(batch, -1, -1, -1)
            ctx.call_kwargs["latents"] = start.to(device=unet.device, dtype=unet.dtype).clone()
            scheduler = noise_map_scheduler(inv.scheduler_config or ctx.pipe.scheduler).configure(
                eta=inv.eta, noise_maps=inv.zs, skip=self.skip
            )
            with swapped_scheduler(ctx.pipe, scheduler):
                yield ctx


def _check_skip(skip: int, steps: int) -> None:
    if not 0 <= skip < steps:
        raise ConfigError(f"skip must be an integer in [0, {steps - 1}] for a {steps}-step inversion, got {skip!r}")
