"""DreamSim (Fu et al. 2023, "DreamSim: Learning New Dimensions of Human Visual Similarity using
Synthetic Data", arXiv 2306.09344; reference code ssundaram21/dreamsim) from its released weights,
without the authors' packages: DINO / CLIP / OpenCLIP ViT backbones (converted by ``published``) with
LoRA adapters on their fused ``attn.qkv`` layers, read from the folder DreamSim itself uses as its
cache (the unzipped release assets). The LoRA update is merged into the weights by hand
(W + alpha/r * B A, which is what ``peft`` computes). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
import re
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
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from consistent_diffusion.metrics.extractors.published import (
    build_clip_vision,
    dino_vit_to_hf,
    load_weights_file,
    standardize,
    strip_prefix,
)
from consistent_diffusion.metrics.extractors.registry import FeatureExtractor, register_features

DREAMSIM_RELEASE = "the ssundaram21/dreamsim GitHub release v0.2.0-checkpoints"


@dataclass(frozen=True)
class DreamSimBranch:
    """One backbone of DreamSim (``dreamsim/config.py``, ``feature_extraction/extractor.py``).

    ``feature``: ``"cls"`` = the CLS token output by the last block (DreamSim hooks block 11 of 12),
    before the final norm (D,); ``"embedding"`` = final-norm CLS @ ``proj`` (the CLIP image embedding).
    ``files``: the backbone's weight files in DreamSim's cache folder, first found wins."""

    feature: str
    hidden_act: str
    layer_norm_eps: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files: tuple[str, ...]


DINO_BACKBONE_FILES = ("checkpoints/dino_vitbase16_pretrain.pth", "dino_vitbase16_pretrain.pth",
                       "dino_vitb16_pretrain.pth")
DREAMSIM_BRANCHES = {
    # DINO hub ViT-B/16: exact GELU, LayerNorm eps 1e-6, ImageNet mean/std.
    "dino_vitb16": DreamSimBranch("cls", "gelu", 1e-6, IMAGENET_MEAN, IMAGENET_STD, DINO_BACKBONE_FILES),
    # load_clip_as_dino: QuickGELU, eps 1e-5; load_open_clip_as_dino: GELU, eps 1e-5; CLIP mean/std.
    "clip_vitb16": DreamSimBranch("embedding", "quick_gelu", 1e-5, CLIP_MEAN, CLIP_STD,
                                  ("clip_vitb16_pretrain.pth.tar",)),
    "clip_vitb32": DreamSimBranch("embedding", "quick_gelu", 1e-5, CLIP_MEAN, CLIP_STD,
                                  ("clip_vitb32_pretrain.pth.tar",)),
    "open_clip_vitb16": DreamSimBranch("embedding", "gelu", 1e-5, CLIP_MEAN, CLIP_STD,
                                       ("open_clip_vitb16_pretrain.pth.tar",)),
    "open_clip_vitb32": DreamSimBranch("embedding", "gelu", 1e-5, CLIP_MEAN, CLIP_STD,
                                       ("open_clip_vitb32_pretrain.pth.tar",)),
}
# variant -> (branches in concatenation order, LoRA adapter folder); ``dreamsim_args`` of config.py.
DREAMSIM_VARIANTS = {
    "ensemble": (("dino_vitb16", "clip_vitb16", "open_clip_vitb16"), "ensemble_lora"),
    "dino_vitb16": (("dino_vitb16",), "dino_vitb16_single_lora"),
    "clip_vitb32": (("clip_vitb32",), "clip_vitb32_single_lora"),
    "open_clip_vitb32": (("open_clip_vitb32",), "open_clip_vitb32_single_lora"),
}
# peft's saved key: base_model.model.extractor_list.{branch}.model.blocks.{block}.attn.qkv.lora_{A,B}.weight
LORA_KEY = re.compile(
    r"extractor_list\.(\d+)\.model\.blocks\.(\d+)\.attn\.qkv\.lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight$")


def _release_asset(variant: str) -> str:
    return f"dreamsim_{variant}_checkpoint.zip"


def dreamsim_variant(folder: Path, variant: str | None) -> str:
    """The variant asked for, or the one whose adapter folder is the only one present."""
    if variant is not None:
        if variant not in DREAMSIM_VARIANTS:
            raise ConfigError(f"dreamsim variant must be one of {sorted(DREAMSIM_VARIANTS)}, got {variant!r}")
        return variant
    present = [name for name, (_, adapter) in DREAMSIM_VARIANTS.items() if (folder / adapter).is_dir()]
    if len(present) == 1:
        return present[0]
    if not present:
        adapters = ", ".join(adapter for _, adapter in DREAMSIM_VARIANTS.values())
        raise ModelNotFoundError(
            f"no DreamSim LoRA adapter folder ({adapters}) in {folder}: "
            f"unzip {_release_asset('dino_vitb16')} or {_release_asset('ensemble')} from {DREAMSIM_RELEASE} there")
    raise ConfigError(f"{folder} holds several DreamSim variants {present}; choose one with variant=")


def _lora_scaling(config: dict[str, Any], where: Path) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA) for a plain LoRA on ``qkv``; other adapters are refused."""
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    plain = (config.get("peft_type", "LORA") == "LORA" and targets == ["qkv"] and not config.get("use_dora")
             and not config.get("fan_in_fan_out") and config.get("bias", "none") == "none"
             and not config.get("rank_pattern") and not config.get("alpha_pattern"))
    if not plain:
        raise ConfigError(f"{where}: expected DreamSim's plain LoRA on 'qkv' "
                          "(bias none, no DoRA, no rank / alpha patterns)")
    rank, alpha = float(config["r"]), float(config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_lora_deltas(adapter: Path) -> dict[tuple[int, int], torch.Tensor]:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``, keys
    ``base_model.model.extractor_list.{b}.model.blocks.{i}.attn.qkv.lora_{A,B}.weight``) ->
    {(branch b, block i): scaling * B @ A} (3D, D) float32, the update peft's merge adds to ``qkv``."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = _lora_scaling(config, adapter / "adapter_config.json")
    names = ("adapter_model.safetensors", "adapter_model.bin")
    files = [adapter / name for name in names if (adapter / name).is_file()]
    if not files:
        raise ModelNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {adapter}")
    factors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in load_weights_file(files[0]).items():
        match = LORA_KEY.search(key)
        if match is None:
            raise ConfigError(f"unexpected tensor {key!r} in {files[0]}: "
                              "DreamSim adapters hold only the LoRA A/B matrices of attn.qkv")
        factors.setdefault((int(match.group(1)), int(match.group(2))), {})[match.group(3)] = tensor.float()
    deltas = {}
    for where, pair in factors.items():
        missing = sorted({"A", "B"} - set(pair))
        if missing:
            raise ConfigError(f"{files[0]}: branch {where[0]} block {where[1]} "
                              f"lacks its LoRA {missing[0]} matrix")
        deltas[where] = scaling * pair["B"] @ pair["A"]
    return deltas


