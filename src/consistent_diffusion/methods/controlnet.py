"""ControlNet (Zhang, Rao, Agrawala, ICCV 2023): a control image steers the shape of every image.

The text-to-image pipeline is swapped for its ControlNet sibling
(``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``, built with
``from_pipe``: same UNet, VAE, text encoders and scheduler objects, no copies), so whatever other
methods installed on the shared UNet (StyleAligned's attention processors, LoRA adapters) stays in
force. Several ControlNets at once (diffusers' MultiControlNet) each take their own control image
and conditioning scale: the residuals they add to the UNet are summed, each multiplied by its
scale, during the ``[guidance_start, guidance_end]`` fraction of the denoising steps.

A ControlNet is any diffusers ``ControlNetModel``: a folder (ours from ``train controlnet``, or a
user's pretrained one for SD 1.5 / SDXL), a hub id in the local cache, ``embedded-canny`` /
``embedded-silhouette`` for the ones shipped with the embedded model (once shipped), ``default``
(the embedded model's own ControlNet for the entry's preprocess condition), or an in-memory model. One control image (path or PIL) per ControlNet; ``preprocess`` computes the
control image from an ordinary picture (``canny``, ``silhouette``, ``scribble``; ``none`` means
the image already is a control image). Control images are resized and centre-cropped to the
generation size and shared by every image of the batch.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.core.images import load_image
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import follow_source, generation_size, restoring
from consistent_diffusion.methods.controls import CONDITIONS, make_control
from consistent_diffusion.models.memory import offload_suspended, offloaded_like, weights_device

SHIPPED_PREFIX = "embedded-"
SHIPPED_ROOT = ASSETS_DIR / "controlnet"
_MODELS: dict[tuple, Any] = {}  # (source, its files' key, device, dtype) -> ControlNetModel
_MAX_CACHED_MODELS = 4
_SIBLINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipe -> (key, sibling)


def shipped_controlnet(condition: str) -> Path:
    """Folder of the ControlNet shipped for the embedded model and ``condition``."""
    folder = SHIPPED_ROOT / f"{SHIPPED_PREFIX}{condition}"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"no ControlNet for the embedded model and condition {condition!r} is installed ({folder}); train one: "
            f"consistent-diffusion train controlnet --condition {condition} --data DATASET --out RUN"
        )
    return folder


DEFAULT_SPEC = "default"


def default_controlnet_for(pipe: Any, condition: str) -> str:
    """``default`` -> the ControlNet shipped for ``pipe``'s model and ``condition`` (the embedded
    model's own; other models have no default: give a ControlNet)."""
    from consistent_diffusion.models.loading import model_identity

    if condition in ("", "none"):
        raise ConfigError("the default ControlNet is chosen by its condition: give --control-preprocess canny|silhouette|scribble")
    if model_identity(pipe).kind != "embedded":
        raise ConfigError("only the embedded model has a default ControlNet; give a ControlNet folder or hub id for this model")
    return str(shipped_controlnet(condition))


def resolve_controlnet(spec: str) -> str:
    """A spec -> a path or hub id for ``ControlNetModel.from_pretrained``."""
    if spec.startswith(SHIPPED_PREFIX):
        return str(shipped_controlnet(spec[len(SHIPPED_PREFIX):]))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a ControlNet folder (no config.json)")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # hub id: from the local cache only
    raise ModelNotFoundError(f"ControlNet not found: {spec} (a folder, a cached hub id, or embedded-<condition>)")


def load_controlnet(spec: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Load (and cache) a ControlNetModel; in-memory models pass through, moved to device/dtype."""
    from diffusers import ControlNetModel

    if not isinstance(spec, (str, os.PathLike)):
        if spec.device != torch.device(device) or spec.dtype != dtype:
            spec = spec.to(device=device, dtype=dtype)
        return spec
    source = resolve_controlnet(os.fspath(spec))
    key = (source, _files_key(source), str(device), str(dtype))
    if key not in _MODELS:
        try:
            model = ControlNetModel.from_pretrained(source, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"cannot load ControlNet {spec}: {error}") from error
        if len(_MODELS) >= _MAX_CACHED_MODELS:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = model.to(device)
    return _MODELS[key]


def _files_key(source: str) -> tuple:
    """(path, size, mtime_ns) of a ControlNet folder's files (a model retrained there is reloaded);
    () for a hub id (a cached snapshot does not change)."""
    from consistent_diffusion.models.identity import files_key

    folder = Path(source)
    return files_key(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else ()


def _is_xl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__


def controlnet_pipeline(pipe: Any, controlnet: Any) -> Any:
    """The ControlNet sibling of a text-to-image pipeline (components shared; one model or a list)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    if "ControlNet" in type(pipe).__name__:
        raise ConfigError("this pipeline already runs a ControlNet: give all ControlNets to one controlnet method")
    if "Img2Img" in type(pipe).__name__ or "Inpaint" in type(pipe).__name__:
        raise ConfigError(f"ControlNet works on text-to-image pipelines, not {type(pipe).__name__} "
                          "(controlnet cannot be combined with img2img here)")
    from consistent_diffusion.models.identity import components_key, object_key

    # Keyed on the objects the sibling shares (not id(): never reused), so a replaced component or
    # ControlNet builds a new sibling; one sibling per pipe: ControlNets change rarely, memory matters.
    models = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    key = (components_key(pipe), tuple(object_key(model) for model in models))
    cached = _SIBLINGS.get(pipe)
    if cached is None or cached[0] != key:
        cls = StableDiffusionXLControlNetPipeline if _is_xl(pipe) else StableDiffusionControlNetPipeline
        with offload_suspended(pipe):  # from_pipe casts every component (.to(dtype)): not on offloaded weights
            sibling = cls.from_pipe(pipe, controlnet=models if len(models) > 1 else models[0], torch_dtype=pipe.unet.dtype)
        _SIBLINGS[pipe] = cached = (key, sibling)
    return follow_source(cached[1], pipe)


def _tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, Image.Image)) or not isinstance(value, (list, tuple)):
        return (value,)
    return tuple(value)


