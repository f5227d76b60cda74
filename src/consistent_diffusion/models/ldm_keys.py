"""The original (LDM) single-file key layout of each Stable Diffusion component: diffusers' UNet,
VAE and text encoders' state dicts renamed to the names of the CompVis/Stability checkpoints (the
inverse of ``diffusers.loaders.single_file_utils``' converters). ``models.export`` assembles and
writes them; its docstring gives the layout and the quirks found.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from consistent_diffusion.core.errors import ConsistentDiffusionError

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
        raise_unmapped(component, unmapped)
    return out


def raise_unmapped(component: str, keys: list[str]) -> None:
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    hint = ""
    if any(is_adapter_key(key) for key in keys):
        hint = " It has un-fused LoRA layers: call pipe.fuse_lora() then pipe.unload_lora_weights() first."
    raise UnsupportedExportError(
        f"cannot export the {component}: no original-layout name for {len(keys)} tensor(s): {shown}.{hint}"
    )


def is_adapter_key(key: str) -> bool:
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
        raise_unmapped("OpenCLIP text encoder", unmapped)
    return out
