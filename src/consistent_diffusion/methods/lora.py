"""LoRA: apply one or several low-rank adapters, each with its own strength, for one call.

Each adapter is loaded with diffusers' ``load_lora_weights`` (our DreamBooth LoRAs, other
diffusers LoRAs, and kohya/A1111-format files wherever diffusers converts them) under its own
PEFT adapter name, then ``set_adapters(names, adapter_weights=scales)`` mixes them: a layer W
becomes W + sum_i scale_i * (alpha_i / rank_i) * B_i A_i (PEFT keeps scale_i * alpha_i / rank_i per
layer and adapter in ``LoraLayer.scaling``). On exit the adapters are deleted and the pipeline's own
adapters, if it had any, are back exactly as they were: the same active names, the same per-layer
``scaling`` (so the user's adapter weights, also per-block ones), enabled/disabled state and
``requires_grad`` flags, and layers only ours wrapped are unwrapped (the parameter names are as
before). A user's switched-off adapters stay off; ours act regardless. The UNet's attention
processors are exactly those that were installed before: loading a LoRA never drops another
method's processors (StyleAligned's), whichever order the methods stack in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import restoring
from consistent_diffusion.models.memory import changed_without_offload

_ADAPTER_PREFIX = "cd_lora"


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)) or not hasattr(value, "__iter__"):
        return (value,)
    return tuple(value)


def _active_adapters(pipe: Any) -> list[str]:
    try:
        return list(pipe.get_active_adapters())
    except (ValueError, AttributeError):
        return []


def _is_tuner_layer(module: Any) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - diffusers' LoRA loading needs peft
        return False
    return isinstance(module, BaseTunerLayer)


@dataclass
class _LayerState:
    """One adapter layer's inference state: active names, ``scaling`` (weight * alpha / r per
    adapter), disabled flag, and its parameters' ``requires_grad``."""

    layer: Any
    active: list[str]
    scaling: dict[str, float]
    disabled: bool
    grads: list[tuple[torch.nn.Parameter, bool]]

    @classmethod
    def of(cls, layer: Any) -> _LayerState:
        return cls(layer, list(layer.active_adapters), dict(layer.scaling), bool(layer.disable_adapters),
                   [(p, p.requires_grad) for p in layer.parameters()])

    def restore(self) -> None:
        self.layer.set_adapter(self.active)
        if self.disabled != bool(self.layer.disable_adapters):
            self.layer.enable_adapters(not self.disabled)
        for name, value in self.scaling.items():
            if name in self.layer.scaling:
                self.layer.scaling[name] = value
        for param, flag in self.grads:
            param.requires_grad_(flag)


_ABSENT = object()


@dataclass
class _ComponentState:
    """A LoRA-loadable component (UNet, text encoder) before our adapters: its adapter layers'
    states, and whether it carried a PEFT config at all."""

    model: torch.nn.Module
    layers: list[_LayerState]
    peft_config: Any
    config_loaded: Any

    @classmethod
    def of(cls, model: torch.nn.Module) -> _ComponentState:
        layers = [_LayerState.of(m) for m in model.modules() if _is_tuner_layer(m)]
        return cls(model, layers, getattr(model, "peft_config", _ABSENT),
                   model.__dict__.get("_hf_peft_config_loaded", _ABSENT))

    def restore(self) -> None:
        """After our adapters are deleted: unwrap the layers only they had (back to the plain
        module: same parameter names as before), then each earlier layer exactly as it was."""
        known = {id(state.layer) for state in self.layers}
        for name, module in list(self.model.named_modules()):
            if _is_tuner_layer(module) and id(module) not in known and not module.scaling:
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, module.get_base_layer())
        for state in self.layers:
            state.restore()
        if self.peft_config is _ABSENT and not getattr(self.model, "peft_config", None):
            self.model.__dict__.pop("peft_config", None)
        if self.config_loaded is _ABSENT:
            self.model.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            self.model._hf_peft_config_loaded = self.config_loaded


def _lora_components(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's LoRA-loadable components (UNet, text encoders) that are present."""
    names = getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder", "text_encoder_2"))
    return [model for name in names if isinstance(model := getattr(pipe, name, None), torch.nn.Module)]


@register("lora")
@dataclass(frozen=True)
class LoRA(Method):
    """One or several LoRAs with strengths.

    weights: LoRA files (``.safetensors``) or folders holding one (``out/lora`` of a LoRA
    DreamBooth run); a single path is accepted too.
    scales: one strength per LoRA (default 1.0 each); 0 disables one, negative values subtract it.
    """

    weights: tuple[str, ...]
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        weights = tuple(os.fspath(w) for w in _as_tuple(self.weights))
        if not weights:
            raise ConfigError("lora needs at least one LoRA file or folder")
        for path in weights:
            if not os.path.exists(path):
                raise ConfigError(f"LoRA not found: {path}")
        scales = tuple(_as_tuple(self.scales)) or (1.0,) * len(weights)
        if len(scales) != len(weights):
            raise ConfigError(f"give one scale per LoRA: {len(weights)} LoRAs, {len(scales)} scales")
        for scale in scales:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ConfigError(f"LoRA scales must be numbers, got {scale!r}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))

    def adapter_names(self) -> list[str]:
        """Unique PEFT adapter names for this call (they never collide with a user's adapters)."""
        return [f"{_ADAPTER_PREFIX}_{index}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
                for index, path in enumerate(self.weights)]

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        loading = loras_loaded(ctx.pipe, self.weights, self.scales, self.adapter_names())
        with restoring(ctx), changed_without_offload(ctx.pipe, loading):
            yield ctx


@contextlib.contextmanager
def loras_loaded(pipe: Any, weights: tuple[str, ...], scales: tuple[float, ...], names: list[str]) -> Iterator[Any]:
    """Load ``weights`` into ``pipe`` as adapters ``names`` mixed with ``scales``; undo on exit."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ConfigError(f"{type(pipe).__name__} does not load LoRAs")
    processors = dict(pipe.unet.attn_processors)
    previous = _active_adapters(pipe)
    states = [_ComponentState.of(model) for model in _lora_components(pipe)]
    loaded: list[str] = []
    try:
        for path, name in zip(weights, names, strict=True):
            try:
                with warnings.catch_warnings():  # several adapters at once is the point here
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_weights(path, adapter_name=name)
            except (ValueError, KeyError, OSError, RuntimeError) as error:
                raise ConsistentDiffusionError(
                    f"cannot load LoRA {path} into {type(pipe).__name__}: {error} "
                    "(is it made for this model family? kohya/A1111 files load where diffusers converts them)"
                ) from error
            loaded.append(name)
        if any(layer.disabled for state in states for layer in state.layers):
            pipe.enable_lora()  # the user's adapters were switched off; ours must act
        pipe.set_adapters(loaded, adapter_weights=list(scales))
        _keep_processors(pipe, processors)
        yield pipe
    finally:
        if loaded:
            pipe.delete_adapters(loaded)
        if previous:
            pipe.set_adapters(previous)  # any layer outside the snapshot too (restore() fixes the weights)
        for state in states:  # then exactly as before (set_adapters alone resets the weights to 1)
            state.restore()
        _keep_processors(pipe, processors)


def _keep_processors(pipe: Any, processors: dict[str, Any]) -> None:
    """Re-install ``processors`` if loading/unloading adapters replaced any of them."""
    current = pipe.unet.attn_processors
    if set(current) != set(processors) or any(current[k] is not processors[k] for k in processors):
        pipe.unet.set_attn_processor(processors)