def dreamsim_backbone_state(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Backbone tensors in DINO layout from one of DreamSim's files: ``{'state_dict': ...}`` (the
    ``*_pretrain.pth.tar`` CLIP / OpenCLIP conversions, with ``proj``), a DINO full training checkpoint
    (``teacher`` backbone, keys ``backbone.*``: DINO's released backbone-only weights are the teacher's,
    facebookresearch/dino#44), or a bare DINO backbone state dict (the torch.hub file)."""
    if "state_dict" in raw:
        return dict(raw["state_dict"])
    if "teacher" in raw:
        teacher = strip_prefix(raw["teacher"], "module.")
        return {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _backbone_file(folder: Path, name: str, variant: str) -> Path:
    for relative in DREAMSIM_BRANCHES[name].files:
        if (folder / relative).is_file():
            return folder / relative
    if name == "dino_vitb16":
        raise ModelNotFoundError(
            f"no DINO ViT-B/16 backbone in {folder}: put DINO's backbone-only weights "
            f"dino_vitbase16_pretrain.pth (facebookresearch/dino) in {folder / 'checkpoints'} "
            "(DreamSim's torch.hub cache), or unzip "
            f"{_release_asset(variant)} from {DREAMSIM_RELEASE} (its dino_vitb16_pretrain.pth) there")
    raise ModelNotFoundError(f"no {DREAMSIM_BRANCHES[name].files[0]} in {folder}: "
                             f"unzip {_release_asset(variant)} from {DREAMSIM_RELEASE} there")


class _Branch:
    """One loaded backbone: a CLIPVisionModel, its projection (``embedding`` branches) and input norms."""

    def __init__(self, spec: DreamSimBranch, model: nn.Module, proj: torch.Tensor | None,
                 image_size: int) -> None:
        self.spec, self.model, self.proj, self.image_size = spec, model, proj, image_size

    def features(self, batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) (``cls``) or (N, E) (``embedding``)."""
        resized = resize_batch(batch, self.image_size).clamp(-1.0, 1.0)  # Resize((224, 224)), no crop
        pixels = standardize(resized, self.spec.mean, self.spec.std).to(device, dtype)
        output = self.model(pixel_values=pixels)
        if self.spec.feature == "cls":  # last_hidden_state is pre-norm: only the pooled CLS gets ln_post
            return output.last_hidden_state[:, 0]
        return output.pooler_output @ self.proj


def dreamsim_normalize(embedding: torch.Tensor) -> torch.Tensor:
    """DreamSim's ``normalize_embedding``: subtract each row's mean over features, then unit L2; (N, D)."""
    centred = embedding - embedding.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True)


class DreamSimExtractor(FeatureExtractor):
    """DreamSim embedding (Fu et al. 2023, arXiv 2306.09344; ssundaram21/dreamsim, ``dreamsim/model.py``).

    ``model``: DreamSim's cache folder (``cache_dir`` of ``dreamsim()``), i.e. where the release zip
    ``dreamsim_<variant>_checkpoint.zip`` was unzipped: ``<variant>`` LoRA folder (``ensemble_lora`` or
    ``<backbone>_single_lora``) plus the backbones: ``clip_vitb16_pretrain.pth.tar`` etc. ({'state_dict':
    DINO-layout ViT with ``pos_drop`` as CLIP's ln_pre and ``proj``}), and for DINO
    ``checkpoints/dino_vitbase16_pretrain.pth`` (what DreamSim fetches through torch.hub into that folder)
    or else the teacher backbone of the zip's DINO training checkpoint ``dino_vitb16_pretrain.pth``.
    ``variant``: ``ensemble`` (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16), ``dino_vitb16``,
    ``clip_vitb32`` or ``open_clip_vitb32``; default: the one variant whose adapter folder is present.

    Computation (``PerceptualModel.embed``): each image resized to 224 x 224 (bicubic, no crop) in
    [0, 1], normalised per branch (ImageNet mean/std for DINO, OpenAI CLIP's for CLIP / OpenCLIP); LoRA
    merged into each block's fused ``qkv`` (W + lora_alpha / r * B A); DINO -> CLS token of the last
    block's output (no final norm) (768,), CLIP / OpenCLIP -> ln_post(CLS) @ proj (512,); branches
    concatenated (ensemble 1792-d) and, with ``normalize_embeds`` (True, as ``dreamsim()``), centred by
    their own mean and scaled to unit L2. ``embed`` -> (N, D) float32; the DreamSim distance is
    1 - cosine(embed(a), embed(b)). The 'patch', DINOv2 and SynCLR variants are not supported.
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 model: str | Path | None = None, variant: str | None = None, num_heads: int | None = None,
                 normalize_embeds: bool = True) -> None:
        super().__init__(device, dtype)
        if model is None or not Path(model).expanduser().is_dir():
            raise ModelNotFoundError(
                f"dreamsim needs model=<folder>: unzip {_release_asset('dino_vitb16')} (or "
                f"{_release_asset('ensemble')}) from {DREAMSIM_RELEASE} into a folder and pass it"
                + (f" (not found: {model})" if model is not None else ""))
        folder = Path(model).expanduser()
        self.variant = dreamsim_variant(folder, variant)
        names, adapter = DREAMSIM_VARIANTS[self.variant]
        if not (folder / adapter / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"no {adapter}/adapter_config.json in {folder}: unzip "
                                     f"{_release_asset(self.variant)} from {DREAMSIM_RELEASE} there")
        deltas = read_lora_deltas(folder / adapter)
        stray = sorted({b for b, _ in deltas} - set(range(len(names))))
        if stray:
            raise ConfigError(f"{adapter} holds LoRA weights for branches {stray}; "
                              f"variant {self.variant!r} has {len(names)}")
        self.branches = [
            self._load_branch(folder, name, {i: d for (b, i), d in deltas.items() if b == index}, num_heads)
            for index, name in enumerate(names)
        ]
        self.normalize_embeds = normalize_embeds

    def _load_branch(self, folder: Path, name: str, deltas: dict[int, torch.Tensor],
                     num_heads: int | None) -> _Branch:
        spec = DREAMSIM_BRANCHES[name]
        state = {k: v.float() for k, v in dreamsim_backbone_state(load_weights_file(
            _backbone_file(folder, name, self.variant))).items()}
        proj = state.pop("proj", None)
        if spec.feature == "embedding" and proj is None:
            raise ConfigError(f"DreamSim {name} backbone file has no 'proj' (CLIP projection)")
        for block, delta in deltas.items():
            key = f"blocks.{block}.attn.qkv.weight"
            if key not in state or state[key].shape != delta.shape:
                raise ConfigError(f"LoRA for {name} block {block} does not fit its {key}")
            state[key] = state[key] + delta
        hf_state, shape, pre_norm = dino_vit_to_hf(state)
        vision = build_clip_vision(hf_state, shape, num_heads=num_heads, hidden_act=spec.hidden_act,
                                   layer_norm_eps=spec.layer_norm_eps, pre_norm=pre_norm)
        proj = None if proj is None else proj.to(self.device, self.dtype)
        return _Branch(spec, vision.to(self.device, self.dtype), proj, shape.image_size)

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        parts = [branch.features(batch, self.device, self.dtype).float() for branch in self.branches]
        embedding = torch.cat(parts, dim=1)
        return dreamsim_normalize(embedding) if self.normalize_embeds else embedding


@register_features("dreamsim", "DreamSim (Fu et al. 2023), unzipped release folder at model=PATH")
def _dreamsim(device="cpu", dtype=torch.float32, **options):
    return DreamSimExtractor(device, dtype, **options)
