"""DreamBooth weights on an existing pipeline, for one call (Ruiz et al., CVPR 2023).

Full DreamBooth (``train dreambooth``) writes a whole diffusers folder, usable as ``--model``. This
method is the other way to use it: the fine-tuned weights are copied *into* the pipeline already
loaded (in place, tensor by tensor, only where they differ from the current ones) and the
previous values are copied back on exit. Because nothing is replaced, whatever other methods
installed stays in force: StyleAligned's attention processors, LoRA adapters (a PEFT-wrapped layer
``x.to_q`` receives ``x.to_q.weight`` into ``x.to_q.base_layer.weight``), ControlNet siblings that
share the UNet. So a DreamBooth subject composes with the training-free methods in one series.

``model``: a DreamBooth run folder (``OUT``, holding ``OUT/model``) or any diffusers pipeline folder
of the same architecture. Its ``unet``, ``text_encoder`` and ``text_encoder_2`` weights are used
(a text encoder that was not fine-tuned equals the base one and costs nothing).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import restoring
from consistent_diffusion.models.memory import changed_without_offload

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_CACHE: dict[tuple, dict[str, dict[str, torch.Tensor]]] = {}  # files_key of the weight files -> weights


def dreambooth_folder(path: str | os.PathLike) -> Path:
    """The pipeline folder of a DreamBooth run (``OUT/model``) or the folder itself."""
    folder = Path(path).expanduser()
    if (folder / "model" / "model_index.json").is_file():
        folder = folder / "model"
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise ModelNotFoundError(f"{path} is neither a DreamBooth run folder (with model/) nor a diffusers pipeline folder")
    return folder


def _weight_files(component: Path) -> list[Path]:
    """The component's safetensors files, preferring the full-precision ones over variants."""
    files = sorted(component.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]
    return plain or files


def _component_files(folder: Path) -> dict[str, list[Path]]:
    """component name -> its weight files, for the components that have any."""
    found = {name: _weight_files(folder / name) if (folder / name).is_dir() else [] for name in COMPONENTS}
    return {name: files for name, files in found.items() if files}


def load_component_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """component name -> state dict, read from ``folder/<component>/*.safetensors``.

    Cached on the weight files' (path, size, mtime_ns): a model retrained into the same folder,
    even with its files rewritten in place, is read again."""
    from safetensors.torch import load_file

    from consistent_diffusion.models.identity import files_key

    components = _component_files(folder)
    key = files_key(f for files in components.values() for f in files)
    if key not in _CACHE:
        weights = {name: {k: v for f in files for k, v in load_file(f).items()} for name, files in components.items()}
        if "unet" not in weights:
            raise ModelNotFoundError(f"{folder / 'unet'} holds no .safetensors weights")
        _CACHE.clear()  # one DreamBooth model at a time: they are as large as the base model
        _CACHE[key] = weights
    return _CACHE[key]


def _target_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, also under their pre-PEFT names (``.base_layer.`` removed)."""
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    aliases = {name.replace(".base_layer.", "."): tensor for name, tensor in tensors.items() if ".base_layer." in name}
    return {**aliases, **tensors}


@contextlib.contextmanager
def weights_swapped(pipe: Any, weights: dict[str, dict[str, torch.Tensor]], source: str) -> Iterator[int]:
    """Copy ``weights`` into ``pipe``'s components in place; copy the originals back on exit.

    Yields the number of tensors that changed. Raises ``ConfigError`` when a tensor has no
    counterpart or another shape (weights made for another base model)."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, state in weights.items():
                module = getattr(pipe, name, None)
                if module is None:
                    raise ConfigError(f"DreamBooth weights {source} have a {name} but the pipeline has none")
                targets = _target_tensors(module)
                for key, value in state.items():
                    target = targets.get(key)
                    if target is None or target.shape != value.shape:
                        raise ConfigError(f"DreamBooth weights {source} do not fit this pipeline's {name} ({key}): "
                                          "were they trained from another base model?")
                    value = value.to(device=target.device, dtype=target.dtype)
                    if not torch.equal(target, value):
                        saved.append((target, target.detach().clone()))
                        target.copy_(value)
        yield len(saved)
    finally:
        with torch.no_grad():
            for target, original in saved:
                target.copy_(original)


@register("dreambooth")
@dataclass(frozen=True)
class DreamBooth(Method):
    """A full-DreamBooth subject (its fine-tuned weights) on the current pipeline.

    model: a ``train dreambooth`` run folder or its ``model`` pipeline folder.
    """

    model: str

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not os.fspath(self.model):
            raise ConfigError(f"dreambooth needs the folder of a DreamBooth run, got {self.model!r}")
        object.__setattr__(self, "model", os.fspath(self.model))
        dreambooth_folder(self.model)  # fail early on a missing folder

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        folder = dreambooth_folder(self.model)
        swap = weights_swapped(ctx.pipe, load_component_weights(folder), self.model)
        with restoring(ctx), changed_without_offload(ctx.pipe, swap):
            yield ctx
