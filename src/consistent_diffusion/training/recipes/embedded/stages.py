"""What every stage of the embedded recipe shares: the random diffusers models it trains, the
run folder's layout (``state/<stage>/``), each stage's loop options, the train/val images and the
log summary."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_output_dir
from consistent_diffusion.training.checkpoints import write_handoff
from consistent_diffusion.training.loop import Task, run_training
from consistent_diffusion.training.loop_config import LoopConfig
from consistent_diffusion.training.recipes.embedded.config import (
    DECODER_WARMUP,
    SCHEDULER_CONFIG,
    VAE_WARMUP,
    BaseTrainConfig,
    UNetConfig,
    VAEConfig,
)


def build_vae(config: VAEConfig):
    """A random AutoencoderKL: (B, 3, 64, 64) in [-1, 1] <-> (B, latent_channels, 16, 16)."""
    from diffusers import AutoencoderKL

    blocks = len(config.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.channels, layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=min(32, min(config.channels)),
        sample_size=64,
    )


def build_unet(config: UNetConfig, latent_channels: int = 4, cross_attention_dim: int = 384, sample_size: int = 16):
    """A random UNet2DConditionModel for (B, 4, 16, 16) latents and (B, L, 384) text states."""
    from diffusers import UNet2DConditionModel

    n = len(config.channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=config.channels,
        layers_per_block=config.layers_per_block, attention_head_dim=config.heads,
        cross_attention_dim=cross_attention_dim, norm_num_groups=32,
    )


def build_scheduler():
    """The training noise schedule (DDPM, v-prediction, zero terminal SNR)."""
    from diffusers import DDPMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample",
            "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k in keep})


@torch.no_grad()
def encode_texts(texts: list[str], tokenizer, model, batch: int = 256, device: str = "cpu") -> torch.Tensor:
    """Token states (K, max_length, 384) float32, as StableDiffusionPipeline.encode_prompt makes them."""
    states = []
    for start in range(0, len(texts), batch):
        ids = tokenizer(texts[start:start + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        states.append(model.to(device)(ids)[0].float().cpu())
    return torch.cat(states)


# ----------------------------------------------------------------------------- run-folder helpers


def atomic_save_pretrained(model, folder: Path, **kwargs) -> None:
    """``save_pretrained`` into a temp sibling, then swap it into place."""
    with atomic_output_dir(folder, overwrite=True) as temp:
        model.save_pretrained(temp, **kwargs)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for the block, then back in the mode it was in (validation mid-training)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def stage_kind(stage: str) -> str:
    """The loop's run kind of one stage (recorded in its checkpoints and hand-offs)."""
    return f"embedded-{stage}"


def write_unet_handoff(config: BaseTrainConfig, path: Path) -> Path:
    """The UNet stage's newest checkpoint as a compact hand-off (float16 weights and EMA, no optimizer
    state): what a committed training stage carries to the next machine (``warm_start``)."""
    return write_handoff(stage_dir(config.out, "unet"), path)


def stage_dir(out: Path, stage: str) -> Path:
    """The loop's run folder of one stage (vae | unet | decoder)."""
    return Path(out) / "state" / stage


class TrainingStopped(ConsistentDiffusionError):
    """Training paused on purpose (``stop_after_steps``, SIGINT/SIGTERM); the checkpoint is written, --resume continues."""


@dataclass(kw_only=True)
class StageConfig(LoopConfig):
    """The loop options of one stage, plus the stage's model and loss options (checked on resume)."""

    options: dict[str, Any] = field(default_factory=dict)


def stage_config(config: BaseTrainConfig, stage: str) -> StageConfig:
    """``config`` -> the loop options of ``stage`` (budgets, learning rates, schedules as in the recipe)."""
    v, u = config.vae, config.unet
    if stage == "vae":
        budget = dict(steps=v.steps, max_minutes=v.minutes, batch_size=v.batch, learning_rate=v.lr,
                      lr_warmup_steps=VAE_WARMUP, adam_weight_decay=0.0)
        options = {k: getattr(v, k) for k in ("channels", "layers_per_block", "latent_channels", "crop",
                                              "crop_fraction", "kl_weight", "mse_weight")}
    elif stage == "unet":
        budget = dict(steps=u.steps, max_minutes=u.minutes, batch_size=u.batch, learning_rate=u.lr,
                      lr_warmup_steps=u.warmup, adam_weight_decay=1e-2, ema_decay=u.ema_decay,
                      mixed_precision=u.mixed_precision, warm_start=config.warm_start)
        options = {k: getattr(u, k) for k in ("channels", "layers_per_block", "heads", "caption_dropout",
                                              "min_snr_gamma")} | {"max_length": config.max_length}
    elif stage == "decoder":
        budget = dict(steps=v.decoder_steps, max_minutes=max(v.decoder_minutes, 1e-9), batch_size=v.batch,
                      learning_rate=v.decoder_lr, lr_warmup_steps=DECODER_WARMUP, adam_weight_decay=0.0)
        options = {"mse_weight": v.mse_weight}
    else:
        raise ConfigError(f"no training stage {stage!r}")
    return StageConfig(
        out=stage_dir(config.out, stage), lr_schedule="cosine", max_grad_norm=1.0, checkpoint_every=budget["steps"],
        checkpoint_minutes=config.checkpoint_minutes, keep_checkpoints=1, seed=config.seed, device=config.device,
        threads=config.threads, log_every=config.log_every, resume=config.resume, progress=config.progress,
        stop_after_steps=config.stop_after_steps, pause_after_minutes=config.pause_minutes, options={k: list(x) if isinstance(x, tuple) else x
                                                           for k, x in options.items()},
        **budget,
    )


def train_stage(task: Task, config: BaseTrainConfig, stage: str) -> Path:
    """Run one stage through the loop; its result folder, or TrainingStopped if it paused."""
    result = run_training(task, stage_config(config, stage), stage_kind(stage))
    if result.stopped or result.result is None:
        raise TrainingStopped(f"{stage} paused at step {result.step}; continue with --resume")
    return result.result




def load_train_val(config: BaseTrainConfig) -> tuple[np.ndarray, list[dict], np.ndarray, np.ndarray]:
    """(images (N,64,64,3) uint8, records, train indices, val indices); holdout is never returned."""
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(config.data)
    train, val = dataset.trainable("train"), dataset.trainable("val")  # never a held-out style
    if len(train) == 0:
        raise ConsistentDiffusionError(f"{config.data} has no training images")
    return dataset.images, dataset.records, train, val


def summarise_log(out: Path) -> dict:
    """Steps and wall time of each stage, and its last validation numbers, from state/<stage>/log.jsonl."""
    summary: dict[str, dict] = {}
    for stage in ("vae", "unet", "decoder"):
        path = stage_dir(out, stage) / "log.jsonl"
        if not path.is_file():
            continue
        entry = summary.setdefault(stage, {})
        for line in path.read_text().splitlines():
            record = json.loads(line)
            entry["steps"] = max(entry.get("steps", 0), record["step"])
            if "elapsed_s" in record:
                entry["minutes"] = round(record["elapsed_s"] / 60, 2)
            if "val" in record:
                entry["val"] = record["val"]
    return summary
