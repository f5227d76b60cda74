"""The embedded model's own IP-Adapters: their image encoder, folder layout and state-dict layout.

Encoder. A frozen ImageNet EfficientNet-Lite0 (``metrics.extractors.pretrained``, installed offline
from the ``metrics`` extra), never trained on our data, so never on a held-out identity or style.
An image is read as RGB on white, resized to the embedded model's 64 px (what the adapter was
trained on), then the extractor resizes it to ``ENCODER_IMAGE_SIZE`` (the metric heads' size) and
the output of its last block (``block15``, 320 channels) is averaged over space: ``c`` (n, 320).
Not the 1280 pooled head channels (a 1 x 1 convolution of these): the projection from 1280 would
make each adapter 5.1 MB in float16 and the two would break the 45 MB budget of the shipped weights
(36 MB before them); from 320 each is 2.2 MB. The unconditional embedding is zeros, as IP-Adapter's.

Adapter. Exactly the released IP-Adapter state dict, so diffusers' own
``UNet2DConditionModel._load_ip_adapter_weights`` builds it: ``image_proj``: ``proj`` (4 C, 320)
+ bias and ``norm`` (LayerNorm over C) make 4 image tokens of the UNet's cross-attention width C
(diffusers' ``ImageProjection``: tokens = LN(reshape(W c + b, (4, C))); ``ip_adapter``:
``{k}.to_k_ip.weight`` / ``{k}.to_v_ip.weight`` (inner, C) for the k-th cross-attention layer,
k = 1, 3, 5, ... in processor order. As CLIP is not the encoder, the pipeline gets the embeddings as
``ip_adapter_image_embeds`` (``IPAdapter`` computes them here) instead of a registered encoder.

Folder (what ``train ip-adapter`` exports and the package ships, ``assets/ip_adapter/<name>``)::

    ip-adapter.safetensors   image_proj.* and ip_adapter.* (float16 when shipped)
    adapter.json             {"format", "image_encoder": "efficientnet-lite0", "pairing", ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ConfigError

ENCODER_NAME = "efficientnet-lite0"
ENCODER_IMAGE_SIZE = 128  # as the metric heads on this backbone (64 px emoji, 128 px input)
ENCODER_DIM = 320  # channels of the last block (before the 1280-wide head)
ENCODER_BLOCK = "block15"  # EfficientNetLite0.MAP_BLOCKS: the last MBConv block
IMAGE_SOURCE_SIZE = 64  # images are first brought to the embedded model's side (the training images')
IMAGE_TOKENS = 4  # diffusers' ImageProjection for a "proj.weight" adapter always makes 4 tokens
ADAPTER_FILE = "ip-adapter.safetensors"
ADAPTER_META = "adapter.json"
ADAPTER_FORMAT = "consistent-diffusion/ip-adapter/v1"
SHIPPED_ROOT = ASSETS_DIR / "ip_adapter"
SHIPPED_PREFIX = "embedded-"
PAIRINGS = ("style", "subject")


def shipped_folder(name: str) -> Path:
    """``embedded-style`` -> the package's ``assets/ip_adapter/embedded-style``."""
    return SHIPPED_ROOT / name


def is_shipped_name(path: str) -> bool:
    """A name such as ``embedded-style`` (not a path on disk)."""
    return path.startswith(SHIPPED_PREFIX) and os.sep not in path and not os.path.exists(path)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """``adapter.json`` of an embedded-adapter folder, or None when ``folder`` is not one."""
    path = Path(folder) / ADAPTER_META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return meta if meta.get("format") == ADAPTER_FORMAT else None


def resolve_embedded(path: str) -> Path | None:
    """The weight file of an embedded adapter given by shipped name or folder; None when ``path``
    is something else (a released-layout CLIP adapter). ConfigError for a shipped name that is not
    installed or a folder without its weights."""
    if is_shipped_name(path):
        folder = shipped_folder(path)
        if read_meta(folder) is None:
            names = ", ".join(sorted(p.name for p in SHIPPED_ROOT.glob(f"{SHIPPED_PREFIX}*") if read_meta(p)))
            raise ConfigError(f"no shipped IP-Adapter named {path!r} (shipped: {names or 'none yet'}); "
                              "give a folder written by `consistent-diffusion train ip-adapter`")
    else:
        folder = Path(path)
        if not folder.is_dir() or read_meta(folder) is None:
            return None
    meta = read_meta(folder) or {}
    if meta.get("image_encoder") != ENCODER_NAME:
        raise ConfigError(f"IP-Adapter {path} needs the image encoder {meta.get('image_encoder')!r}, "
                          f"this version knows {ENCODER_NAME!r}")
    weights = folder / ADAPTER_FILE
    if not weights.is_file():
        raise ConfigError(f"IP-Adapter weights missing: {weights}")
    return weights


