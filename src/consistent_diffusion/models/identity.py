"""Cheap cache keys for "the same weights" and "the same files": what method caches key on.

``id(module)`` is a poor key: it survives in-place weight changes (DreamBooth copies weights into
the loaded UNet; LoRA scales change through ``set_adapters``) and it is reused by a new object once
the old one is garbage-collected. The keys here change whenever the state they describe may have:

- ``object_key(obj)``: a serial number unique to ``obj`` for the life of the process. It is held
  through a weak reference, so a new object at a reused ``id`` gets a new serial.
- ``weights_key(module)``: per parameter and buffer, (name, ``object_key``, storage pointer,
  in-place version counter ``tensor._version``), plus every PEFT adapter layer's state (active
  adapters, per-adapter ``scaling`` = scale * alpha / r, merged adapters, disabled flag). Any
  ``copy_``/``add_``/``load_state_dict`` on a parameter bumps its version; replacing a parameter
  or its ``.data`` changes its serial or pointer; adding or removing adapters changes the names.
  Not seen: writes through ``param.data`` (``.data`` is a view with its own version counter, by
  PyTorch's design); peft's merge uses it, and is seen through ``merged_adapters`` instead.
- ``pipeline_weights_key(pipe)``: ``weights_key`` of each ``torch.nn.Module`` component.
- ``components_key(pipe)``: ``object_key`` of each component (the objects, not their weights):
  the key of a ``from_pipe`` sibling, which shares the objects.
- ``files_key(paths)``: (resolved path, size, mtime_ns) of each file: a file rewritten in place
  changes it, without reading the file.

Computing a key walks the module's parameters once (about a millisecond for an SD UNet); it
synchronises nothing on the GPU.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_SERIALS: dict[int, tuple[weakref.ref, int]] = {}
_COUNTER = itertools.count(1)


def object_key(obj: Any) -> int:
    """A serial number unique to ``obj`` while it lives, never reused by another object.

    ``obj`` must support weak references (modules, tensors, pipelines, tokenizers do)."""
    ident = id(obj)
    entry = _SERIALS.get(ident)
    if entry is not None and entry[0]() is obj:
        return entry[1]
    serial = next(_COUNTER)

    def forget(_ref: weakref.ref, ident: int = ident, serial: int = serial) -> None:
        current = _SERIALS.get(ident)
        if current is not None and current[1] == serial:
            del _SERIALS[ident]

    _SERIALS[ident] = (weakref.ref(obj, forget), serial)
    return serial


def _adapter_state(module: torch.nn.Module) -> tuple | None:
    """A PEFT tuner layer's inference state, or None for other modules (duck-typed: no peft import)."""
    scaling = getattr(module, "scaling", None)
    if not isinstance(scaling, dict) or not hasattr(module, "active_adapters"):
        return None
    return (
        tuple(module.active_adapters),
        tuple(sorted((name, float(value)) for name, value in scaling.items())),
        tuple(getattr(module, "merged_adapters", ())),
        bool(getattr(module, "disable_adapters", False)),
    )


def weights_key(module: torch.nn.Module) -> tuple:
    """A hashable key that differs whenever ``module``'s weights or adapter state may differ."""
    tensors = tuple(
        (name, object_key(tensor), tensor.data_ptr(), tensor._version)
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
    )
    adapters = tuple(
        (name, state) for name, sub in module.named_modules() if (state := _adapter_state(sub)) is not None
    )
    return object_key(module), tensors, adapters


def _components(pipe: Any) -> dict[str, Any]:
    components = getattr(pipe, "components", None)
    if isinstance(components, dict):
        return components
    return {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def pipeline_weights_key(pipe: Any) -> tuple:
    """``weights_key`` of every module component of ``pipe`` (UNet, VAE, text encoders, ...)."""
    return tuple(
        (name, weights_key(value))
        for name, value in sorted(_components(pipe).items())
        if isinstance(value, torch.nn.Module)
    )


def sampling_key(pipe: Any) -> tuple:
    """What a sampled trajectory depends on: the weights (``pipeline_weights_key``) and the
    scheduler's class and config (timestep spacing, prediction type, betas)."""
    scheduler = getattr(pipe, "scheduler", None)
    config = dict(getattr(scheduler, "config", {}) or {})
    return pipeline_weights_key(pipe), type(scheduler).__name__, repr(sorted(config.items()))


def components_key(pipe: Any, skip: Iterable[str] = ("scheduler",)) -> tuple:
    """Which objects ``pipe`` holds: ``object_key`` per component (plain values as they are)."""
    skipped = set(skip)
    key = []
    for name, value in sorted(_components(pipe).items()):
        if name in skipped:
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            key.append((name, value))
            continue
        try:
            key.append((name, object_key(value)))
        except TypeError:  # not weak-referenceable (a tuple, a list): described by value
            key.append((name, repr(value)))
    return tuple(key)


def files_key(paths: Iterable[str | os.PathLike]) -> tuple:
    """(resolved path, size, mtime_ns) per file, sorted: changes when any file is rewritten."""
    key = []
    for path in paths:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        key.append((str(resolved), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(key))