@register("controlnet")
@dataclass(frozen=True)
class ControlNet(Method):
    """One or several ControlNets, each with its control image and conditioning scale.

    controlnets: ControlNet specs (folder, cached hub id, ``embedded-<condition>``) or models.
    images: one image per ControlNet (path or PIL): the control image itself, or a picture that
    ``preprocess`` turns into one.
    scales: conditioning scale per ControlNet (default 1.0; 0 disables one).
    preprocess: per image, ``none`` (default) or a preprocessor name (canny | silhouette | scribble).
    guidance_start / guidance_end: fraction of the denoising steps during which ControlNets act.
    """

    controlnets: tuple[Any, ...]
    images: tuple[Any, ...]
    scales: tuple[float, ...] = ()
    preprocess: tuple[str, ...] = ()
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def __post_init__(self) -> None:
        controlnets, images = _tuple(self.controlnets), _tuple(self.images)
        if not controlnets:
            raise ConfigError("controlnet needs at least one ControlNet")
        if len(images) != len(controlnets):
            raise ConfigError(f"give one control image per ControlNet: {len(controlnets)} ControlNets, {len(images)} images")
        scales = _tuple(self.scales) or (1.0,) * len(controlnets)
        preprocess = _tuple(self.preprocess) or ("none",) * len(controlnets)
        if len(scales) != len(controlnets) or len(preprocess) != len(controlnets):
            raise ConfigError("give one scale and one preprocess entry per ControlNet (or none at all)")
        for scale in scales:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ConfigError(f"conditioning scales must be numbers, got {scale!r}")
        for name in preprocess:
            if name not in ("none", *CONDITIONS):
                raise ConfigError(f"unknown preprocess {name!r}; accepted: none, {', '.join(CONDITIONS)}")
        if not 0 <= self.guidance_start < self.guidance_end <= 1:
            raise ConfigError(f"need 0 <= guidance_start < guidance_end <= 1, got {self.guidance_start}, {self.guidance_end}")
        for spec, condition in zip(controlnets, preprocess, strict=True):
            if spec == DEFAULT_SPEC:
                if condition == "none":
                    raise ConfigError("controlnet 'default' is chosen by its condition: give a preprocess "
                                      f"({', '.join(CONDITIONS)}) for it")
            elif isinstance(spec, (str, os.PathLike)):
                resolve_controlnet(os.fspath(spec))  # fail early on a missing ControlNet
        for image in images:
            load_image(image)  # fail early on a missing or corrupt image
        object.__setattr__(self, "controlnets", tuple(os.fspath(c) if isinstance(c, os.PathLike) else c for c in controlnets))
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        object.__setattr__(self, "preprocess", tuple(preprocess))

    def describe(self) -> dict[str, Any]:
        def name(value: Any) -> str:
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
            return f"<in-memory {type(value).__name__}>"

        return {"name": self.name, "options": {
            "controlnets": [name(c) for c in self.controlnets], "images": [name(i) for i in self.images],
            "scales": list(self.scales), "preprocess": list(self.preprocess),
            "guidance_start": self.guidance_start, "guidance_end": self.guidance_end,
        }}

    def control_images(self, size: tuple[int, int]) -> list[Image.Image]:
        """The control images at ``size`` = (width, height)."""
        out = []
        for image, preprocess in zip(self.images, self.preprocess, strict=True):
            if preprocess == "none":
                out.append(load_image(image, size))
            else:
                out.append(make_control(preprocess, image, size))
        return out

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        if "image" in ctx.call_kwargs:
            raise ConfigError("controlnet cannot follow a method that sets `image` (img2img) in this version")
        with restoring(ctx), contextlib.ExitStack() as stack:
            unet = ctx.pipe.unet
            specs = [default_controlnet_for(ctx.pipe, condition) if spec == DEFAULT_SPEC else spec
                     for spec, condition in zip(self.controlnets, self.preprocess, strict=True)]
            models = [load_controlnet(spec, weights_device(ctx.pipe), unet.dtype) for spec in specs]
            for model in models:  # under the pipeline's offload for the call, if it has one
                stack.enter_context(offloaded_like(ctx.pipe, model))
            ctx.pipe = controlnet_pipeline(ctx.pipe, models)
            images = self.control_images(generation_size(ctx))
            single = len(models) == 1
            ctx.call_kwargs["image"] = images[0] if single else images
            ctx.call_kwargs["controlnet_conditioning_scale"] = self.scales[0] if single else list(self.scales)
            ctx.call_kwargs["control_guidance_start"] = self.guidance_start
            ctx.call_kwargs["control_guidance_end"] = self.guidance_end
            yield ctx
