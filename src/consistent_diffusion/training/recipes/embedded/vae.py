"""The embedded recipe's VAE stages: stage 1 (AutoencoderKL from scratch), stage 2 (the latent and
text caches the UNet trains on) and stage 4 (a decoder-only fine-tune on the frozen latents), and
``publish_vae`` (pipeline/vae from whichever finished last)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.core.imageops import psnr
from consistent_diffusion.core.outputs import atomic_torch_save
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.models.embedded import load_text_encoder
from consistent_diffusion.training.loop import Task
from consistent_diffusion.training.recipes.embedded.config import BaseTrainConfig
from consistent_diffusion.training.recipes.embedded.stages import (
    atomic_save_pretrained,
    build_vae,
    encode_texts,
    evaluating,
    load_train_val,
    stage_dir,
    train_stage,
)


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
    values = []
    with evaluating(vae):
        for start in range(0, len(pixels), batch):
            x = pixels[start:start + batch]
            values.append(psnr(vae.decode(vae.encode(x).latent_dist.mode()).sample.cpu(), x.cpu()))
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
    train_stage(VAETask(config), config, "vae")
    return publish_vae(config)




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
        vae = AutoencoderKL.from_pretrained(vae_result(config)).to(config.device).eval()
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


def vae_result(config: BaseTrainConfig) -> Path:
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
    source = decoder if (decoder / "config.json").is_file() else vae_result(config)
    vae = AutoencoderKL.from_pretrained(source)
    scaling = _scaling_factor(config)
    if scaling is not None:
        vae.register_to_config(scaling_factor=scaling)
    atomic_save_pretrained(vae, config.out / "pipeline" / "vae")
    return config.out / "pipeline" / "vae"


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
        vae = AutoencoderKL.from_pretrained(vae_result(config))
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
        with evaluating(self.modules["vae"]) as vae:
            device = next(vae.parameters()).device
            value = psnr(vae.decode(self.val_latents.to(device)).sample.cpu(), as_batch(self.images[self.val_rows]))
        return {"psnr_db": round(float(value.mean()), 3)}

    def export(self, folder: Path) -> None:
        self.modules["vae"].save_pretrained(folder)


def train_decoder(config: BaseTrainConfig) -> Path:
    """Stage 4; rewrites pipeline/vae with the new decoder."""
    train_stage(DecoderTask(config), config, "decoder")
    return publish_vae(config)
