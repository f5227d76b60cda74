"""Published descriptors loaded from their authors' released weights, without the authors' packages.

- ``csd``: CSD, the style descriptor of Somepalli et al. 2024, "Measuring Style Similarity in
  Diffusion Models" (arXiv 2404.01292; reference code learn2phoenix/CSD). Its released
  ``checkpoint.pth`` is a CLIP ViT-L/14 image tower in OpenAI ``clip`` format plus the style and
  content projections; it is mapped onto ``transformers.CLIPVisionModel`` here (no ``clip`` package).
- ``dreamsim`` (in ``extractors.dreamsim``, on this module's ViT conversion): DreamSim, Fu et al. 2023, "DreamSim: Learning New Dimensions of Human Visual
  Similarity using Synthetic Data" (arXiv 2306.09344; reference code ssundaram21/dreamsim):
  DINO / CLIP / OpenCLIP ViT backbones with LoRA adapters on their fused ``attn.qkv`` layers, read
  from the folder DreamSim itself uses as its cache (the unzipped release assets). The LoRA update
  is merged into the weights by hand (W + alpha/r * B A, which is what ``peft`` computes), so neither
  ``dreamsim``, ``timm``, ``open_clip``, ``torchvision`` nor ``peft`` is imported.

Every architecture number (width, depth, patch size, input size, MLP width) is read from the state
dict's shapes; the head count is ``width // 64`` (what OpenAI's ``clip.model.build_model`` does, and
true of every released ViT-S/B/L) unless ``num_heads`` is given. So a tiny random checkpoint in the
same on-disk layout loads the same way. Nothing is ever downloaded: missing weights raise
``ModelNotFoundError`` naming the file to fetch and where to put it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.metrics.common import resize_batch
from consistent_diffusion.metrics.extractors.pretrained import (
    CLIP_MEAN,
    CLIP_STD,
)
from consistent_diffusion.metrics.extractors.registry import FeatureExtractor, register_features

HEAD_WIDTH = 64  # channels per attention head in every released CLIP / DINO ViT


# ----------------------------------------------------------------------------- files


def _allow_namespace():
    """Let ``weights_only`` unpickling accept ``argparse.Namespace`` (CSD's and DINO's training
    checkpoints store their ``args``); plain data only, no code is run."""
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        return serialization.safe_globals([argparse.Namespace])
    serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def load_weights_file(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file or a torch pickle read with ``weights_only=True`` -> its top-level dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with _allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(
            f"{path} is not a readable weights file ({reason}); objects other than tensors and plain values "
            "are refused: re-save its state dict with torch.save where you trust the file"
        ) from error


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks ``{prefix}{i}.`` in a state dict (indices must be 0..n-1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not indices or indices != set(range(len(indices))):
        raise ConfigError(f"expected transformer blocks {prefix}0.. in the state dict, "
                          f"found indices {sorted(indices)}")
    return len(indices)


# ----------------------------------------------------------------------------- ViT -> CLIPVisionModel


@dataclass(frozen=True)
class VitShape:
    """Architecture of a pre-norm ViT read from its weights (width D, depth, patch p, input side)."""

    width: int
    layers: int
    patch_size: int
    image_size: int
    mlp_width: int

    @classmethod
    def from_weights(cls, patch_weight: torch.Tensor, positions: torch.Tensor, layers: int,
                     fc1_weight: torch.Tensor) -> VitShape:
        """``patch_weight`` (D, 3, p, p), ``positions`` (1 + g*g, D), ``fc1_weight`` (M, D)."""
        width, _, patch, _ = patch_weight.shape
        grid = math.isqrt(positions.shape[0] - 1)
        if grid * grid != positions.shape[0] - 1:
            raise ConfigError(f"{positions.shape[0] - 1} position embeddings do not form a square patch grid")
        return cls(int(width), layers, int(patch), int(grid * patch), int(fc1_weight.shape[0]))

    def heads(self, num_heads: int | None = None) -> int:
        heads = int(num_heads) if num_heads else self.width // HEAD_WIDTH
        if heads < 1 or self.width % heads:
            raise ConfigError(f"width {self.width} does not split into {heads} attention heads; "
                              "give num_heads=")
        return heads


def split_qkv(weight: torch.Tensor, bias: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """A fused input projection (3D, D) with bias (3D,) -> ((W_q, b_q), (W_k, b_k), (W_v, b_v)), each
    (D, D) and (D,): ``nn.MultiheadAttention.in_proj_weight`` and DINO's ``attn.qkv`` both stack q, k,
    v row-wise (transformers' ``convert_clip_original_pytorch_to_hf.py``:
    ``in_proj_weight.chunk(3, dim=0)``)."""
    if weight.shape[0] % 3 or bias.shape[0] != weight.shape[0]:
        raise ConfigError(f"fused q/k/v projection of shape {tuple(weight.shape)} is not (3D, D)")
    return tuple(zip(weight.chunk(3, dim=0), bias.chunk(3, dim=0), strict=True))


def _hf_blocks(state: dict[str, torch.Tensor], block_prefix: str, fused: tuple[str, str],
               renames: dict[str, str], layers: int) -> dict[str, torch.Tensor]:
    """Per-block tensors renamed into ``CLIPEncoderLayer`` names, the fused q/k/v split in three."""
    out = {}
    for i in range(layers):
        source, target = f"{block_prefix}{i}.", f"encoder.layers.{i}."
        for name, hf_name in renames.items():
            for param in ("weight", "bias"):
                out[f"{target}{hf_name}.{param}"] = state[f"{source}{name}.{param}"]
        qkv = split_qkv(state[source + fused[0]], state[source + fused[1]])
        for proj, (weight, bias) in zip(("q_proj", "k_proj", "v_proj"), qkv, strict=True):
            out[f"{target}self_attn.{proj}.weight"] = weight
            out[f"{target}self_attn.{proj}.bias"] = bias
    return out


# OpenAI ``clip`` VisionTransformer block (ResidualAttentionBlock) -> transformers CLIPEncoderLayer.
OPENAI_BLOCK_RENAMES = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# DINO VisionTransformer block (DreamSim stores its CLIP / OpenCLIP backbones in this layout too).
DINO_BLOCK_RENAMES = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
                      "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def openai_visual_to_hf(visual: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], VitShape]:
    """OpenAI ``clip`` ``model.visual`` tensors (keys ``conv1.weight``, ``class_embedding``,
    ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight,
    attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``) -> the state dict of
    ``CLIPVisionTransformer`` (``embeddings.*``, ``pre_layrnorm``, ``encoder.layers.*``,
    ``post_layernorm``) and the shape. ``proj`` (the CLIP projection) is not part of it and is ignored."""
    try:
        layers = _block_count(visual, "transformer.resblocks.")
        shape = VitShape.from_weights(visual["conv1.weight"], visual["positional_embedding"], layers,
                                      visual["transformer.resblocks.0.mlp.c_fc.weight"])
        out = {
            "embeddings.class_embedding": visual["class_embedding"],
            "embeddings.patch_embedding.weight": visual["conv1.weight"],
            "embeddings.position_embedding.weight": visual["positional_embedding"],
        }
        for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
            out[f"{ours}.weight"], out[f"{ours}.bias"] = visual[f"{theirs}.weight"], visual[f"{theirs}.bias"]
        out.update(_hf_blocks(visual, "transformer.resblocks.", ("attn.in_proj_weight", "attn.in_proj_bias"),
                              OPENAI_BLOCK_RENAMES, layers))
    except KeyError as error:
        raise ConfigError(f"not an OpenAI CLIP vision state dict: missing {error.args[0]!r}") from error
    return out, shape


def dino_vit_to_hf(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], VitShape, bool]:
    """DINO ``VisionTransformer`` tensors (``cls_token`` (1, 1, D), ``pos_embed`` (1, T, D),
    ``patch_embed.proj.{weight, bias}``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}``, ``norm``; DreamSim's CLIP conversions add ``pos_drop.{weight, bias}``, a LayerNorm in
    place of the dropout = CLIP's ``ln_pre``) -> (``CLIPVisionTransformer`` state, shape, has pre-norm).

    CLIP's patch convolution has no bias; DINO's bias ``b`` is added to every patch token and not to
    the CLS token, so it is folded exactly into the patch rows of the position table: pos[1:] += b."""
    try:
        layers = _block_count(state, "blocks.")
        positions = state["pos_embed"].reshape(-1, state["pos_embed"].shape[-1]).clone()
        shape = VitShape.from_weights(state["patch_embed.proj.weight"], positions, layers,
                                      state["blocks.0.mlp.fc1.weight"])
        if "patch_embed.proj.bias" in state:
            positions[1:] += state["patch_embed.proj.bias"].to(positions.dtype)
        out = {
            "embeddings.class_embedding": state["cls_token"].reshape(-1),
            "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
            "embeddings.position_embedding.weight": positions,
            "post_layernorm.weight": state["norm.weight"],
            "post_layernorm.bias": state["norm.bias"],
        }
        pre_norm = "pos_drop.weight" in state
        if pre_norm:
            out["pre_layrnorm.weight"] = state["pos_drop.weight"]
            out["pre_layrnorm.bias"] = state["pos_drop.bias"]
        out.update(_hf_blocks(state, "blocks.", ("attn.qkv.weight", "attn.qkv.bias"), DINO_BLOCK_RENAMES,
                              layers))
    except KeyError as error:
        raise ConfigError(f"not a DINO-layout ViT state dict: missing {error.args[0]!r}") from error
    return out, shape, pre_norm


def build_clip_vision(hf_state: dict[str, torch.Tensor], shape: VitShape, *, num_heads: int | None,
                      hidden_act: str, layer_norm_eps: float, pre_norm: bool = True) -> nn.Module:
    """A ``transformers.CLIPVisionModel`` of that shape holding ``hf_state`` exactly (strict load).
    ``pre_norm=False`` replaces ``pre_layrnorm`` by the identity (DINO has no norm before the blocks)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=shape.width, intermediate_size=shape.mlp_width,
                              num_hidden_layers=shape.layers, num_attention_heads=shape.heads(num_heads),
                              image_size=shape.image_size, patch_size=shape.patch_size, num_channels=3,
                              hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    model = CLIPVisionModel(config)
    transformer = getattr(model, "vision_model", model)  # transformers 4 nests it, 5 does not
    if not pre_norm:
        transformer.pre_layrnorm = nn.Identity()
    state = {k: v.float() for k, v in hf_state.items()}
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConfigError(f"weights do not fit CLIPVisionModel: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- preprocessing


def resize_shorter_and_center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a (N, 3, H, W) batch in [-1, 1]:
    the shorter side becomes ``size``, the longer ``int(size * long / short)``, then the centred
    ``size`` x ``size`` crop (top = round((h - size) / 2)); clamped to [-1, 1] as PIL's uint8 would be."""
    height, width = batch.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    resized = resize_batch(batch, (new_h, new_w)).clamp(-1.0, 1.0)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[..., top: top + size, left: left + size]


def standardize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[-1, 1] pixels -> ``(x01 - mean) / std`` per channel (torchvision ``ToTensor`` + ``Normalize``)."""
    unit = (batch + 1.0) / 2.0
    return (unit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- CSD

CSD_FILE_NAMES = ("checkpoint.pth", "model.safetensors", "pytorch_model.bin")
CSD_FETCH = ("fetch CSD's released ViT-L checkpoint checkpoint.pth (learn2phoenix/CSD README, 'Download the "
             "pretrained weights for the CSD model'; or the Hugging Face repo tomg-group-umd/CSD-ViT-L) and "
             "pass model=<that file or its folder>")
CSD_HEADS = ("style", "content", "backbone")


def find_csd_checkpoint(model: str | Path | None) -> Path:
    """``model``: a checkpoint file, or a folder holding ``checkpoint.pth`` / ``model.safetensors`` /
    ``pytorch_model.bin`` (or exactly one ``*.pth`` / ``*.safetensors``)."""
    if model is None:
        raise ModelNotFoundError(f"csd needs model=PATH: {CSD_FETCH}")
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in CSD_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        candidates = sorted([*path.glob("*.pth"), *path.glob("*.safetensors")])
        if len(candidates) == 1:
            return candidates[0]
    raise ModelNotFoundError(f"no CSD checkpoint at {path}: {CSD_FETCH}")


def csd_state_dict(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors: ``raw['model_state_dict']`` (what ``train_csd.py`` saves and
    ``main_sim.py`` reads) or the dict itself (the Hugging Face mixin's ``model.safetensors``), with the
    DistributedDataParallel prefix ``module.`` removed (``CSD/utils.py: convert_state_dict``)."""
    state = raw.get("model_state_dict", raw.get("state_dict", raw))
    state = strip_prefix({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, "module.")
    if "last_layer_style" not in state or not any(k.startswith("backbone.") for k in state):
        raise ConfigError("not a CSD checkpoint: expected keys 'backbone.*' and 'last_layer_style' "
                          "(optionally under 'model_state_dict' and prefixed 'module.')")
    return state


class CSDExtractor(FeatureExtractor):
    """CSD style descriptor (Somepalli et al. 2024, arXiv 2404.01292; learn2phoenix/CSD).

    Reference (``CSD/model.py: CSD_CLIP``): ``backbone`` = OpenAI CLIP ViT-L/14 ``visual`` with its
    ``proj`` set to None, so the backbone feature f = ln_post(CLS token) (N, 1024);
    ``last_layer_style`` and ``last_layer_content`` are copies of CLIP's ``proj`` (1024, 768) fine-tuned
    separately; style = normalize(f @ last_layer_style), content = normalize(f @ last_layer_content)
    (L2, dim 1). A ``backbone.proj`` in the file, if any, is ignored, as the reference's strict=False
    load does. Preprocessing (``CSD/loss_utils.py: transforms_branch0``): bicubic resize of the shorter
    side to 224, centre crop 224, OpenAI CLIP mean/std.

    ``embed`` -> (N, 768) unit rows for ``head="style"`` (default) or ``"content"``; ``"backbone"`` gives
    f (N, 1024), not normalised. Compare with cosine similarity (the reference ranks by inner product
    of the unit style vectors). The reference extracts under fp16 autocast; here ``dtype`` decides.
    The CSD README notes a known discrepancy between the uploaded weights and the paper's numbers.
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 model: str | Path | None = None, head: str = "style", num_heads: int | None = None) -> None:
        super().__init__(device, dtype)
        if head not in CSD_HEADS:
            raise ConfigError(f"csd head must be one of {CSD_HEADS}, got {head!r}")
        path = find_csd_checkpoint(model)
        state = csd_state_dict(load_weights_file(path))
        visual = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        hf_state, self.shape = openai_visual_to_hf(visual)
        vision = build_clip_vision(hf_state, self.shape, num_heads=num_heads, hidden_act="quick_gelu",
                                   layer_norm_eps=1e-5)
        self.model = vision.to(self.device, self.dtype)
        self.head = head
        self.projection = None if head == "backbone" else self._projection(state, head)
        self.image_size = self.shape.image_size  # 224 for the released ViT-L/14

    def _projection(self, state: dict[str, torch.Tensor], head: str) -> torch.Tensor:
        matrix = state.get(f"last_layer_{head}")
        if matrix is None or matrix.ndim != 2 or matrix.shape[0] != self.shape.width:
            raise ConfigError(f"CSD head {head!r} is not a ({self.shape.width}, d) projection matrix in this "
                              "checkpoint (a 'custom' content head is not supported)")
        return matrix.to(self.device, self.dtype)

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = standardize(resize_shorter_and_center_crop(batch, self.image_size), CLIP_MEAN, CLIP_STD)
        feature = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        if self.projection is None:
            return feature
        return nn.functional.normalize(feature @ self.projection, dim=1, p=2)


@register_features("csd", "CSD style descriptor (Somepalli et al. 2024), checkpoint.pth at model=PATH")
def _csd(device="cpu", dtype=torch.float32, **options):
    return CSDExtractor(device, dtype, **options)
