"""Low-memory switches: diffusers' CPU offload, VAE slicing/tiling and attention slicing, as one
validated option set, and the context methods use to change weights under offload.

- ``offload="model"``: ``enable_model_cpu_offload`` (each component moves to the accelerator for
  its forward, then back; about the memory of the largest component).
- ``offload="sequential"``: ``enable_sequential_cpu_offload`` (each layer moves in for its forward;
  the least memory, the slowest). The weights live in accelerate's hooks; module parameters are on
  the ``meta`` device.
- ``vae_slicing``: decode the batch one image at a time (same images).
- ``vae_tiling``: encode/decode in overlapping tiles when the image is larger than one tile
  (``vae.tile_sample_min_size``); smaller images are unchanged, larger ones are blended across
  tile seams (diffusers' approximation, not bit-equal).
- ``attention_slicing``: ``enable_attention_slicing`` (attention computed head slice by head slice,
  same output). It replaces the UNet's attention processors; a method that installs its own
  processors (StyleAligned, consistent subject) takes over the layers it shares for its call and
  gives the sliced processors back on exit.

Methods that change weights or build a sibling pipeline run those changes inside
``offload_suspended(pipe)``: the hooks are taken off (sequential offload puts the real weights
back on the modules), the change is made, and the same offload is installed again on the same
device. Model offload may execute on ``cpu`` (the hooks are installed and run, nothing moves):
that is how the tests exercise the hook path without an accelerator. Sequential offload cannot
(accelerate 1.16 with torch 2.13: its first on-load turns the parameters into plain tensors and
fails), so it is refused there and tested only where an accelerator exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError

OFFLOAD_MODES = ("model", "sequential")


@dataclass(frozen=True)
class LowMemory:
    """The low-memory switches of one pipeline (all off by default)."""

    offload: str | None = None  # None, "model" or "sequential"
    vae_slicing: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False

    def __post_init__(self) -> None:
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"offload must be one of {', '.join(OFFLOAD_MODES)} or unset, got {self.offload!r}")
        for name in ("vae_slicing", "vae_tiling", "attention_slicing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def any(self) -> bool:
        return bool(self.offload or self.vae_slicing or self.vae_tiling or self.attention_slicing)

    def describe(self) -> dict[str, Any]:
        return {"offload": self.offload, "vae_slicing": self.vae_slicing, "vae_tiling": self.vae_tiling,
                "attention_slicing": self.attention_slicing}


def apply_low_memory(pipe: Any, options: LowMemory, device: str | torch.device = "cuda") -> Any:
    """Switch ``options`` on for ``pipe`` (in place; returns it). ``device``: the accelerator the
    offload hooks move components to (the pipeline's weights should be on the CPU). Raises
    ``ConfigError`` for a pipeline without the component a switch needs."""
    if options.vae_slicing or options.vae_tiling:
        vae = getattr(pipe, "vae", None)
        if vae is None or not hasattr(vae, "enable_slicing"):
            raise ConfigError(f"{type(pipe).__name__} has no VAE that supports slicing/tiling")
        if options.vae_slicing:
            vae.enable_slicing()
        if options.vae_tiling:
            vae.enable_tiling()
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.offload is not None:
        enable_offload(pipe, options.offload, torch.device(device))
    return pipe


def enable_offload(pipe: Any, mode: str, device: torch.device) -> None:
    """Install diffusers' ``mode`` ("model"/"sequential") CPU offload onto ``device``."""
    if mode not in OFFLOAD_MODES:
        raise ConfigError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    if mode == "sequential" and device.type == "cpu":
        raise ConfigError("sequential offload needs an accelerator device (e.g. --device cuda): accelerate's "
                          "per-layer hooks fail when they execute on the CPU")
    pipe.to("cpu")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def offload_mode(pipe: Any) -> str | None:
    """"model", "sequential" or None: the accelerate offload installed on ``pipe``'s components."""
    from accelerate.hooks import AlignDevicesHook, CpuOffload, SequentialHook

    def hooks_of(module: Any) -> list[Any]:
        hook = getattr(module, "_hf_hook", None)
        return list(hook.hooks) if isinstance(hook, SequentialHook) else [hook] if hook is not None else []

    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    if any(isinstance(h, CpuOffload) for m in modules for h in hooks_of(m)):
        return "model"
    if any(isinstance(h, AlignDevicesHook) and h.offload for m in modules for sub in m.modules() for h in hooks_of(sub)):
        return "sequential"
    return None


def offload_device(pipe: Any) -> torch.device:
    """The device the offload hooks execute on (diffusers records it when enabling offload)."""
    device = getattr(pipe, "_offload_device", None)
    return torch.device(device) if device is not None else torch.device(pipe._execution_device)


@contextlib.contextmanager
def offload_suspended(pipe: Any) -> Iterator[str | None]:
    """Take ``pipe``'s offload hooks off for the block (weights on the modules, on the CPU) and
    install the same offload again on the same device afterwards, also on error. Yields the mode
    (None: no offload; the block runs as is)."""
    mode = offload_mode(pipe)
    if mode is None:
        yield None
        return
    device = offload_device(pipe)
    pipe.remove_all_hooks()
    try:
        yield mode
    finally:
        enable_offload(pipe, mode, device)


@contextlib.contextmanager
def offloaded_like(pipe: Any, model: torch.nn.Module) -> Iterator[None]:
    """``model`` (an extra component a sibling pipeline adds, e.g. a ControlNet) under the same
    offload as ``pipe`` for the block: on the offload device for its forward, back on the CPU
    after; its hooks are removed on exit. Nothing happens without offload."""
    from accelerate import cpu_offload, cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    mode = offload_mode(pipe)
    if mode is None or hasattr(model, "_hf_hook"):
        yield
        return
    device = offload_device(pipe)
    hook = None
    if mode == "model":
        _, hook = cpu_offload_with_hook(model, device)
    else:
        cpu_offload(model, device, offload_buffers=len(model._parameters) > 0)
    try:
        yield
    finally:
        if hook is not None:
            hook.offload()
        remove_hook_from_module(model, recurse=True)
        model.to("cpu")


def free_after_call(source: Any, called: Any) -> None:
    """After a call of a sibling pipeline (``called``, sharing ``source``'s components): offload
    every component as ``source``'s own call would at its end (``maybe_free_model_hooks``)."""
    if called is not source and getattr(source, "_all_hooks", None):
        source.maybe_free_model_hooks()


@contextlib.contextmanager
def changed_without_offload(pipe: Any, change: contextlib.AbstractContextManager) -> Iterator[Any]:
    """Enter ``change`` (a context that changes ``pipe``'s weights or modules) with the offload
    suspended, run the block under the offload, and exit ``change`` suspended again: under
    sequential offload the weights are only on the modules while the hooks are off."""
    stack = contextlib.ExitStack()
    with offload_suspended(pipe):
        value = stack.enter_context(change)
    try:
        yield value
    finally:
        with offload_suspended(pipe):
            stack.close()


def weights_device(pipe: Any) -> torch.device:
    """Where a new module for ``pipe`` (a ControlNet) should hold its weights: the CPU under
    offload (the hooks move it), else the UNet's device."""
    return torch.device("cpu") if offload_mode(pipe) else pipe.unet.device


@contextlib.contextmanager
def low_memory_applied(pipe: Any, options: LowMemory) -> Iterator[Any]:
    """``options`` switched on for the block, and ``pipe`` as it was afterwards (its attention
    processors, VAE flags, device; offload it already had is left alone): for a long-lived pipeline
    that one job runs with the switches (the app). Offload executes on the pipeline's device."""
    processors = dict(pipe.unet.attn_processors)
    vae = getattr(pipe, "vae", None)
    flags = (getattr(vae, "use_slicing", False), getattr(vae, "use_tiling", False))
    had_offload = offload_mode(pipe) is not None
    device = offload_device(pipe) if had_offload else pipe.device
    wanted = options if not had_offload else LowMemory(vae_slicing=options.vae_slicing, vae_tiling=options.vae_tiling,
                                                        attention_slicing=options.attention_slicing)
    try:
        yield apply_low_memory(pipe, wanted, device=device)
    finally:
        if wanted.offload is not None and offload_mode(pipe) is not None:
            pipe.remove_all_hooks()
            pipe.to(device)
        if vae is not None and hasattr(vae, "use_slicing"):
            vae.use_slicing, vae.use_tiling = flags
        pipe.unet.set_attn_processor(processors)
