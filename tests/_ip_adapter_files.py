"""Random IP-Adapters and prompt images on disk, in the released layout, for the ip_adapter tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

ENCODER_PROJECTION = 24
WEIGHT_STEM = "ip-adapter_sd15"


def adapter_weights(folder: Path, suffix: str = ".safetensors") -> Path:
    """The weight file ``save_random_adapter`` writes in ``folder``."""
    return folder / "models" / f"{WEIGHT_STEM}{suffix}"


def save_random_adapter(folder: Path, unet, seed: int = 0, suffix: str = ".safetensors") -> Path:
    """A random IP-Adapter for ``unet`` as released: ``models/ip-adapter_sd15.safetensors`` (or
    ``.bin``: ``torch.save`` of {"image_proj": ..., "ip_adapter": ...}) with ``image_proj.*``:
    proj (4C, D) + LayerNorm(C) and ``ip_adapter.{1,3,5..}.to_{k,v}_ip.weight``: (inner, C) per
    cross-attention layer, in processor order; and ``models/image_encoder/`` (a tiny random
    CLIPVisionModelWithProjection, D = 24). C is the UNet's cross-attention width. Returns ``folder``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    models = folder / "models"
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=ENCODER_PROJECTION, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(models / "image_encoder")
    cross = unet.config.cross_attention_dim
    flat = {"image_proj.proj.weight": torch.randn(4 * cross, ENCODER_PROJECTION) * 0.5,
            "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
            "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.weight.shape[0]
            flat[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(inner, cross) * 0.5
            flat[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(inner, cross) * 0.5
            key += 2
    weights = adapter_weights(folder, suffix)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(flat, str(weights))
    else:
        nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = value
        torch.save(nested, weights)
    return folder


def save_noise_image(path: Path, seed: int, size: int = 40) -> str:
    """A random RGB image (``size`` x ``size``) saved as PNG; returns its path."""
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)
