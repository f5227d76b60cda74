"""The published SD 1.5, SD 2.1 and SDXL architectures written in code (the values of their
``config.json`` files; nothing is downloaded) and a random-init pipeline of each, for
``real_architectures.py``. ``tests/test_real_architectures.py`` checks the parameter counts of the
published checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from consistent_diffusion.testing_architectures import (  # published configs, one place
    CLIP_L,
    OPEN_CLIP_BIG_G,
    SCALED_LINEAR_DDIM,
    SD_VAE,
    SDXL_UNET,
    SDXL_VAE,
)

SCALED_LINEAR = SCALED_LINEAR_DDIM  # the published betas; prediction_type set per architecture
OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
               "projection_dim": 512, "hidden_act": "gelu"}  # SD 2.x: OpenCLIP ViT-H, penultimate layer
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Architecture:
    """A published architecture: component configs (diffusers / transformers names) and how it is run here."""

    label: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # the second one (SDXL) is a CLIPTextModelWithProjection
    scheduler: dict[str, Any]
    native: int  # published resolution (px)
    size: int  # the reduced size run here (px)
    dtype: torch.dtype = torch.float32
    xl: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES = {
    "sd15": Architecture(  # runwayml/stable-diffusion-v1-5
        label="SD 1.5", native=512, size=256,
        unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "block_out_channels": (320, 640, 1280, 1280), "down_block_types": SD_DOWN, "up_block_types": SD_UP,
              "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32},
        vae={**SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        text_encoders=(CLIP_L,), scheduler={**SCALED_LINEAR, "prediction_type": "epsilon"}),
    "sd21": Architecture(  # stabilityai/stable-diffusion-2-1 (768-v)
        label="SD 2.1", native=768, size=256,
        unet={"sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "block_out_channels": (320, 640, 1280, 1280), "down_block_types": SD_DOWN, "up_block_types": SD_UP,
              "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True,
              "upcast_attention": True, "norm_num_groups": 32},
        vae={**SD_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        text_encoders=(OPEN_CLIP_H,), scheduler={**SCALED_LINEAR, "prediction_type": "v_prediction"}),
    "sdxl": Architecture(  # stabilityai/stable-diffusion-xl-base-1.0
        label="SDXL", native=1024, size=512, dtype=torch.bfloat16, xl=True,
        unet=SDXL_UNET,
        vae=SDXL_VAE,
        text_encoders=(CLIP_L, OPEN_CLIP_BIG_G), scheduler={**SCALED_LINEAR, "prediction_type": "epsilon"}),
}


def build_pipeline(arch: Architecture, seed: int = 0, dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
    """A random-init pipeline of ``arch`` on ``device`` in ``dtype`` (default ``arch.dtype``), offline;
    DDIM with the published betas. The weights are drawn on ``device`` (float32, then cast)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from consistent_diffusion.testing import tiny_clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae, texts = _random_components(arch)
    dtype = dtype or arch.dtype
    unet, vae, texts = unet.to(dtype), vae.to(dtype), [text.to(dtype) for text in texts]
    common = {"unet": unet, "vae": vae, "scheduler": DDIMScheduler(**arch.scheduler),
              "tokenizer": tiny_clip_tokenizer(77)}
    if arch.xl:
        pipe = StableDiffusionXLPipeline(text_encoder=texts[0], text_encoder_2=texts[1],
                                         tokenizer_2=tiny_clip_tokenizer(77), **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=texts[0], safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_components(arch: Architecture) -> tuple[Any, Any, list[Any]]:
    """UNet, VAE and text encoder(s) of ``arch`` with random weights (float32, the current device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = [CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **config) for config in arch.text_encoders]
    texts = [(CLIPTextModelWithProjection if index else CLIPTextModel)(config) for index, config in enumerate(configs)]
    return UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae), texts


def parameter_count(pipe: Any) -> dict[str, float]:
    """Millions of parameters per component."""
    return {name: sum(p.numel() for p in module.parameters()) / 1e6 for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}
