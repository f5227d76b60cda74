"""img2img / SDEdit (Meng et al., ICLR 2022): start from the reference image noised to ``strength``.

The text-to-image pipeline is swapped for its image-to-image sibling built with
``AutoPipelineForImage2Image.from_pipe`` (same components, no copies: SD 1.x/2.x, SDXL and the
embedded model), and the reference image is passed as ``image``. ``strength`` in (0, 1] is the
fraction of the denoising schedule that is re-run: 1 ignores the image's content, small values
keep it; the pipeline runs ``int(steps * strength)`` UNet steps.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import load_image
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import follow_source, generation_size, restoring

_SIBLINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipe -> (components_key, sibling)


def image_to_image_pipeline(pipe: Any) -> Any:
    """The image-to-image sibling of a text-to-image pipeline (shared components, cached per pipe
    while it holds the same component objects)."""
    from diffusers import AutoPipelineForImage2Image

    from consistent_diffusion.models.identity import components_key

    key = components_key(pipe)  # the objects it shares: a replaced component builds a new sibling
    cached = _SIBLINGS.get(pipe)
    if cached is None or cached[0] != key:
        try:
            sibling = AutoPipelineForImage2Image.from_pipe(pipe)
        except (ValueError, KeyError) as error:
            raise ConfigError(f"no image-to-image variant of {type(pipe).__name__}: {error}") from error
        _SIBLINGS[pipe] = cached = (key, sibling)
    return follow_source(cached[1], pipe)


@register("img2img")
@dataclass(frozen=True)
class Img2Img(Method):
    """SDEdit from one reference image.

    image: path or PIL image; it passes ``load_image`` (mode, alpha on white, corrupt/missing
    files) and is resized + centre-cropped to the generation size.
    strength: 0 < strength <= 1; how far from the image the result may move.
    """

    image: Any  # str | os.PathLike | PIL.Image.Image
    strength: float = 0.6  # fraction of the schedule re-run, in (0, 1]

    def __post_init__(self) -> None:
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ConfigError(f"strength must be a number in (0, 1], got {self.strength!r}")
        if not 0 < float(self.strength) <= 1:
            raise ConfigError(f"strength must be in (0, 1] (1 = ignore the image), got {self.strength!r}")
        if self.image is None:
            raise ConfigError("img2img needs an image (a path or a PIL image)")
        load_image(self.image)  # fail early: missing, corrupt or empty image

    def describe(self) -> dict[str, Any]:
        image = os.path.abspath(os.fspath(self.image)) if isinstance(self.image, (str, os.PathLike)) else "<in-memory image>"
        return {"name": self.name, "options": {"image": image, "strength": float(self.strength)}}

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        if "latents" in ctx.call_kwargs or "image" in ctx.call_kwargs:
            raise ConfigError("img2img sets the starting image itself: it cannot follow a method that sets "
                              "`latents` or `image` (put img2img first)")
        steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
        if int(steps * float(self.strength)) < 1:
            raise ConfigError(
                f"img2img with strength {self.strength} and {steps} steps runs no step (int(steps * strength) = 0); "
                f"raise strength to at least {1 / steps:.3g} or use more steps"
            )
        with restoring(ctx):
            width, height = generation_size(ctx)
            image = load_image(self.image, (width, height))
            ctx.pipe = image_to_image_pipeline(ctx.pipe)
            # Image-to-image pipelines take their size from the image.
            ctx.call_kwargs.pop("height", None)
            ctx.call_kwargs.pop("width", None)
            ctx.call_kwargs["image"] = image
            ctx.call_kwargs["strength"] = float(self.strength)
            yield ctx
