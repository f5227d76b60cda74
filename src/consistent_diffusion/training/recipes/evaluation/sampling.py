"""How a model is sampled: settings, generation through ``methods.run``, starting noise, the
untrained baseline pipeline and CPU timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consistent_diffusion.methods.base import GenerationContext, run


@dataclass(frozen=True)
class Sampling:
    """How one model is sampled: denoising steps (of the pipeline's scheduler), guidance scale, guidance
    rescale (0: none)."""

    steps: int
    guidance: float
    guidance_rescale: float = 0.0

    def call_kwargs(self) -> dict:
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance,
                "guidance_rescale": self.guidance_rescale}


def sampling_of(results: dict) -> Sampling:
    """The sampling settings a results dict was measured with."""
    g = results["generation"]
    return Sampling(g["steps"], float(g["guidance"]), float(g.get("guidance_rescale", 0.0)))


@torch.no_grad()
def generate(pipe, prompts: list[dict], sampling: Sampling, batch: int = 32,
             latents: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1], one seed per prompt, through ``methods.run``.

    latents: optional starting noise (N, C, h, w) of unit variance; the pipeline multiplies it by
    ``scheduler.init_noise_sigma`` itself (``prepare_latents``), so it must not be pre-scaled.
    """
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        call_kwargs = sampling.call_kwargs()
        if latents is not None:
            call_kwargs["latents"] = latents[start:start + len(chunk)]
        ctx = GenerationContext(
            pipe=pipe, prompts=[item["prompt"] for item in chunk], negative_prompts=None,
            generators=[torch.Generator().manual_seed(item["seed"]) for item in chunk], call_kwargs=call_kwargs,
        )
        out.append(torch.stack(run(ctx, output_type="pt")).float() * 2 - 1)
    return torch.cat(out)


def untrained_pipeline(pipe):
    """The same architecture, random init (seed 0): the starting point of the recipe."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(pipe.vae.config)
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    untrained = StableDiffusionPipeline(vae=vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    untrained.set_progress_bar_config(disable=True)
    return untrained


def time_generation(pipe, threads: int, sampling: Sampling, steps: int = 30, images: int = 8) -> float:
    """Seconds for one call making ``images`` images at ``steps`` steps (after a warm-up)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def call(count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        call_kwargs = sampling.call_kwargs() | {"num_inference_steps": count}
        run(GenerationContext(pipe=pipe, prompts=["grinning face, google style"] * images, negative_prompts=None,
                              generators=[generator] * images, call_kwargs=call_kwargs))

    try:
        call(2)
        started = time.perf_counter()
        call(steps)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)


def starting_noise(pipe, seeds: Sequence[int]) -> torch.Tensor:
    """Unit-variance starting noise (N, C, h, w), one ``torch.randn`` per seed on a CPU generator.

    The pipeline scales it by ``scheduler.init_noise_sigma`` when it is passed as ``latents``."""
    size = pipe.unet.config.sample_size  # the pipeline's default image is sample_size * vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, size, size)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
