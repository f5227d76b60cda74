"""Export a diffusers Stable Diffusion pipeline to ONE original-format (LDM) ``.safetensors`` file.

The file uses the key layout of the original CompVis/Stability checkpoints, which A1111,
ComfyUI and diffusers' own ``from_single_file`` read:

- ``model.diffusion_model.*``  the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
- ``first_stage_model.*``      the VAE (``encoder.down.N.block.M`` ..., 1x1-conv mid attention)
- text encoder(s):
  - SD 1.x: ``cond_stage_model.transformer.text_model.*`` (Hugging Face CLIP layout)
  - SD 2.x: ``cond_stage_model.model.*`` (OpenCLIP layout: fused ``attn.in_proj_*``,
    ``resblocks``, ``ln_final``, transposed ``text_projection``)
  - SDXL:   ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
    ``conditioner.embedders.1.model.*`` (OpenCLIP bigG layout)

The key maps are the inverse of diffusers' single-file conversion
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``).
They are derived from the model's own config and state dict; every tensor must be mapped, so
a component we do not know how to write (un-fused LoRA layers, an SDXL refiner, per-block
``layers_per_block``) raises :class:`UnsupportedExportError` instead of being dropped silently.

Loading the file back, offline
------------------------------
``from_single_file`` needs the diffusers configs of the architecture (UNet/VAE/text-encoder
configs, tokenizer(s), scheduler). Offline, pass a local diffusers folder of the same
architecture as ``config`` (the folder the model was exported from is ideal); nothing else is
needed (no ``original_config``, no network)::

    StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)

(``torch_dtype=`` may be added.) The tokenizer(s), scheduler and ``feature_extractor`` come from
the folder via ``from_pretrained``; the safety checker is never loaded by ``from_single_file``.
The folder's weights are not read for components present in the file.

Quirks found (diffusers 0.42, transformers 5.x):

- transformers >= 5.6 flattened ``CLIPTextModel`` (state-dict keys have no ``text_model.``
  prefix); the original layout and diffusers' loader need ``text_model.``, so it is added back.
- diffusers picks the text-encoder converter for SDXL's ``text_encoder_2`` by comparing
  position-embedding widths: if both SDXL text encoders have the same hidden size (only in toy
  models; real SDXL has 768 vs 1280) it loads ``text_encoder_2`` from the CLIP-L weights. Real
  checkpoints are unaffected; tests use different widths.
- SD 2.x: diffusers' ``text_encoder`` has 23 layers (the penultimate-layer trick) and no
  projection, whereas original SD 2 files carry 24 ``resblocks`` and ``text_projection``; the
  export writes what the pipeline has. diffusers, ComfyUI and A1111 (non-strict loading) use
  only the penultimate layer, so the missing last block is never used.
- Real LDM files also carry the DDPM buffers (``betas``, ``alphas_cumprod``...) and, for
  v-prediction models, nothing in the weights says so: tools read that from their own configs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.outputs import atomic_path
from consistent_diffusion.models.ldm_keys import (
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    UnsupportedExportError,
    clip_to_ldm,
    is_adapter_key,
    open_clip_to_ldm,
    raise_unmapped,
    unet_to_ldm,
    vae_to_ldm,
)

__all__ = ["UnsupportedExportError", "pipeline_to_ldm_state_dict", "save_single_file"]


# --------------------------------------------------------------------------------------------
# Pipeline


def _detect_text_layout(pipe: Any) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        if getattr(pipe, "text_encoder", None) is None:
            raise UnsupportedExportError(
                "cannot export an SDXL refiner-style pipeline (no first text encoder): not supported yet"
            )
        return "sdxl"
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is None:
        raise UnsupportedExportError(f"{type(pipe).__name__} has no text_encoder: not an SD-shaped pipeline")
    # SD 2.x: OpenCLIP ViT-H (1024-d) text encoder, UNet cross-attention width 1024.
    if getattr(text_encoder.config, "hidden_size", None) == 1024:
        return "sd2"
    return "sd1"


def pipeline_to_ldm_state_dict(pipe: Any, text_layout: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``pipe`` under their original single-file names (no copies, no dtype change).

    ``text_layout``: ``"sd1"`` (HF CLIP under ``cond_stage_model.transformer.``), ``"sd2"``
    (OpenCLIP under ``cond_stage_model.model.``) or ``"sdxl"``; default: detected from the pipeline.
    """
    for name in ("unet", "vae"):
        if getattr(pipe, name, None) is None:
            raise UnsupportedExportError(f"{type(pipe).__name__} has no {name}: not an SD-shaped pipeline")
    if type(pipe.unet).__name__ != "UNet2DConditionModel" or type(pipe.vae).__name__ != "AutoencoderKL":
        raise UnsupportedExportError(
            f"cannot export {type(pipe.unet).__name__}/{type(pipe.vae).__name__}: "
            "only UNet2DConditionModel + AutoencoderKL pipelines have this layout"
        )
    layout = text_layout or _detect_text_layout(pipe)
    if layout not in ("sd1", "sd2", "sdxl"):
        raise UnsupportedExportError(f"unknown text_layout {layout!r}; accepted: sd1, sd2, sdxl")

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            adapter_keys = [key for key in module.state_dict() if is_adapter_key(key)]
            if adapter_keys:
                raise_unmapped(name, adapter_keys)

    out: dict[str, torch.Tensor] = {}

    def add(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            out[prefix + key] = tensor

    add(UNET_PREFIX, unet_to_ldm(pipe.unet))
    add(VAE_PREFIX, vae_to_ldm(pipe.vae))
    if layout == "sd1":
        add(SD1_CLIP_PREFIX, clip_to_ldm(pipe.text_encoder))
    elif layout == "sd2":
        add(SD2_OPEN_CLIP_PREFIX, open_clip_to_ldm(pipe.text_encoder))
    else:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise UnsupportedExportError("text_layout 'sdxl' needs a pipeline with text_encoder_2")
        add(SDXL_CLIP_PREFIX, clip_to_ldm(pipe.text_encoder))
        add(SDXL_OPEN_CLIP_PREFIX, open_clip_to_ldm(pipe.text_encoder_2))
    return out


def save_single_file(
    pipe: Any,
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    *,
    text_layout: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint at ``path``; return the path.

    dtype: cast floating-point tensors to it (e.g. ``torch.float16``); ``None`` keeps them as they are.
    text_layout: see :func:`pipeline_to_ldm_state_dict`. metadata: extra string entries for the
    safetensors header. The file appears whole or not at all (temp file in the same folder, then
    ``os.replace``). Raises :class:`UnsupportedExportError` (a ``NotImplementedError``) for a
    pipeline or component without an original layout.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UnsupportedExportError(f"export writes .safetensors only, got {path.name!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UnsupportedExportError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    state_dict = pipeline_to_ldm_state_dict(pipe, text_layout=text_layout)

    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if tensor.is_meta:
            raise UnsupportedExportError(
                f"tensor {key} is on the meta device (offloaded or not loaded); load the pipeline fully first"
            )
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.to("cpu").contiguous()

    header = {"format": "pt", "exported_by": "consistent-diffusion"}
    header.update(metadata or {})
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=header)
    return path
