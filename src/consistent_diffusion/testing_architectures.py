"""Random-init pipelines with published architectures, built in code, offline (for slow reference checks).

``sdxl_architecture_pipeline`` builds Stable Diffusion XL base 1.0's architecture from its published
component configs (UNet: 3 levels of 320/640/1280 channels, 1/2/10 transformer layers, 2048-d
cross-attention, ``text_time`` conditioning; VAE: 4 levels of 128-512 channels, scaling 0.13025;
text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection; its scaled-linear DDIM
schedule) with random weights: 2.6 B UNet parameters, about 14 GB in float32. Build it under an
exclusive lock when other big models may be in memory. The tokenizers are ``testing``'s byte-level
CLIP tokenizer at 77 tokens (the real vocabulary is not shipped), so prompts tokenize
deterministically but not as the published tokenizer does; nothing here downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch

SCALED_LINEAR_DDIM = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
                      "timestep_spacing": "leading", "prediction_type": "epsilon"}
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
          "block_out_channels": (128, 256, 512, 512), "act_fn": "silu",
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}  # openai/clip-vit-large-patch14
OPEN_CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "projection_dim": 1280, "hidden_act": "gelu"}  # SDXL's text_encoder_2
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280),
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_MAX_LENGTH = 77


def sdxl_architecture_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusionXLPipeline`` with SDXL base 1.0's architecture and random weights (``seed``), on CPU.

    Any image size that is a multiple of 32 px works (e.g. 256 px: 32x32 latents, a reduced size).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from consistent_diffusion.testing import tiny_clip_tokenizer

    def text_config(config: dict[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1, **config)

    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET).to(dtype),
        vae=AutoencoderKL(**SDXL_VAE).to(dtype),
        text_encoder=CLIPTextModel(text_config(CLIP_L)).to(dtype),
        text_encoder_2=CLIPTextModelWithProjection(text_config(OPEN_CLIP_BIG_G)).to(dtype),
        tokenizer=tiny_clip_tokenizer(CLIP_MAX_LENGTH),
        tokenizer_2=tiny_clip_tokenizer(CLIP_MAX_LENGTH),
        scheduler=DDIMScheduler(**SCALED_LINEAR_DDIM),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
