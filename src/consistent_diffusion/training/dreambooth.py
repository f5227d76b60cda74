"""DreamBooth (Ruiz et al., CVPR 2023): bind a subject to a rare token by fine-tuning the UNet.

The UNet (optionally the text encoder) learns to denoise the 3-20 instance images under the
instance prompt ("a photo of sks emoji"). Class-prior preservation (paper eq. 2) adds the same
denoising loss on images the *base* model generated for the class prompt ("an emoji"), weighted
by ``prior_loss_weight``, so that the class keeps its variety. LoRA DreamBooth
(``training.lora``) is this task with low-rank adapters as the only trainable parameters.

The loss is the standard DDPM objective: for latents z0 (VAE posterior sample x scaling factor),
noise e ~ N(0, I) and t ~ U{0..T-1}, z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) e (DDPM eq. 4), and
the UNet regresses e (or v for v-prediction models) with mean squared error.

Works on SD 1.x/2.x-shaped pipelines (the embedded model included) and SDXL-shaped ones (pooled
text embeddings and ``time_ids`` as added conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.training.data import (
    class_images_folder,
    ensure_class_images,
    load_image_set,
)
from consistent_diffusion.training.diffusion import (
    added_cond_kwargs,
    encode_images,
    encode_text,
    model_size,
    noise_and_target,
    per_example_mse,
    training_scheduler,
)
from consistent_diffusion.training.loop import (
    Task,
    TrainResult,
    check_out_folder,
    run_training,
    write_validation_images,
)
from consistent_diffusion.training.loop_config import LoopConfig


@dataclass(kw_only=True)
class DreamBoothConfig(LoopConfig):
    """A DreamBooth run. ``out`` is the run folder; the model lands in ``out/model``."""

    instance_dir: Path  # folder of 1-20 images of the subject (any size/mode; centre-cropped)
    instance_prompt: str  # names the subject with a rare token, e.g. "a photo of sks emoji"
    class_prompt: str | None = None  # the subject's class, e.g. "an emoji" (needed for prior preservation)
    prior_preservation: bool = False  # add the class-prior loss on base-model class images
    prior_loss_weight: float = 1.0  # weight of the class-prior loss (paper: 1)
    num_class_images: int = 100  # class images generated once with the base model, cached
    class_images_dir: Path | None = None  # cache folder (default: out/class_images)
    class_steps: int = 25  # denoising steps for class images
    class_guidance: float = 7.5  # guidance for class images
    train_text_encoder: bool = False  # full DreamBooth only: also fine-tune the text encoder(s)
    learning_rate: float = 5e-6
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.instance_dir = Path(self.instance_dir)
        if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
            raise ConfigError("instance_prompt is empty; name the subject with a rare token, e.g. 'a photo of sks emoji'")
        if self.prior_preservation and not (self.class_prompt and self.class_prompt.strip()):
            raise ConfigError("prior preservation needs a class prompt (--class-prompt 'an emoji')")
        if isinstance(self.num_class_images, bool) or not isinstance(self.num_class_images, int) or self.num_class_images < 1:
            raise ConfigError(f"num_class_images must be a positive integer, got {self.num_class_images!r}")
        if isinstance(self.class_steps, bool) or not isinstance(self.class_steps, int) or self.class_steps < 1:
            raise ConfigError(f"class_steps must be a positive integer, got {self.class_steps!r}")
        if not isinstance(self.prior_loss_weight, (int, float)) or self.prior_loss_weight < 0:
            raise ConfigError(f"prior_loss_weight must be a number >= 0, got {self.prior_loss_weight!r}")
        if self.class_images_dir is not None:
            self.class_images_dir = Path(self.class_images_dir)


class DreamBoothTask(Task):
    """Full DreamBooth (and, through ``training.lora``, LoRA DreamBooth) on one pipeline."""

    result_name = "model"

    def __init__(self, pipe: Any, config: DreamBoothConfig) -> None:
        super().__init__()
        self.pipe, self.config = pipe, config
        self.size = model_size(pipe, config.resolution)
        self.noise_scheduler = training_scheduler(pipe)
        instance = load_image_set(config.instance_dir, self.size, what="instance")
        self.instance_files = [str(p) for p in instance.files]
        self.skipped = [(str(p), why) for p, why in instance.skipped]
        self.class_images: list[Any] = []
        if config.prior_preservation:  # with the base model, before any weight changes
            root = config.class_images_dir or config.out / "class_images"
            folder = class_images_folder(root, config.class_prompt, self.size, config.class_steps, config.class_guidance)
            self.class_images = ensure_class_images(
                pipe, config.class_prompt, config.num_class_images, folder, self.size,
                steps=config.class_steps, guidance=config.class_guidance, seed=config.seed, progress=config.progress,
            )
        self.instance_latents = encode_images(pipe, instance.images)
        self.class_latents = encode_images(pipe, self.class_images) if self.class_images else None
        for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        self.setup_trainable()
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if not self.trains_text:
            with torch.no_grad():
                for prompt in self.prompts():
                    embeds, pooled = encode_text(pipe, [prompt])
                    self.text_cache[prompt] = (embeds.detach(), None if pooled is None else pooled.detach())

    # -- what is trained ------------------------------------------------------------------------

    @property
    def trains_text(self) -> bool:
        return bool(self.config.train_text_encoder)

    def setup_trainable(self) -> None:
        pipe = self.pipe
        pipe.unet.requires_grad_(True)
        if self.config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        self.modules["unet"] = pipe.unet
        if self.config.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(pipe, name, None)
                if module is not None:
                    module.requires_grad_(True)
                    self.modules[name] = module

    def prompts(self) -> list[str]:
        return [self.config.instance_prompt] + ([self.config.class_prompt] if self.config.prior_preservation else [])

    def prepare(self, accelerator: Any, device: torch.device) -> None:
        self.pipe.to(device)

    # -- one step -------------------------------------------------------------------------------

    def _text(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.trains_text:
            encoders = [self.forward_module("text_encoder")]
            if getattr(self.pipe, "text_encoder_2", None) is not None:
                encoders.append(self.forward_module("text_encoder_2"))
            return encode_text(self.pipe, prompts, encoders)
        embeds = torch.cat([self.text_cache[p][0] for p in prompts]).to(device)
        pooled = None if self.text_cache[prompts[0]][1] is None else torch.cat([self.text_cache[p][1] for p in prompts]).to(device)
        return embeds, pooled

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self.config.batch_size
        rows = torch.randint(0, self.instance_latents.mean.shape[0], (batch,), generator=generator)
        latents = [self.instance_latents.sample(rows, generator)]
        prompts = [self.config.instance_prompt] * batch
        if self.class_latents is not None:
            class_rows = torch.randint(0, self.class_latents.mean.shape[0], (batch,), generator=generator)
            latents.append(self.class_latents.sample(class_rows, generator))
            prompts += [self.config.class_prompt] * batch
        latents = torch.cat(latents)
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, latents, generator)
        embeds, pooled = self._text(prompts, device)
        prediction = self.forward_module("unet")(
            noisy.to(device), timesteps.to(device), encoder_hidden_states=embeds,
            added_cond_kwargs=added_cond_kwargs(self.pipe, pooled, self.size), return_dict=False,
        )[0]
        per_example = per_example_mse(prediction, target.to(device))
        instance_loss = per_example[:batch].mean()
        logs = {"instance_loss": float(instance_loss.detach())}
        loss = instance_loss
        if self.class_latents is not None:
            prior_loss = per_example[batch:].mean()
            loss = instance_loss + self.config.prior_loss_weight * prior_loss
            logs["prior_loss"] = float(prior_loss.detach())
        return loss, logs

    # -- validation and result ------------------------------------------------------------------

    def validate(self, step: int, folder: Path) -> None:
        """Validation prompt i with seed i, the pipeline's default guidance, through ``methods.run``."""
        from consistent_diffusion.methods.base import GenerationContext, run

        prompts = list(self.config.validation_prompts)
        if not prompts:
            return
        was_training = {name: module.training for name, module in self.modules.items()}
        for module in self.modules.values():
            module.eval()
        ctx = GenerationContext(
            pipe=self.pipe, prompts=prompts, negative_prompts=None,
            generators=[torch.Generator("cpu").manual_seed(index) for index in range(len(prompts))],
            call_kwargs={"num_inference_steps": self.config.validation_steps, "height": self.size, "width": self.size},
        )
        try:
            images = run(ctx)
        finally:
            for name, module in self.modules.items():
                module.train(was_training[name])
        write_validation_images(images, prompts, folder)

    def export(self, folder: Path) -> None:
        """A complete diffusers folder, usable as ``--model``."""
        self.pipe.save_pretrained(folder, safe_serialization=True)

    def identity(self) -> dict[str, Any]:
        from consistent_diffusion.models.loading import model_identity

        return {**model_identity(self.pipe).to_dict(), "instance_files": self.instance_files,
                "skipped_files": self.skipped}


def load_base_pipeline(spec: str, device: str = "cpu") -> Any:
    """The base model in float32 (training keeps weights in float32; use mixed precision for speed)."""
    from consistent_diffusion.models.loading import load_pipeline

    return load_pipeline(spec, device="cpu" if device == "cpu" else device, dtype=torch.float32)


def train_dreambooth(config: DreamBoothConfig, pipe: Any, on_step_end: Any = None) -> TrainResult:
    """Run full DreamBooth on ``pipe`` (modified in place); the model is written to ``out/model``."""
    check_out_folder(config)
    return run_training(DreamBoothTask(pipe, config), config, "dreambooth", on_step_end=on_step_end)
