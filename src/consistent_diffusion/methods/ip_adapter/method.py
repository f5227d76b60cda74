"""``ip_adapter``: image prompts through IP-Adapter's decoupled cross-attention (Ye et al. 2023).

Each cross-attention layer gets, beside the text attention, an attention over image tokens:
``Z = Attn(Q, K_t, V_t) + s * Attn(Q, W'_k c_i, W'_v c_i)`` (paper eq. 5), where ``c_i`` are the
tokens the adapter's projection makes from the CLIP image embedding and ``s`` the scale.
InstantStyle (Wang et al. 2024) is the same adapter with ``s`` set per block so only the style
(or style and layout) layers receive the image. diffusers' processors compute exactly this; this
method loads them for one call (``loading.installed_adapters``), passes the image embeddings as
``ip_adapter_image_embeds`` (one row per batch entry: one image for all rows, or one per series
row) and region masks as ``cross_attention_kwargs["ip_adapter_masks"]``.

Low-memory switches (models/memory.py): under model offload the adapter is loaded and unloaded
with the hooks off, so the added image encoder is offloaded like the other components for the
call. Under attention slicing the self-attention layers stay sliced; the cross-attention layers
run diffusers' IP-Adapter processor (unsliced: its text and image scores are (HW, 77) and
(HW, tokens), small beside self-attention's (HW, HW)) for the call.

The embedded model's own adapters (``embedded-style``, ``embedded-subject``, or a folder that
``train ip-adapter`` wrote; ``embedded.py``) have no CLIP encoder: their image embeddings come from
the frozen EfficientNet-Lite0 (unconditional: zeros) and reach diffusers as the same
``ip_adapter_image_embeds``; everything else (scales, presets, per-row images, masks, several
adapters) is the same path.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import generation_size, restoring
from consistent_diffusion.methods.ip_adapter.embedded import image_encoder, is_shipped_name, resolve_embedded
from consistent_diffusion.methods.ip_adapter.loading import (
    check_paths_exist,
    installed_adapters,
    is_sdxl,
    load_image_encoder,
    read_state_dict,
    resolve_adapter,
)
from consistent_diffusion.models.memory import changed_without_offload, weights_device

# InstantStyle's block choices, as diffusers' ``set_ip_adapter_scale`` dicts (1.0 = the scale).
# SDXL: the InstantStyle README and diffusers' IP-Adapter guide ("style" = up_blocks.0.attentions.1,
# "style+layout" adds down_blocks.2.attentions.1). SD 1.5: the authors' infer_style_sd15.py
# (experimental, "not obvious as SDXL"): target_blocks ["up_blocks.1"] for style,
# ["down_blocks.2", "mid_block", "up_blocks.1"] for style+layout.
INSTANTSTYLE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
        "style+layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    },
    "sd15": {
        "style": {"up": {"block_1": 1.0}},
        "style+layout": {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}},
    },
}
PRESET_NAMES = ("style", "style+layout")


def _as_paths(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (os.fspath(value),)
    return tuple(os.fspath(v) for v in value)


def _times(config: Any, scale: float) -> Any:
    """A scale config (number, list or nested dict) with every number multiplied by ``scale``."""
    if isinstance(config, dict):
        return {k: _times(v, scale) for k, v in config.items()}
    if isinstance(config, list):
        return [_times(v, scale) for v in config]
    return float(config) * scale


@register("ip_adapter")
@dataclass(frozen=True)
class IPAdapter(Method):
    """Image prompts with one or several IP-Adapters.

    adapters: released-layout folders or weight files (one, or one per image with masks), or the
        embedded model's own: ``embedded-style`` / ``embedded-subject`` or a ``train ip-adapter`` folder.
    images: image files. One adapter: all go to it (several = several subjects; then give masks),
        or with ``per_row`` image i is the image prompt of series row (prompt) i. Several adapters:
        one image each.
    scales: one per adapter (default 1.0); with ``preset`` the preset's 1.0s are multiplied by it.
    preset: ``style`` or ``style+layout`` (InstantStyle blocks for the pipeline's family).
    block_scale: an explicit ``set_ip_adapter_scale`` dict for every adapter (instead of a preset).
    masks: region masks (white = where the image acts), one per image (one adapter) or per adapter.
    """

    adapters: tuple[str, ...]
    images: tuple[str, ...]
    scales: tuple[float, ...] = ()
    preset: str | None = None
    block_scale: dict | None = None
    per_row: bool = False
    masks: tuple[str, ...] = ()
    _rows: tuple = field(default=(), repr=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        adapters, images, masks = _as_paths(self.adapters), _as_paths(self.images), _as_paths(self.masks)
        if not adapters:
            raise ConfigError("ip_adapter needs an adapter folder or weight file")
        if not images:
            raise ConfigError("ip_adapter needs at least one image")
        check_paths_exist(tuple(p for p in adapters if not is_shipped_name(p)), "IP-Adapter")
        for path in adapters:
            resolve_embedded(path)  # ConfigError for an unknown shipped name or a folder without weights
        check_paths_exist(images, "IP-Adapter image")
        check_paths_exist(masks, "IP-Adapter mask")
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else (self.scales,)
        scales = scales or (1.0,) * len(adapters)
        if len(scales) != len(adapters):
            raise ConfigError(f"give one IP-Adapter scale per adapter: {len(adapters)} adapters, {len(scales)} scales")
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ConfigError(f"IP-Adapter scales must be finite numbers, got {s!r}")
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise ConfigError(f"unknown IP-Adapter preset {self.preset!r}; choose from {', '.join(PRESET_NAMES)}")
        if self.preset is not None and self.block_scale is not None:
            raise ConfigError("give an IP-Adapter preset or a block_scale dict, not both")
        if self.block_scale is not None and not isinstance(self.block_scale, dict):
            raise ConfigError("IP-Adapter block_scale must be a dict such as {'up': {'block_0': [0.0, 1.0, 0.0]}}")
        if self.per_row and (len(adapters) > 1 or masks):
            raise ConfigError("ip_adapter per-row images take one adapter and no masks")
        if len(adapters) > 1 and len(images) != len(adapters):
            raise ConfigError(f"with several IP-Adapters give one image each: {len(adapters)} adapters, {len(images)} images")
        groups = len(adapters) if len(adapters) > 1 else len(images)
        if masks and len(masks) != groups:
            raise ConfigError(f"give one IP-Adapter mask per {'adapter' if len(adapters) > 1 else 'image'}: "
                              f"{groups} expected, {len(masks)} given")
        object.__setattr__(self, "adapters", adapters)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))

    def describe(self) -> dict[str, Any]:
        options = {"adapters": [p if is_shipped_name(p) else os.path.abspath(p) for p in self.adapters],
                   "images": [os.path.abspath(p) for p in self.images],
                   "scales": list(self.scales), "preset": self.preset, "block_scale": self.block_scale,
                   "per_row": self.per_row, "masks": [os.path.abspath(p) for p in self.masks]}
        return {"name": self.name, "options": options}

    def for_series(self, items: Sequence[tuple[int, str, int]], batch_size: int) -> IPAdapter:
        """Per-row images follow the series' prompt indices (rows found by prompt and seed)."""
        if not self.per_row:
            return self
        rows = tuple(((prompt, int(seed)), int(index)) for index, prompt, seed in items)
        if rows and max(index for _, index in rows) >= len(self.images):
            raise ConfigError(f"ip_adapter per-row images: {len(self.images)} images for "
                              f"{max(i for _, i in rows) + 1} series rows")
        return replace(self, _rows=rows, _cache=self._cache)

    # -- one call -----------------------------------------------------------------------------

    def scale_configs(self, pipe: Any) -> list[Any]:
        """One ``set_ip_adapter_scale`` config per adapter for ``pipe``'s family."""
        if self.preset is not None:
            block = INSTANTSTYLE_PRESETS["sdxl" if is_sdxl(pipe) else "sd15"][self.preset]
            return [_times(block, s) for s in self.scales]
        if self.block_scale is not None:
            return [_times(self.block_scale, s) for s in self.scales]
        return list(self.scales)

    def _loaded(self, pipe: Any) -> tuple[list[dict], Any]:
        """State dicts and CLIP image encoder (None for the embedded adapters: their features come
        from ``embedded.image_encoder``), read once per method, kept for its later calls."""
        sdxl = is_sdxl(pipe)
        key = ("sdxl" if sdxl else "sd", str(pipe.dtype), str(weights_device(pipe)))
        if key not in self._cache:
            embedded = [resolve_embedded(path) for path in self.adapters]
            if any(embedded) and not all(embedded):
                raise ConfigError("the embedded model's IP-Adapters (EfficientNet-Lite0 features) cannot be combined "
                                  "with CLIP-encoder adapters; combine adapters made for one encoder")
            self._cache.clear()
            if all(embedded):
                self._cache[key] = ([read_state_dict(str(weights)) for weights in embedded], None)
                return self._cache[key]
            files = [resolve_adapter(path, sdxl) for path in self.adapters]
            encoders = {f.image_encoder for f in files}
            if len(encoders) > 1:
                raise ConfigError(f"these IP-Adapters use different image encoders ({', '.join(sorted(encoders))}); "
                                  "combine adapters made for one encoder")
            self._cache[key] = ([read_state_dict(f.weights) for f in files], load_image_encoder(files[0].image_encoder, pipe))
        return self._cache[key]

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        state_dicts, encoder = self._loaded(ctx.pipe)
        # loaded and unloaded with the offload hooks off: model offload is then installed again over
        # the added image encoder (it follows the other components) and leaves with it
        loading = installed_adapters(ctx.pipe, state_dicts, encoder)
        with restoring(ctx), changed_without_offload(ctx.pipe, loading) as pipe:
            try:
                pipe.set_ip_adapter_scale(self.scale_configs(pipe))
            except (ValueError, KeyError, IndexError) as error:
                raise ConfigError(f"IP-Adapter scale does not fit this UNet's blocks: {error}") from error
            ctx.call_kwargs["ip_adapter_image_embeds"] = self.image_embeds(ctx)
            rows = self.row_embeds(ctx) if self.per_row else None
            if self.masks:
                kwargs = dict(ctx.call_kwargs.get("cross_attention_kwargs") or {})
                kwargs["ip_adapter_masks"] = self.mask_tensors(ctx)
                ctx.call_kwargs["cross_attention_kwargs"] = kwargs
            with _rows_in_place(pipe.unet, rows):
                yield ctx

    def _row_images(self, ctx: GenerationContext) -> list[int]:
        """Image index of every batch entry (internal entries take the first user row's)."""
        user = list(zip(ctx.prompts, ctx.generators, strict=True))[ctx.num_internal:]
        rows = dict(self._rows)
        picked = [rows.get((p, g.initial_seed()), i) for i, (p, g) in enumerate(user)]
        if max(picked) >= len(self.images):
            raise ConfigError(f"ip_adapter per-row images: {len(self.images)} images for a batch of {len(user)} rows")
        return [picked[0]] * ctx.num_internal + picked

    def _encoded(self, pipe: Any, paths: list[str], hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) embeddings of ``paths`` as one adapter's images: (1, n, D),
        or (1, n, 257, C) hidden states for "plus" adapters (the pipeline's ``encode_image``)."""
        from PIL import Image

        if self._loaded(pipe)[1] is None:  # the embedded adapters: EfficientNet-Lite0 features, zeros unconditional
            features = image_encoder(weights_device(pipe)).encode(list(paths))
            pos = features.to(device=pipe._execution_device, dtype=pipe.dtype)
            return pos[None], torch.zeros_like(pos)[None]
        images = [Image.open(p).convert("RGB") for p in paths]
        with torch.no_grad():
            pos, neg = pipe.encode_image(images, pipe._execution_device, 1, hidden)
        return pos[None], neg[None]

    def image_embeds(self, ctx: GenerationContext) -> list[torch.Tensor]:
        """``ip_adapter_image_embeds`` for the pipeline: per adapter (2, n, D) ([unconditional;
        conditional] under classifier-free guidance, else (1, n, D)); the pipeline tiles them over
        the batch, exactly as it does for ``ip_adapter_image``. Per-row images: the first row's (the
        UNet hook puts each row's own in place)."""
        from diffusers.models.embeddings import ImageProjection

        pipe, guided = ctx.pipe, _guided(ctx.pipe, ctx.call_kwargs)
        layers = pipe.unet.encoder_hid_proj.image_projection_layers
        groups = [[p] for p in self.images] if len(self.adapters) > 1 or self.per_row else [list(self.images)]
        embeds = []
        for layer, group in zip(layers, groups, strict=False):
            pos, neg = self._encoded(pipe, group, not isinstance(layer, ImageProjection))
            embeds.append(torch.cat([neg, pos]) if guided else pos)
        return embeds

    def row_embeds(self, ctx: GenerationContext) -> torch.Tensor:
        """Per-row image embeddings as the UNet sees its batch: (2 B k, 1, D) under guidance
        ([unconditional rows; conditional rows]), B prompts each repeated k =
        ``num_images_per_prompt`` times in place (as the pipeline repeats prompt embeddings)."""
        from diffusers.models.embeddings import ImageProjection

        pipe = ctx.pipe
        hidden = not isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
        encoded = {i: self._encoded(pipe, [self.images[i]], hidden) for i in sorted(set(self._row_images(ctx)))}
        rows, repeat = self._row_images(ctx), int(ctx.call_kwargs.get("num_images_per_prompt") or 1)
        pos = torch.cat([encoded[r][0] for r in rows]).repeat_interleave(repeat, dim=0)
        neg = torch.cat([encoded[r][1] for r in rows]).repeat_interleave(repeat, dim=0)
        return torch.cat([neg, pos]) if _guided(pipe, ctx.call_kwargs) else pos

    def mask_tensors(self, ctx: GenerationContext) -> list[torch.Tensor]:
        """Per adapter a (1, n, H, W) mask in [0, 1] at the output size (IPAdapterMaskProcessor)."""
        from diffusers.image_processor import IPAdapterMaskProcessor
        from PIL import Image

        width, height = generation_size(ctx)
        processor = IPAdapterMaskProcessor()
        masks = [Image.open(p).convert("L") for p in self.masks]
        if len(self.adapters) == 1:
            stacked = processor.preprocess(masks, height=height, width=width)  # (n, 1, H, W)
            return [stacked.reshape(1, stacked.shape[0], stacked.shape[2], stacked.shape[3])]
        return [processor.preprocess([m], height=height, width=width) for m in masks]


def _guided(pipe: Any, call_kwargs: dict[str, Any]) -> bool:
    """Whether the pipeline will run classifier-free guidance for these arguments."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    default = parameters["guidance_scale"].default if "guidance_scale" in parameters else 1.0
    guidance = float(call_kwargs.get("guidance_scale", default))
    return guidance > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


@contextlib.contextmanager
def _rows_in_place(unet: Any, rows: torch.Tensor | None) -> Iterator[None]:
    """Per-row images: a UNet pre-hook that passes ``rows`` (one embedding per batch entry) as the
    image embeddings instead of the pipeline's tiled first image. ConfigError, before any attention
    runs, when a method entered after ip_adapter added batch entries (stack per-row ip_adapter last)."""
    if rows is None:
        yield
        return

    def swap(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        if rows.shape[0] != sample.shape[0]:
            raise ConfigError(f"ip_adapter has per-row image embeddings for {rows.shape[0]} batch entries, the UNet "
                              f"got {sample.shape[0]}: stack ip_adapter after the methods that add batch entries "
                              "(style_aligned, consistent_subject)")
        added = dict(kwargs.get("added_cond_kwargs") or {})
        added["image_embeds"] = [rows.to(sample.device)]
        return args, {**kwargs, "added_cond_kwargs": added}

    handle = unet.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
