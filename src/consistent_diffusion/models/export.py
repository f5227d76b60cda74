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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_path

__all__ = ["UnsupportedExportError", "pipeline_to_ldm_state_dict", "save_single_file"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


class UnsupportedExportError(ConsistentDiffusionError, NotImplementedError):
    """The pipeline (or one of its components) has no original single-file layout we can write."""


# --------------------------------------------------------------------------------------------
# Key-map helpers


def _map_by_prefix(
    state_dict: dict[str, torch.Tensor],
    prefixes: dict[str, tuple[str, dict[str, str]]],
    component: str,
) -> dict[str, torch.Tensor]:
    """Rename keys by their longest matching diffusers prefix.

    ``prefixes``: diffusers prefix -> (original prefix, renames of the first key part after it).
    Any key not covered raises, so nothing is dropped silently.
    """
    ordered = sorted(prefixes, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        for prefix in ordered:
            if key.startswith(prefix + "."):
                target, renames = prefixes[prefix]
                rest = key[len(prefix) + 1 :]
                head, _, tail = rest.partition(".")
                if head in renames:
                    rest = renames[head] + ("." + tail if tail else "")
                out[f"{target}.{rest}"] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        _raise_unmapped(component, unmapped)
    return out


def _raise_unmapped(component: str, keys: list[str]) -> None:
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    hint = ""
    if any(_is_adapter_key(key) for key in keys):
        hint = " It has un-fused LoRA layers: call pipe.fuse_lora() then pipe.unload_lora_weights() first."
    raise UnsupportedExportError(
        f"cannot export the {component}: no original-layout name for {len(keys)} tensor(s): {shown}.{hint}"
    )


def _is_adapter_key(key: str) -> bool:
    """PEFT adapter tensors (LoRA A/B, wrapped base layers) that have no original-layout name."""
    return any(part in key for part in (".base_layer.", ".lora_", ".lora_magnitude_vector"))


def _block_indices(keys: Iterable[str], prefix: str) -> set[int]:
    """Indices N present as ``{prefix}.N.`` in ``keys``."""
    found = set()
    for key in keys:
        if key.startswith(prefix + "."):
            index = key[len(prefix) + 1 :].split(".", 1)[0]
            if index.isdigit():
                found.add(int(index))
    return found


# --------------------------------------------------------------------------------------------
# UNet

_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's "text_time" added conditioning
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` state dict -> original keys (without ``model.diffusion_model.``)."""
    config = unet.config
    state_dict = unet.state_dict()
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise UnsupportedExportError(
            f"cannot export a UNet with per-block layers_per_block={layers!r}: the original layout "
            "(and diffusers' single-file loader) assumes one int"
        )
    if getattr(config, "class_embed_type", None) is not None or getattr(config, "num_class_embeds", None):
        raise UnsupportedExportError("cannot export a UNet with class embeddings (upscaler-style models)")
    addition = getattr(config, "addition_embed_type", None)
    if addition not in (None, "text_time"):
        raise UnsupportedExportError(f"cannot export a UNet with addition_embed_type={addition!r}")

    prefixes: dict[str, tuple[str, dict[str, str]]] = {
        diffusers: (original, {}) for diffusers, original in _UNET_TOP_LEVEL.items()
    }
    keys = list(state_dict)
    n_down = len(config.down_block_types)
    for block in range(n_down):
        for layer in range(layers):
            index = 1 + block * (layers + 1) + layer
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = (
                f"input_blocks.{index}.0",
                _UNET_RESNET_RENAMES,
            )
            prefixes[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
        index = 1 + block * (layers + 1) + layers
        prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})

    for layer in range(2):
        prefixes[f"mid_block.resnets.{layer}"] = (f"middle_block.{2 * layer}", _UNET_RESNET_RENAMES)
    prefixes["mid_block.attentions.0"] = ("middle_block.1", {})

    for block in range(len(config.up_block_types)):
        for layer in range(layers + 1):
            index = block * (layers + 1) + layer
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = (
                f"output_blocks.{index}.0",
                _UNET_RESNET_RENAMES,
            )
            prefixes[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
        index = block * (layers + 1) + layers
        # The upsampler follows the resnet (.0) and, when the block has attention, the attention (.1).
        slot = 2 if _block_indices(keys, f"up_blocks.{block}.attentions") else 1
        prefixes[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", {})

    for block in range(len(config.up_block_types)):
        extra = _block_indices(keys, f"up_blocks.{block}.resnets") - set(range(layers + 1))
        if extra:
            raise UnsupportedExportError(f"UNet up block {block} has more resnets than layers_per_block + 1")
    return _map_by_prefix(state_dict, prefixes, "UNet")


# --------------------------------------------------------------------------------------------
# VAE

_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",  # to_out.0.* -> proj_out.0.*, fixed below
}
_VAE_ATTENTION_LINEARS = ("q", "k", "v", "proj_out")


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """``AutoencoderKL`` state dict -> original keys (without ``first_stage_model.``)."""
    state_dict = vae.state_dict()
    prefixes: dict[str, tuple[str, dict[str, str]]] = {}
    for name in ("quant_conv", "post_quant_conv"):
        prefixes[name] = (name, {})
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        prefixes[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        prefixes[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        for layer in range(2):
            prefixes[f"{part}.mid_block.resnets.{layer}"] = (
                f"{part}.mid.block_{layer + 1}",
                _VAE_RESNET_RENAMES,
            )
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_RENAMES)

    keys = list(state_dict)
    n_down = len(vae.config.down_block_types)
    for block in range(n_down):
        for layer in _block_indices(keys, f"encoder.down_blocks.{block}.resnets"):
            prefixes[f"encoder.down_blocks.{block}.resnets.{layer}"] = (
                f"encoder.down.{block}.block.{layer}",
                _VAE_RESNET_RENAMES,
            )
        prefixes[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (
            f"encoder.down.{block}.downsample.conv",
            {},
        )
    n_up = len(vae.config.up_block_types)
    for block in range(n_up):
        original = n_up - 1 - block  # the original decoder numbers its levels from the bottom
        for layer in _block_indices(keys, f"decoder.up_blocks.{block}.resnets"):
            prefixes[f"decoder.up_blocks.{block}.resnets.{layer}"] = (
                f"decoder.up.{original}.block.{layer}",
                _VAE_RESNET_RENAMES,
            )
        prefixes[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (
            f"decoder.up.{original}.upsample.conv",
            {},
        )

    mapped = _map_by_prefix(state_dict, prefixes, "VAE")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in mapped.items():
        if ".mid.attn_1." in key:
            key = key.replace(".proj_out.0.", ".proj_out.")
            leaf = key.rsplit(".", 2)[-2]
            if leaf in _VAE_ATTENTION_LINEARS and key.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # linear -> 1x1 conv, as the original AttnBlock
        out[key] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Text encoders


def _text_model_state_dict(text_encoder: Any) -> dict[str, torch.Tensor]:
    """State dict with the ``text_model.`` prefix (transformers >= 5.6 flattened CLIPTextModel)."""
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.startswith("text_model.") or key == "text_projection.weight":
            out[key] = tensor
        else:
            out["text_model." + key] = tensor
    return out


def clip_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP layout (SD 1.x, SDXL's first encoder): keys under ``text_model.``."""
    state_dict = _text_model_state_dict(text_encoder)
    if "text_projection.weight" in state_dict:
        raise UnsupportedExportError(
            "cannot export a CLIP text encoder with a projection in the SD 1.x layout (it has none)"
        )
    return state_dict


_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD 2.x, SDXL's second encoder): ``transformer.resblocks.N`` with fused q/k/v."""
    state_dict = _text_model_state_dict(text_encoder)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    layer_prefix = "text_model.encoder.layers."
    for key, tensor in state_dict.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[_OPEN_CLIP_TOP_LEVEL[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()  # Linear weight (out, in) -> matrix (in, out)
        elif key == "text_model.embeddings.position_ids":
            continue  # a non-learned buffer in old transformers; OpenCLIP has none
        elif key.startswith(layer_prefix):
            index, _, rest = key[len(layer_prefix) :].partition(".")
            module, _, leaf = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((int(index), leaf), {})[module[-6]] = tensor
            elif module in _OPEN_CLIP_LAYER_RENAMES:
                out[f"transformer.resblocks.{index}.{_OPEN_CLIP_LAYER_RENAMES[module]}.{leaf}"] = tensor
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    for (index, leaf), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.extend(f"{layer_prefix}{index}.self_attn.{p}_proj.{leaf}" for p in parts)
            continue
        out[f"transformer.resblocks.{index}.attn.in_proj_{leaf}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if unmapped:
        _raise_unmapped("OpenCLIP text encoder", unmapped)
    return out


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
            adapter_keys = [key for key in module.state_dict() if _is_adapter_key(key)]
            if adapter_keys:
                _raise_unmapped(name, adapter_keys)

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
