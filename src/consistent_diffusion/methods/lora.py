"""LoRA: apply one or several low-rank adapters, each with its own strength, for one call.

Each adapter is loaded with diffusers' ``load_lora_weights`` (our DreamBooth LoRAs, other
diffusers LoRAs, and kohya/A1111-format files wherever diffusers converts them) under its own
PEFT adapter name, then ``set_adapters(names, adapter_weights=scales)`` mixes them: a layer W
becomes W + sum_i scale_i * (alpha_i / rank_i) * B_i A_i. On exit the adapters are deleted, the
previously active adapters (if the pipeline had its own) are re-activated, and the UNet's attention
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

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import restoring

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
        with restoring(ctx), loras_loaded(ctx.pipe, self.weights, self.scales, self.adapter_names()):
            yield ctx


@contextlib.contextmanager
def loras_loaded(pipe: Any, weights: tuple[str, ...], scales: tuple[float, ...], names: list[str]) -> Iterator[Any]:
    """Load ``weights`` into ``pipe`` as adapters ``names`` mixed with ``scales``; undo on exit."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ConfigError(f"{type(pipe).__name__} does not load LoRAs")
    processors = dict(pipe.unet.attn_processors)
    previous = _active_adapters(pipe)
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
        pipe.set_adapters(loaded, adapter_weights=list(scales))
        _keep_processors(pipe, processors)
        yield pipe
    finally:
        if loaded:
            pipe.delete_adapters(loaded)
        if previous:
            pipe.set_adapters(previous)
        _keep_processors(pipe, processors)


def _keep_processors(pipe: Any, processors: dict[str, Any]) -> None:
    """Re-install ``processors`` if loading/unloading adapters replaced any of them."""
    current = pipe.unet.attn_processors
    if set(current) != set(processors) or any(current[k] is not processors[k] for k in processors):
        pipe.unet.set_attn_processor(processors)
