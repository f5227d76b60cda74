"""The uniform method interface.

A method changes *how* one batch is generated. It never reads metrics. Methods stack through
``run(ctx, methods)``, the one place that calls a pipeline: it enters every method's
``applied`` context in order, calls ``ctx.pipe(prompt=ctx.prompts,
negative_prompt=ctx.negative_prompts, generator=ctx.generators, **ctx.call_kwargs)`` once, and
returns the images after the first ``ctx.num_internal`` entries. Series, DDPM edits, the bench,
ControlNet shape measurement, prior-preservation class images and validation images all go
through it.

What a method may do inside ``applied`` (and must undo on exit, even on error):
- swap ``ctx.pipe`` for a sibling pipeline built with ``from_pipe`` (img2img, ControlNet),
- add or change ``ctx.call_kwargs`` (``image``, ``strength``, ``latents``, ``callback_on_step_end``,
  ``cross_attention_kwargs`` ...),
- install attention processors on ``ctx.pipe.unet`` (restoring the previous ones on exit),
- prepend internal batch entries (e.g. a StyleAligned reference) to ``prompts``/``generators``
  and raise ``num_internal`` accordingly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.models.memory import free_after_call


@dataclass
class GenerationContext:
    """One batch about to be generated.

    pipe: a diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, or the embedded model).
    prompts / negative_prompts: one entry per batch element.
    generators: one CPU ``torch.Generator`` per batch element (seeded from the image's seed).
    call_kwargs: the remaining pipeline call arguments (steps, guidance, height, width, ...).
    num_internal: leading batch entries that belong to a method and are not returned.
    """

    pipe: Any
    prompts: list[str]
    negative_prompts: list[str] | None
    generators: list[torch.Generator]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    num_internal: int = 0


class Method:
    """Base class. Subclasses set ``name`` and implement ``applied``; their options are a
    frozen dataclass validated in ``__post_init__``."""

    name: ClassVar[str] = ""

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        """Modify ``ctx`` for one generation call; restore everything on exit."""
        yield ctx

    def for_series(self, items: Sequence[tuple[int, str, int]], batch_size: int) -> Method:
        """This method as it runs for a whole series: ``items`` are the series' (prompt index,
        prompt, seed) in order, generated ``batch_size`` per call. Default: itself. A method
        whose rule spans calls returns a configured copy (StyleAligned: one reference shared by
        every batch); ``series.generate_series`` calls it and records the original."""
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for manifests (name + options)."""
        from dataclasses import asdict, is_dataclass

        options = asdict(self) if is_dataclass(self) else {}
        return {"name": self.name, "options": _jsonable(options)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def run(ctx: GenerationContext, methods: Sequence[Method] = (), output_type: str = "pil") -> list[Any]:
    """Generate one batch with ``methods`` stacked in order; returns the user's images only.

    The images are PIL images (``output_type="pil"``) or, for ``"latent"``/``"pt"``/``"np"``, one
    entry of the pipeline's output per image (latents: (C, H/f, W/f) tensors). Every method's
    context is closed, restoring the pipeline, before this returns or raises.
    """
    source = ctx.pipe
    with contextlib.ExitStack() as stack:
        for method in methods:
            ctx = stack.enter_context(method.applied(ctx))
        call_kwargs = stack.enter_context(call_arguments(ctx.pipe, ctx.call_kwargs))
        output = ctx.pipe(
            prompt=ctx.prompts,
            negative_prompt=ctx.negative_prompts,
            generator=ctx.generators,
            output_type=output_type,
            **call_kwargs,
        )
        free_after_call(source, ctx.pipe)  # a sibling's call leaves the offloaded components in place
    return list(output.images[ctx.num_internal :])


ZERO_SNR_GUIDANCE_RESCALE = 0.7  # Lin et al. 2024, sec. 3.4 (phi = 0.7)


def default_guidance_rescale(pipe: Any) -> float | None:
    """The guidance rescale a model should be sampled with when the user sets none: 0.7 for a model
    trained to zero terminal SNR (its scheduler config has ``rescale_betas_zero_snr``), whose guided
    predictions overexpose without it (Lin et al. 2024, sec. 3.4); None (do not pass it) otherwise."""
    config = getattr(getattr(pipe, "scheduler", None), "config", None) or {}
    return ZERO_SNR_GUIDANCE_RESCALE if config.get("rescale_betas_zero_snr", False) else None


@contextlib.contextmanager
def rescaled_guidance(unet: torch.nn.Module, guidance_scale: float, rescale: float) -> Iterator[None]:
    """Guidance rescale (Lin et al. 2024, eq. 15-16) for a pipeline that has no ``guidance_rescale``
    argument (diffusers' SD img2img and ControlNet pipelines), as a forward hook on its UNet.

    With classifier-free guidance the UNet sees the batch [unconditional; conditional] and returns
    (u, c), (2B, C, H, W); the pipeline then takes x_cfg = u + w (c - u). Eq. 15-16 replace x_cfg by
    x_cfg * k, k = phi * std(c) / std(x_cfg) + (1 - phi) (std per sample, as diffusers'
    ``rescale_noise_cfg``). The hook returns (k u, k c), whose guided combination is exactly k x_cfg,
    so the pipeline's own loop is unchanged. Removed on exit, even on error."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[0] % 2:
            return None  # not a guided batch
        uncond, cond = sample.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        dims = list(range(1, sample.ndim))
        factor = rescale * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True) + (1.0 - rescale)
        scaled = sample * torch.cat([factor, factor])
        return (scaled, *output[1:]) if isinstance(output, tuple) else type(output)(sample=scaled)

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def call_arguments(pipe: Any, call_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The arguments to call ``pipe`` with: ``call_kwargs`` as they are, except a
    ``guidance_rescale`` that ``pipe.__call__`` does not name (it would swallow it in ``**kwargs``):
    that one is applied by ``rescaled_guidance`` on the UNet for the call. The dict is unchanged."""
    rescale = call_kwargs.get("guidance_rescale")
    parameters = inspect.signature(type(pipe).__call__).parameters
    if rescale is None or "guidance_rescale" in parameters:
        yield call_kwargs
        return
    rest = {key: value for key, value in call_kwargs.items() if key != "guidance_rescale"}
    default = parameters["guidance_scale"].default if "guidance_scale" in parameters else 1.0
    guidance = float(call_kwargs.get("guidance_scale", default))
    if not rescale or guidance <= 1.0:
        yield rest
        return
    with rescaled_guidance(pipe.unet, guidance, float(rescale)):
        yield rest


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register("img2img")`` makes the method reachable by name."""

    def decorator(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_methods() -> list[str]:
    """Names of the registered methods."""
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str, **options: Any) -> Method:
    """Build a registered method from its options."""
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name](**options)


# Modules that register built-in methods; each method issue appends its module here.
BUILTIN_METHOD_MODULES: list[str] = [
    "consistent_diffusion.methods.img2img",
    "consistent_diffusion.methods.inversion",
    "consistent_diffusion.methods.style_aligned",
    "consistent_diffusion.methods.lora",
    "consistent_diffusion.methods.dreambooth",
    "consistent_diffusion.methods.controlnet",
    "consistent_diffusion.methods.consistent_subject",
    "consistent_diffusion.methods.textual_inversion",
    "consistent_diffusion.methods.ip_adapter",
]


def _import_builtin_methods() -> None:
    import importlib

    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
