"""Find, load and unload IP-Adapters in the released layout, reversibly.

Released layout (as the IP-Adapter authors ship it): a folder holding ``models/`` (SD 1.x) and/or
``sdxl_models/`` (SDXL), each with weight files ``ip-adapter*.safetensors`` or ``.bin`` and an
``image_encoder/`` folder (``config.json`` + weights of a ``CLIPVisionModelWithProjection``). A
weight file may also be named directly; its encoder is then ``image_encoder/`` beside it.

``installed_adapters`` loads through diffusers' ``load_ip_adapter`` (which resets *every* attention
processor, self-attention included) and then puts the previous processors back: self-attention
ones as they were, and on cross-attention a wrapper that delegates to ``inner`` (StyleAligned's,
consistent subject's) is copied with the IP processor as its innermost ``inner``. On exit the
UNet's processors, ``encoder_hid_proj``, ``encoder_hid_dim_type`` and the pipeline's
``image_encoder``/``feature_extractor`` (attributes and config entries) are exactly as before.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_ABSENT = object()


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter's weight file and the image encoder folder it was trained with."""

    weights: str
    image_encoder: str


def is_sdxl(pipe: Any) -> bool:
    """SDXL-family pipelines have a second text encoder slot."""
    return hasattr(pipe, "text_encoder_2")


def _weight_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    safetensors = {p.stem for p in files if p.suffix == ".safetensors"}
    return [p for p in files if p.suffix == ".safetensors" or p.stem not in safetensors]


def resolve_adapter(path: str, sdxl: bool) -> AdapterFiles:
    """The weight file and encoder folder for ``path`` (a weight file or a released-layout folder);
    ``sdxl`` picks ``sdxl_models/`` over ``models/``. ConfigError when anything is missing/ambiguous."""
    given = Path(path)
    if given.is_file():
        if given.suffix not in WEIGHT_SUFFIXES:
            raise ConfigError(f"IP-Adapter weights must be .safetensors or .bin: {path}")
        weights, folder = given, given.parent
    elif given.is_dir():
        subfolders = ("sdxl_models", "models") if sdxl else ("models",)
        folder = next((given / s for s in subfolders if (given / s).is_dir()), given)
        files = _weight_files(folder)
        if not files:
            raise ConfigError(f"no IP-Adapter weights (ip-adapter*.safetensors or .bin) in {folder}")
        if len(files) > 1:
            names = ", ".join(p.name for p in files)
            raise ConfigError(f"several IP-Adapter weight files in {folder} ({names}); name the file instead")
        weights = files[0]
    else:
        raise ConfigError(f"IP-Adapter not found: {path}")
    encoder = folder / "image_encoder"
    if not (encoder / "config.json").is_file():
        raise ConfigError(f"IP-Adapter image encoder missing: {encoder}/config.json (released layout: "
                          "image_encoder/ beside the weights)")
    if not any((encoder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"IP-Adapter image encoder weights missing in {encoder} (model.safetensors or pytorch_model.bin)")
    return AdapterFiles(str(weights), str(encoder))


def read_state_dict(weights: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} from a released ``.safetensors`` or ``.bin`` file
    (the same split diffusers' ``load_ip_adapter`` makes)."""
    try:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            flat = load_file(weights)
            state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                part, _, rest = key.partition(".")
                if part in state:
                    state[part][rest] = value
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign file
        raise ConsistentDiffusionError(f"cannot read IP-Adapter weights {weights}: {error}") from error
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ConfigError(f"{weights} is not an IP-Adapter file (needs image_proj.* and ip_adapter.* weights)")
    return state


def load_image_encoder(folder: str, pipe: Any) -> Any:
    """The CLIP image encoder in ``folder``, offline, in the pipeline's dtype, on the device its
    weights belong on (the CPU under offload: the hooks move it; ``pipe.device`` is ``meta`` under
    sequential offload)."""
    from transformers import CLIPVisionModelWithProjection

    from consistent_diffusion.models.memory import weights_device

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load the IP-Adapter image encoder {folder}: {error}") from error
    return encoder.to(device=weights_device(pipe), dtype=pipe.dtype).eval()


def _is_ip_processor(processor: Any) -> bool:
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )

    return isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor))


def _is_stock(processor: Any) -> bool:
    return type(processor).__module__.startswith("diffusers.")


