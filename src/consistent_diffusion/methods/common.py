"""Small helpers shared by the method modules: context restore, scheduler swap, sizes
(the native size itself is ``models.vae.native_size``), the UNet parts layers are shared in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from consistent_diffusion.methods.base import GenerationContext
from consistent_diffusion.models.vae import native_size

UNET_PARTS = ("down", "mid", "up")  # diffusers' down_blocks, mid_block, up_blocks


def unet_part(layer: str) -> str:
    """The UNet part ("down", "mid" or "up") of a module or processor name (``up_blocks.1.attentions.0...``)."""
    return layer.split(".", 1)[0].split("_", 1)[0]


@contextlib.contextmanager
def restoring(ctx: GenerationContext) -> Iterator[GenerationContext]:
    """Snapshot every field of ``ctx`` a method may change; restore them on exit, even on error.

    ``num_internal`` is the exception: it describes the output of the call just made, and
    ``series.generate_batch`` reads it after the methods' contexts have closed.
    """
    pipe, prompts, generators = ctx.pipe, list(ctx.prompts), list(ctx.generators)
    negative = None if ctx.negative_prompts is None else list(ctx.negative_prompts)
    call_kwargs = dict(ctx.call_kwargs)
    try:
        yield ctx
    finally:
        ctx.pipe, ctx.prompts, ctx.negative_prompts = pipe, prompts, negative
        ctx.generators = generators
        ctx.call_kwargs.clear()
        ctx.call_kwargs.update(call_kwargs)


@contextlib.contextmanager
def swapped_scheduler(pipe: Any, scheduler: Any) -> Iterator[Any]:
    """Use ``scheduler`` on ``pipe`` inside the block; the previous one is restored, even on error."""
    previous = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = previous


def generation_size(ctx: GenerationContext) -> tuple[int, int]:
    """(width, height) the call will generate at: ``call_kwargs`` or the pipeline default."""
    default_w, default_h = native_size(ctx.pipe)
    width = ctx.call_kwargs.get("width") or default_w
    height = ctx.call_kwargs.get("height") or default_h
    return int(width), int(height)


def batch_size(ctx: GenerationContext) -> int:
    """Images the call generates (prompts x ``num_images_per_prompt``), internal ones included."""
    return len(ctx.prompts) * int(ctx.call_kwargs.get("num_images_per_prompt") or 1)


def follow_source(sibling: Any, pipe: Any) -> Any:
    """Keep a ``from_pipe`` sibling in step with its source: components are shared, but the
    scheduler slot and the progress-bar settings are per pipeline."""
    if sibling.scheduler is not pipe.scheduler:
        sibling.scheduler = pipe.scheduler
    progress = getattr(pipe, "_progress_bar_config", None)
    if progress is not None:
        sibling.set_progress_bar_config(**progress)
    return sibling
