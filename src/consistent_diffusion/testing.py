"""Tiny random-init pipelines built in code, for fast tests and for trying things offline.

Nothing here downloads anything. The CLIP tokenizer is a real ``CLIPTokenizer`` over a
byte-level vocabulary (256 byte symbols, their end-of-word forms and the special tokens, no
merges), so any text tokenizes, deterministically, exactly as the real tokenizer's code does.

Shapes: SD-shaped pipelines use a VAE with 2 blocks (factor 2), so a 32x32 image is a
16x16x4 latent; SDXL-shaped ones add a second text encoder with projection and the
``text_time`` added conditioning, as SDXL does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_TOKENIZER_MAX_LENGTH = 16
# The two SDXL text encoders must differ in width: diffusers' single-file loader tells them apart by it.
SDXL_TEXT_ENCODER_2_WIDTH = 48


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


def tiny_clip_tokenizer(max_length: int = TINY_TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` over a byte-level vocabulary (516 tokens), built offline."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    with tempfile.TemporaryDirectory(prefix="cd-tiny-tokenizer-") as name:  # read at load time, then removed
        folder = Path(name)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": max_length, "pad_token": "<|endoftext|>"}), encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(str(folder))


def _tiny_text_config(hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=520,
        max_position_embeddings=TINY_TOKENIZER_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )


# Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): zero terminal
# SNR (alpha_bar_T = 0 exactly), v-prediction and trailing timestep spacing, as SD 2.x-style
# models trained that way are sampled.
ZERO_SNR_SCHEDULER_CONFIG = {
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}


def _tiny_scheduler(zero_snr: bool = False) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **(ZERO_SNR_SCHEDULER_CONFIG if zero_snr else {}),
    )


def tiny_sd_pipeline(seed: int = 0, zero_snr: bool = False) -> StableDiffusionPipeline:
    """A random-init SD-1.x-shaped pipeline (32-d CLIP text encoder, 2-level UNet). ~0.3M params.

    ``zero_snr``: a DDIM scheduler with zero terminal SNR, v-prediction and trailing spacing
    (``ZERO_SNR_SCHEDULER_CONFIG``), as an SD 2.x-style model; the weights are the same."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_text_config())
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=_tiny_scheduler(zero_snr),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, zero_snr: bool = False) -> StableDiffusionXLPipeline:
    """A random-init SDXL-shaped pipeline: two text encoders, ``text_time`` added conditioning.

    ``zero_snr``: as for ``tiny_sd_pipeline``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + SDXL_TEXT_ENCODER_2_WIDTH,
        cross_attention_dim=32 + SDXL_TEXT_ENCODER_2_WIDTH,
        norm_num_groups=4,
    )
    vae = _tiny_vae()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_text_config(hidden_size=SDXL_TEXT_ENCODER_2_WIDTH, projection_dim=SDXL_TEXT_ENCODER_2_WIDTH)
        ),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=_tiny_scheduler(zero_snr),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: str | Path, kind: str = "sd", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder (``kind``: "sd" or "sdxl"); returns the folder."""
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    folder = Path(folder)
    builders[kind](seed).save_pretrained(folder)
    return folder


def load_pipeline_or_tiny(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``tiny_sd_pipeline()`` for ``spec == "tiny"`` (a script's offline smoke run), else
    ``models.loading.load_pipeline(spec, device, dtype)``."""
    if spec == "tiny":
        return tiny_sd_pipeline().to(device)
    from consistent_diffusion.models.loading import load_pipeline

    return load_pipeline(spec, device=device, dtype=dtype)