class ImageEncoder:
    """EfficientNet-Lite0 last-block features of prompt images, averaged over space: ``encode(images)``
    -> (n, 320) float32."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from consistent_diffusion.metrics.extractors.pretrained import EfficientNetLite0

        self.extractor = EfficientNetLite0(device=device, image_size=ENCODER_IMAGE_SIZE)

    def encode(self, images: Sequence[Any] | Any) -> torch.Tensor:
        """Images (PIL, paths, uint8 (N, H, W, 3) arrays or (N, 3, H, W) tensors in [-1, 1]) -> (n, 320).
        PIL images and paths are first read as RGB on white at 64 x 64 (the training images' size)."""
        from consistent_diffusion.metrics.common import as_batch

        if not isinstance(images, torch.Tensor) and not hasattr(images, "shape"):
            images = as_batch(images, size=IMAGE_SOURCE_SIZE)
        return self.extractor.feature_maps(images)[ENCODER_BLOCK].mean(dim=(2, 3))


_ENCODERS: dict[str, ImageEncoder] = {}


def image_encoder(device: str | torch.device = "cpu") -> ImageEncoder:
    """One shared encoder per device (loading it takes a moment; it is never trained)."""
    key = str(device)
    if key not in _ENCODERS:
        _ENCODERS[key] = ImageEncoder(device)
    return _ENCODERS[key]


# ----------------------------------------------------------------------------- state-dict layout


def cross_attention_layers(unet: Any) -> list[str]:
    """Module names of the UNet's cross-attention layers (``...attn2``), in processor order: the
    k-th of them (0-based) is ``ip_adapter.{2k + 1}`` in the released layout."""
    return [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]


def initial_state_dict(unet: Any, embed_dim: int = ENCODER_DIM, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A new adapter for ``unet`` as the IP-Adapter authors start one (tutorial_train.py): ``proj``
    with ``nn.Linear``'s default initialisation (seeded), ``norm`` identity (weight 1, bias 0), and
    ``to_k_ip`` / ``to_v_ip`` copies of each cross-attention layer's text ``to_k`` / ``to_v``."""
    cross = int(unet.config.cross_attention_dim)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        proj = torch.nn.Linear(embed_dim, IMAGE_TOKENS * cross)
    finally:
        torch.random.set_rng_state(generator_state)
    image_proj = {"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone(),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers = {}
    for index, name in enumerate(cross_attention_layers(unet)):
        attention = unet.get_submodule(name)
        layers[f"{2 * index + 1}.to_k_ip.weight"] = attention.to_k.weight.detach().float().cpu().clone()
        layers[f"{2 * index + 1}.to_v_ip.weight"] = attention.to_v.weight.detach().float().cpu().clone()
    return {"image_proj": image_proj, "ip_adapter": layers}


def loaded_parts(unet: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """After ``unet._load_ip_adapter_weights([one adapter])``: (its ImageProjection, the IP
    processors of the cross-attention layers in order)."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    processors = unet.attn_processors
    return projection, [processors[f"{name}.processor"] for name in cross_attention_layers(unet)]


def state_dict_of(unet: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The released-layout state dict of the (one) adapter loaded in ``unet`` (the inverse of
    diffusers' conversion: ``image_embeds`` -> ``proj``)."""
    projection, processors = loaded_parts(unet)
    image_proj = {key.replace("image_embeds", "proj"): value.detach().float().cpu().clone()
                  for key, value in projection.state_dict().items()}
    layers = {}
    for index, processor in enumerate(processors):
        layers[f"{2 * index + 1}.to_k_ip.weight"] = processor.to_k_ip[0].weight.detach().float().cpu().clone()
        layers[f"{2 * index + 1}.to_v_ip.weight"] = processor.to_v_ip[0].weight.detach().float().cpu().clone()
    return {"image_proj": image_proj, "ip_adapter": layers}


def flat_state_dict(state: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{"image_proj": {k: v}, "ip_adapter": {k: v}} -> {"image_proj.k": v, "ip_adapter.k": v} (safetensors)."""
    return {f"{part}.{key}": value.to(dtype).contiguous() for part, values in state.items() for key, value in values.items()}


def save_adapter(folder: Path, state: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write ``ip-adapter.safetensors`` and ``adapter.json`` into ``folder`` (an existing folder:
    callers write into ``atomic_output_dir``)."""
    from safetensors.torch import save_file

    from consistent_diffusion.core.outputs import write_json_atomic

    folder = Path(folder)
    save_file(flat_state_dict(state, dtype), str(folder / ADAPTER_FILE))
    write_json_atomic({"format": ADAPTER_FORMAT, "image_encoder": ENCODER_NAME,
                       "encoder_image_size": ENCODER_IMAGE_SIZE, "image_tokens": IMAGE_TOKENS, **meta},
                      folder / ADAPTER_META)
    return folder