class _ImageTokenCarrier:
    """Innermost link under another method's wrapper: hands the IP processor the (text, image
    tokens) pair and masks that ``_TextOnlyWrapper`` kept aside while the wrapper ran on text only."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.pending, self.masks = inner, None, None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if self.pending is not None and encoder_hidden_states is self.pending[0]:
            encoder_hidden_states = self.pending
        kwargs.pop("ip_adapter_masks", None)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                          ip_adapter_masks=self.masks, **kwargs)


class _TextOnlyWrapper:
    """Outermost link on a cross-attention layer where another method's wrapper sits over the IP
    processor: the wrapper (written for text states) sees the text states only; the carrier below
    it restores the image tokens. Names ``ip_adapter_masks`` so diffusers passes the masks on."""

    def __init__(self, inner: Any, carrier: _ImageTokenCarrier) -> None:
        self.inner, self.carrier = inner, carrier

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_adapter_masks: Any = None, **kwargs: Any) -> torch.Tensor:
        text = encoder_hidden_states
        if isinstance(encoder_hidden_states, tuple):
            text = encoder_hidden_states[0]
            self.carrier.pending = encoder_hidden_states
        self.carrier.masks = ip_adapter_masks
        try:
            return self.inner(attn, hidden_states, text, attention_mask, temb, **kwargs)
        finally:
            self.carrier.pending = self.carrier.masks = None


def _wrapped_around(wrapper: Any, core: Any, name: str) -> Any:
    """A copy of ``wrapper`` (and of each wrapper under it) whose innermost ``inner`` is ``core``,
    between a ``_TextOnlyWrapper`` and an ``_ImageTokenCarrier`` when there is any wrapper."""
    if _is_stock(wrapper):
        return core
    carrier = _ImageTokenCarrier(core)
    return _TextOnlyWrapper(_copied_chain(wrapper, carrier, name), carrier)


def _copied_chain(wrapper: Any, core: Any, name: str) -> Any:
    if _is_stock(wrapper):
        return core
    if not hasattr(wrapper, "inner"):
        raise ConfigError(f"ip_adapter cannot combine with the attention processor at {name} "
                          f"({type(wrapper).__name__}: it does not delegate to an inner processor)")
    outer = copy.copy(wrapper)
    outer.inner = _copied_chain(wrapper.inner, core, name)
    return outer


def _innermost(processor: Any, name: str) -> Any:
    """The stock diffusers processor at the bottom of a chain of ``inner`` wrappers."""
    while not _is_stock(processor):
        if not hasattr(processor, "inner"):
            raise ConfigError(f"ip_adapter cannot combine with the attention processor at {name} "
                              f"({type(processor).__name__}: it does not delegate to an inner processor)")
        processor = processor.inner
    return processor


def _constructible(processor: Any) -> Any:
    """``processor``, or diffusers' default processor where its class needs constructor arguments
    (``SlicedAttnProcessor(slice_size)`` under attention slicing): ``load_ip_adapter`` rebuilds
    each non-IP layer's processor with its class's no-argument constructor (the layer's own
    processor comes back afterwards in ``merged_processors``)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    try:
        type(processor)()
    except TypeError:
        return AttnProcessor2_0()
    return processor


def merged_processors(previous: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """After ``load_ip_adapter``: the IP processors where it put them (inside any wrapper that was
    there), every other layer's previous processor back as it was."""
    merged = {}
    for name, before in previous.items():
        now = loaded[name]
        merged[name] = _wrapped_around(before, now, name) if _is_ip_processor(now) else before
    return merged


@dataclass
class _PipelineState:
    """What loading an IP-Adapter changes on a pipeline."""

    pipe: Any
    processors: dict[str, Any]
    hid_proj: Any
    hid_dim_type: Any
    text_hid_proj: Any
    components: dict[str, tuple[Any, Any]]

    @classmethod
    def of(cls, pipe: Any) -> _PipelineState:
        unet = pipe.unet
        components = {name: (getattr(pipe, name), pipe.config.get(name, _ABSENT))
                      for name in ("image_encoder", "feature_extractor") if hasattr(pipe, name)}
        return cls(pipe, dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type,
                   unet.__dict__.get("text_encoder_hid_proj", _ABSENT), components)

    def restore(self) -> None:
        unet = self.pipe.unet
        unet.set_attn_processor(dict(self.processors))
        unet.encoder_hid_proj = self.hid_proj
        unet.register_to_config(encoder_hid_dim_type=self.hid_dim_type)
        if self.text_hid_proj is _ABSENT:
            unet.__dict__.pop("text_encoder_hid_proj", None)
            unet._modules.pop("text_encoder_hid_proj", None)
        else:
            unet.text_encoder_hid_proj = self.text_hid_proj
        for name, (module, config_value) in self.components.items():
            setattr(self.pipe, name, module)
            if config_value is _ABSENT:
                self.pipe._internal_dict.pop(name, None)
            else:
                self.pipe.register_to_config(**{name: config_value})


@contextlib.contextmanager
def installed_adapters(pipe: Any, state_dicts: list[dict], encoder: Any) -> Iterator[Any]:
    """Load ``state_dicts`` (one per adapter) with ``encoder`` into ``pipe`` through diffusers'
    ``load_ip_adapter``; keep the previous processors (see module doc); restore on exit, even on error."""
    if not hasattr(pipe, "load_ip_adapter") or not hasattr(pipe, "image_encoder"):
        raise ConfigError(f"{type(pipe).__name__} does not take IP-Adapters")
    saved = _PipelineState.of(pipe)
    try:
        pipe.register_modules(image_encoder=encoder)
        # diffusers re-creates every processor with its class's no-argument constructor: hand it the
        # stock processors under the wrappers (the wrappers come back in merged_processors)
        pipe.unet.set_attn_processor({name: _constructible(_innermost(p, name)) for name, p in saved.processors.items()})
        try:
            pipe.load_ip_adapter(list(state_dicts), subfolder=[""] * len(state_dicts),
                                 weight_name=[""] * len(state_dicts), image_encoder_folder=None)
        except (KeyError, RuntimeError, ValueError) as error:
            raise ConsistentDiffusionError(f"cannot load the IP-Adapter into {type(pipe).__name__}: {error} "
                                           "(is it made for this model family?)") from error
        pipe.unet.set_attn_processor(merged_processors(saved.processors, dict(pipe.unet.attn_processors)))
        yield pipe
    finally:
        saved.restore()


def check_paths_exist(paths: tuple[str, ...], what: str) -> None:
    """ConfigError naming the first missing path."""
    for path in paths:
        if not os.path.exists(path):
            raise ConfigError(f"{what} not found: {path}")
