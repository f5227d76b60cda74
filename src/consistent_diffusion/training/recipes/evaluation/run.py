"""One evaluation of an embedded model: its configuration and every measurement in order."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import contact_sheet, save_png_atomic, tensor_to_pil
from consistent_diffusion.data.emoji import load_emoji_dataset
from consistent_diffusion.methods.base import default_guidance_rescale
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.models.embedded import load_embedded_pipeline
from consistent_diffusion.models.sampling import DEFAULT_STEPS
from consistent_diffusion.training.recipes.embedded import vae_psnr
from consistent_diffusion.training.recipes.evaluation.colour import colour_binding, noise_colour_r2
from consistent_diffusion.training.recipes.evaluation.frechet import frechet_table
from consistent_diffusion.training.recipes.evaluation.guidance import choose_guidance
from consistent_diffusion.training.recipes.evaluation.probe_accuracy import probe_scores
from consistent_diffusion.training.recipes.evaluation.prompts import (
    heldout_rows,
    measured_styles,
    noise_prompt,
    prompt_set,
)
from consistent_diffusion.training.recipes.evaluation.retrieval import identity_retrieval
from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate, time_generation


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of an embedded model."""

    data: Path  # emoji dataset folder
    weights: Path | None = None  # embedded weights folder (None: the package's)
    probes: Path | None = None  # probes folder (None: the package's)
    out: Path | None = None  # folder for samples.png (None: no image written)
    styles: tuple[str, ...] | None = None  # styles measured (None: trained styles the style probe labels)
    per_category: int | None = None  # identities per category (None: >= MIN_PROMPT_IMAGES images)
    tuning_per_category: int = 2  # identities per category of the guidance tuning set
    steps: int = DEFAULT_STEPS  # denoising steps of the default sampler (models.sampling)
    guidance: float = 5.0  # guidance scale (unless guidance_sweep chooses one)
    guidance_sweep: tuple[float, ...] = ()  # scales to choose from on a separate tuning prompt set
    guidance_rescale: float | None = None  # None: the model's (methods.base.default_guidance_rescale), else 0
    colour_seeds: int = 4  # seeds per (colour, style) of the colour-binding set
    noise_seeds: int = 48  # seeds of the noise -> colour regression
    retrieval_k: int = 5  # top-k of the identity retrieval
    threads: int = 1  # torch CPU threads
    timing_threads: tuple[int, ...] = (1, 2)  # thread counts the CPU timing runs at (1 is always among them)

    def __post_init__(self) -> None:
        for name in ("tuning_per_category", "steps", "threads", "colour_seeds", "retrieval_k"):
            _check_positive_int(name, getattr(self, name))
        if self.per_category is not None:
            _check_positive_int("per_category", self.per_category)
        _check_positive_int("noise_seeds", self.noise_seeds)
        if self.noise_seeds < 8:
            raise ConfigError(f"noise_seeds must be >= 8 to fit a 4-channel regression, got {self.noise_seeds}")
        if self.guidance_rescale is not None and not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.styles is not None:
            if not self.styles:
                raise ConfigError("styles must name at least one style (or be None)")
            object.__setattr__(self, "styles", tuple(self.styles))
        object.__setattr__(self, "guidance_sweep", tuple(float(g) for g in self.guidance_sweep))
        object.__setattr__(self, "timing_threads", tuple(self.timing_threads))
        for count in self.timing_threads:
            _check_positive_int("timing_threads", count)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def evaluate(config: EvalConfig) -> dict:
    """All measurements (see the package docstring) of one model on its ``measured_styles``."""
    torch.set_num_threads(config.threads)
    dataset = load_emoji_dataset(config.data)
    pipe = load_embedded_pipeline(folder=config.weights)
    pipe.set_progress_bar_config(disable=True)
    styles = measured_styles(dataset, config.styles, config.probes)
    rescale = config.guidance_rescale if config.guidance_rescale is not None else default_guidance_rescale(pipe) or 0.0
    held = heldout_rows(dataset, styles)
    real_held = as_batch(dataset.images[held])
    results: dict = {"styles": styles, "styles_given": config.styles is not None,
                     "scheduler": {"class": type(pipe.scheduler).__name__} | {k: pipe.scheduler.config.get(k) for k in
                                   ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")},
                     "heldout_real_images": len(held), "vae_psnr_db_heldout": round(vae_psnr(pipe.vae, real_held), 3)}
    unseen = heldout_rows(dataset, dataset.heldout_styles)
    if len(unseen):
        results["heldout_style_images"] = len(unseen)
        results["vae_psnr_db_heldout_styles"] = round(vae_psnr(pipe.vae, as_batch(dataset.images[unseen])), 3)
    sampling = Sampling(config.steps, config.guidance, rescale)
    if config.guidance_sweep:
        results["guidance_tuning"] = choose_guidance(pipe, dataset, list(config.guidance_sweep), sampling,
                                                     config.probes, styles, config.tuning_per_category)
        sampling = Sampling(config.steps, results["guidance_tuning"]["chosen"], rescale)
    prompts = prompt_set(dataset, config.per_category, styles)
    started = time.perf_counter()
    generated = generate(pipe, prompts, sampling)
    results["generation"] = {"images": len(prompts), "steps": sampling.steps, "guidance": sampling.guidance,
                             "guidance_rescale": sampling.guidance_rescale,
                             "seconds": round(time.perf_counter() - started, 1)}
    results.update(probe_scores(generated, prompts, config.probes))
    results["identity_retrieval"] = identity_retrieval(generated, prompts, dataset, config.probes, config.retrieval_k)
    results["frechet_efficientnet_lite0"] = frechet_table(dataset, pipe, prompts, generated, real_held, sampling,
                                                          styles)
    results["colour_binding"] = colour_binding(pipe, dataset, styles, sampling, config.colour_seeds)
    results["noise_colour"] = noise_colour_r2(pipe, sampling, noise_prompt(styles), config.noise_seeds)
    results["cpu_seconds_8_images_30_steps"] = {
        f"{t}_threads": round(time_generation(pipe, t, sampling), 2) for t in sorted({1, *config.timing_threads})
    }
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}
    if config.out:
        columns = len(styles) * max(1, 8 // len(styles))
        sheet = contact_sheet(tensor_to_pil(generated[:columns * 8]), columns=columns)
        save_png_atomic(sheet, Path(config.out) / "samples.png")
    return results
