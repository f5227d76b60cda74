"""StyleAligned: style-consistent generation by shared attention (Hertz, Voynov, Fruchter, Cohen-Or 2023).

During denoising every image's self-attention also attends to the reference image's keys and
values, after its queries and keys are AdaIN-normalised to the reference's statistics
(paper section 3); optionally group-norm statistics are shared too. The reference is batch
element 0 of each classifier-free-guidance half; it effectively attends only to itself, so sharing never
changes it. It is either

- generated in the same batch: the first prompt of the batch, or an internal entry
  (``reference_prompt`` + ``reference_seed``) prepended to the batch and not returned; or
- a real image, brought in through edit-friendly DDPM inversion (``methods.inversion``): the
  reference row follows the real image's noisy latents x_t step by step (pinned in a
  ``NoiseMapScheduler``), so the other images see the real image's keys/values at every noise
  level. Pinning a row needs a sampler whose samples are the x_t of eq. 6: the pipeline's own
  DDIMScheduler is kept (its config, the call's steps and eta); any other scheduler is replaced
  by DDIM (eta 0) over the pipeline's training schedule for the call, with a warning, and
  ``describe()["sampling"]`` records what sampled (see ``StyleAligned``).

A series has one reference: ``StyleAligned.for_series`` (called by ``series.generate_series``)
makes the series' first image the internal reference of every batch when the series spans
several pipeline calls.

Cost: the reference's keys/values are computed once per layer and step (they are part of the
batch) and shared by concatenation: every image attends to 2n tokens instead of n in one batched
call, linear in the batch size (for the reference those are its own tokens twice, which is its
plain self-attention). ``full_attention_share`` (every image attends to all images) is the
quadratic variant and only used when asked for.

Tensor layout inside the processor: (groups, per_group, tokens, channels) where
``groups`` is 2 with classifier-free guidance (unconditional half, conditional half) and 1
without, and row 0 of each group is the reference.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, Method, register, run
from consistent_diffusion.methods.common import batch_size, generation_size, restoring, swapped_scheduler
from consistent_diffusion.methods.inversion import (
    Inversion,
    NoiseMapScheduler,
    inversion_reference,
    invert,
    match_inversion_size,
    noise_map_scheduler,
    sample_trajectory,
)


def calc_mean_std(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the token axis (-2) of (..., tokens, channels) features.

    Computed (in at least float32) as E[x^2] - E[x]^2 with plain means: torch's var over a non-last axis
    is ~8x slower on CPU, and attention features are O(1), far from cancellation trouble.
    """
    if feat.dtype in (torch.float16, torch.bfloat16):
        feat = feat.float()
    mean = feat.mean(dim=-2, keepdim=True)
    var = (feat * feat).mean(dim=-2, keepdim=True) - mean * mean
    return mean, (var.clamp_min(0) + eps).sqrt()


def adain(feat: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN (Huang & Belongie 2017, as used in StyleAligned section 3): give ``feat`` the per-channel token
    statistics of ``ref``. feat: (..., tokens, channels); ref broadcastable to it."""
    mean, std = calc_mean_std(feat, eps)
    ref_mean, ref_std = calc_mean_std(ref, eps)
    gain = ref_std / std
    return (feat * gain.to(feat.dtype)).add_((ref_mean - mean * gain).to(feat.dtype))


@dataclass
class _SharingState:
    """Per-call facts the processors and norm hooks need (set by ``StyleAligned.applied``)."""

    per_group: int = 1  # images per CFG half; row 0 of each half is the reference
    active: bool = False


class SharedAttentionProcessor:
    """Self-attention processor with StyleAligned sharing; same call signature as diffusers'
    ``AttnProcessor2_0``. Layers with nothing to share delegate to ``inner`` (the processor that
    was installed before), so disabled sharing is bit-for-bit the stock computation."""

    def __init__(self, method: StyleAligned, state: _SharingState, inner: Any) -> None:
        self.method = method
        self.state = state
        self.inner = inner
        self._warned_mask = False

    def _does_nothing(self) -> bool:
        m = self.method
        return not (m.share_attention or m.full_attention_share or m.adain_queries or m.adain_keys or m.adain_values)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        per = self.state.per_group
        batch = hidden_states.shape[0]
        plain = (
            not self.state.active
            or self._does_nothing()
            or encoder_hidden_states is not None
            or per < 2
            or batch % per != 0
        )
        if not plain and attention_mask is not None:
            if not self._warned_mask:
                warnings.warn("StyleAligned: self-attention with a mask is left unshared", UserWarning, stacklevel=2)
                self._warned_mask = True
            plain = True
        if plain:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._shared(attn, hidden_states, temb)

    def _shared(self, attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        m = self.method
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None or attn.norm_k is not None:  # per-head norms come first, as in the stock order
            query, key = (
                x if norm is None else _merge_heads(norm(_split_heads(x, attn.heads)))
                for x, norm in ((query, attn.norm_q), (key, attn.norm_k))
            )

        per = self.state.per_group
        groups = batch // per
        # (groups, per, tokens, channels); row 0 of each group is the reference.
        q, k, v = (x.reshape(groups, per, tokens, -1) for x in (query, key, value))
        out = shared_attention(q, k, v, m, heads=attn.heads, scale=attn.scale)

        hidden_states = out.reshape(batch, tokens, -1).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., tokens, heads * dim) -> (..., heads, tokens, dim)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, tokens, dim) -> (..., tokens, heads * dim)."""
    return x.transpose(-3, -2).flatten(-2)


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: StyleAligned,
    heads: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """StyleAligned attention on (groups, per, tokens, channels) tensors; row 0 is the reference.

    Queries/keys (and values if asked) are AdaIN'd to the reference's statistics (per channel
    over tokens, i.e. per head and head-dim; the reference maps to itself). Every row attends to
    [own tokens; reference tokens] in one batched attention call: for the reference that is its
    own tokens twice, which gives exactly its plain self-attention (duplicate key/value pairs
    only rescale the softmax), so sharing never changes it. ``shared_score_scale`` multiplies the
    reference keys seen by the other rows; ``shared_score_shift`` is added to the reference
    logits (harmless for the reference row, for the same reason). With ``full_attention_share``
    every row attends to all rows of its group instead (quadratic in the batch).
    Returns (groups, per, tokens, channels).
    """
    groups, per, tokens, channels = q.shape
    ref_q, ref_k, ref_v = q[:, :1], k[:, :1], v[:, :1]
    if options.adain_queries:
        q = adain(q, ref_q)
    if options.adain_keys:
        k = adain(k, ref_k)
    if options.adain_values:
        v = adain(v, ref_v)
    mask = None
    if options.full_attention_share:
        keys = k.flatten(1, 2).unsqueeze(1).expand(-1, per, -1, -1)
        values = v.flatten(1, 2).unsqueeze(1).expand(-1, per, -1, -1)
    elif options.share_attention:
        shared_k = k[:, :1].expand_as(k)
        if options.shared_score_scale != 1.0:
            factor = torch.full((1, per, 1, 1), options.shared_score_scale, dtype=k.dtype, device=k.device)
            factor[:, 0] = 1.0  # the reference's own duplicate stays as is
            shared_k = shared_k * factor
        keys = torch.cat([k, shared_k], dim=-2)
        values = torch.cat([v, v[:, :1].expand_as(v)], dim=-2)
        if options.shared_score_shift != 0.0:
            mask = torch.zeros(1, 1, 1, 2 * tokens, dtype=q.dtype, device=q.device)
            mask[..., tokens:] = options.shared_score_shift
    else:
        keys, values = k, v

    def heads_of(x: torch.Tensor) -> torch.Tensor:  # (g, p, n, c) -> (g * p, heads, n, c / heads)
        return _split_heads(x.flatten(0, 1), heads)

    out = F.scaled_dot_product_attention(heads_of(q), heads_of(keys), heads_of(values), attn_mask=mask, scale=scale)
    return _merge_heads(out).unflatten(0, (groups, per))


def shared_group_norm(
    module: nn.GroupNorm, x: torch.Tensor, per_group: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """GroupNorm where each non-reference image is normalised with the statistics of itself joined
    with the reference along space, as the reference implementation does. x: (B, C, ...).

    ``out``: the stock output, whose reference rows (row 0 of each group of ``per_group``) are
    kept; the other rows are written into it in place. Computed here when not given.
    """
    if out is None:
        out = F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
    batch, channels = x.shape[:2]
    groups, spatial = batch // per_group, x[0, 0].numel()
    xg = x.reshape(groups, per_group, channels, spatial)
    # One native group norm over [x_i ; x_ref] per non-reference image (2x the spatial size):
    # fewer, larger kernels than assembling pooled statistics by hand (2-3x faster on CPU).
    joined = torch.cat([xg[:, 1:], xg[:, :1].expand(-1, per_group - 1, -1, -1)], dim=-1)
    normed = F.group_norm(
        joined.reshape(groups * (per_group - 1), channels, 2 * spatial),
        module.num_groups, module.weight, module.bias, module.eps,
    )
    out.view(groups, per_group, channels, spatial)[:, 1:] = normed.view(groups, per_group - 1, channels, -1)[
        ..., :spatial
    ]
    return out


def _switch_vector(count: int, level: float) -> list[bool]:
    """Which self-attention layers stay unshared: a fraction ``level`` of ``count``, spread evenly."""
    if level <= 0 or count == 0:
        return [False] * count
    if level >= 1:
        return [True] * count
    flip = level > 0.5
    fraction = 1 - level if flip else level
    chosen = max(1, int(round(fraction * count)))
    step = count / chosen
    picked = {int(math.floor(i * step)) for i in range(chosen)}
    vec = [i in picked for i in range(count)]
    return [not x for x in vec] if flip else vec


@register("style_aligned")
@dataclass(frozen=True)
class StyleAligned(Method):
    """StyleAligned options (defaults follow the paper's SDXL demos).

    The reference is, in order of precedence: ``reference_inversion`` (a real image already
    inverted), ``reference_image`` (a real image, inverted at first use with the generation's
    steps), ``reference_prompt`` (generated in the same batch as an internal entry), or else the
    first image of the series (the first image of the batch when the series is one batch; an
    internal copy of it in every batch otherwise, see ``for_series``).

    A real reference is pinned to its noisy latents x_t at the call's timesteps: the inversion's
    trajectory when the schedules agree, else x_t drawn afresh from its x0 by eq. 6 (seeded
    with ``reference_seed``). The call keeps its steps; its size becomes the reference's. The
    sampler is the pipeline's own DDIMScheduler or, stacked on ``ddpm_edit``, its noise-map
    scheduler; any other scheduler is replaced by DDIM (eta 0) over the same training schedule
    for the call (a warning says so). ``describe()["sampling"]`` records what sampled.
    """

    share_group_norm: bool = True  # GroupNorm statistics of each image pooled with the reference's
    share_layer_norm: bool = False  # accepted for parity with google/style-aligned; LayerNorm is per token, so it changes nothing there either
    share_attention: bool = True  # self-attention also attends to the reference's keys/values
    adain_queries: bool = True  # AdaIN queries to the reference's per-channel statistics
    adain_keys: bool = True  # AdaIN keys likewise
    adain_values: bool = False  # AdaIN values likewise (the paper leaves values alone)
    shared_score_scale: float = 1.0  # multiplies the reference keys (a temperature on shared logits), > 0
    shared_score_shift: float = 0.0  # added to the logits of reference tokens (log-space boost), finite
    only_self_level: float = 0.0  # fraction of self-attention layers left unshared, in [0, 1]
    full_attention_share: bool = False  # every image attends to all images of the batch (quadratic)
    reference_prompt: str | None = None  # internal reference entry generated in the same batch
    reference_seed: int = 0  # seed of the internal reference entry
    reference_image: str | None = None  # path of a real reference image (inverted with DDPM inversion)
    reference_image_prompt: str = ""  # the real image's description used for its inversion
    reference_inversion: Any = None  # an Inversion (or its folder): a real reference already inverted
    inversion_cfg: float | None = None  # guidance of the reference's inversion (default: the batch's)
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)
    _sampling: dict = field(default_factory=dict, repr=False, compare=False, hash=False)  # last real-reference call

    def __post_init__(self) -> None:
        for name in (
            "share_group_norm",
            "share_layer_norm",
            "share_attention",
            "adain_queries",
            "adain_keys",
            "adain_values",
            "full_attention_share",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"StyleAligned {name} must be True or False, got {getattr(self, name)!r}")
        if not _finite(self.shared_score_scale) or self.shared_score_scale <= 0:
            raise ConfigError(f"shared_score_scale must be a finite number > 0, got {self.shared_score_scale!r}")
        if not _finite(self.shared_score_shift):
            raise ConfigError(f"shared_score_shift must be a finite number, got {self.shared_score_shift!r}")
        if not _finite(self.only_self_level) or not 0 <= self.only_self_level <= 1:
            raise ConfigError(f"only_self_level must be a fraction in [0, 1], got {self.only_self_level!r}")
        if not isinstance(self.reference_seed, int) or isinstance(self.reference_seed, bool):
            raise ConfigError(f"reference_seed must be an integer, got {self.reference_seed!r}")
        if self.reference_prompt is not None and not isinstance(self.reference_prompt, str):
            raise ConfigError(f"reference_prompt must be text, got {self.reference_prompt!r}")
        sources = [
            n for n in ("reference_prompt", "reference_image", "reference_inversion") if getattr(self, n) is not None
        ]
        if len(sources) > 1:
            raise ConfigError(f"give at most one StyleAligned reference source, got {', '.join(sources)}")
        if self.reference_image is not None:
            from consistent_diffusion.core.images import load_image

            load_image(self.reference_image)  # fail early on a missing or corrupt file
        if self.inversion_cfg is not None and (not _finite(self.inversion_cfg) or self.inversion_cfg < 0):
            raise ConfigError(f"inversion_cfg must be a number >= 0, got {self.inversion_cfg!r}")
        if isinstance(self.reference_inversion, (str, os.PathLike)):
            object.__setattr__(self, "reference_inversion", Inversion.load(self.reference_inversion))

    def describe(self) -> dict[str, Any]:
        """Options that re-create the method (``get_method("style_aligned", **options)``)."""
        options = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if not name.startswith("_") and name != "reference_inversion"
        }
        if self.reference_image is not None:
            options["reference_image"] = os.path.abspath(self.reference_image)
        if self.reference_inversion is not None:
            options["reference_inversion"] = inversion_reference(self.reference_inversion)
        described: dict[str, Any] = {"name": self.name, "options": options}
        if self._sampling:  # a real reference sampled: with what (not an option; re-created by the options)
            described["sampling"] = dict(self._sampling)
        return described

    def has_reference_source(self) -> bool:
        """True when the reference is given (a prompt, a real image or an inversion)."""
        return any(x is not None for x in (self.reference_prompt, self.reference_image, self.reference_inversion))

    def for_series(self, items: Sequence[tuple[int, str, int]], batch_size: int) -> StyleAligned:
        """One reference for the whole series: without a reference source, a series of ``items``
        (prompt index, prompt, seed) that spans several batches of ``batch_size`` gets its first
        image as an internal reference (``reference_prompt`` + ``reference_seed``) in every batch."""
        if self.has_reference_source() or len(items) <= batch_size:
            return self
        _, prompt, seed = items[0]
        return replace(self, reference_prompt=prompt, reference_seed=int(seed), _cache={}, _sampling={})

    # -- installation ------------------------------------------------------------------------

    @contextlib.contextmanager
    def installed(self, unet: Any, per_group: int) -> Iterator[_SharingState]:
        """Install the shared-attention processors (and group-norm hooks) on ``unet``.

        Restores the previous processors and removes the hooks on exit, even on error. Layers
        whose processor was replaced by someone else meanwhile are left as they are (warning).
        """
        state = _SharingState(per_group=per_group, active=True)
        previous = dict(unet.attn_processors)
        self_layers = [name for name in previous if name.endswith("attn1.processor")]
        unshared = dict(zip(self_layers, _switch_vector(len(self_layers), self.only_self_level), strict=True))
        installed: dict[str, Any] = {}
        for name, processor in previous.items():
            if name in unshared and not unshared[name]:
                installed[name] = SharedAttentionProcessor(self, state, processor)
            else:
                installed[name] = processor
        handles = []
        try:
            unet.set_attn_processor(dict(installed))
            if self.share_group_norm:
                for module in unet.modules():
                    if isinstance(module, nn.GroupNorm):
                        handles.append(module.register_forward_hook(_group_norm_hook(state)))
            yield state
        finally:
            state.active = False
            for handle in handles:
                handle.remove()
            current = unet.attn_processors
            restore = {}
            replaced = []
            for name, processor in current.items():
                if name in previous and processor is installed.get(name):
                    restore[name] = previous[name]
                else:
                    restore[name] = processor
                    if isinstance(installed.get(name), SharedAttentionProcessor):
                        replaced.append(name)
            unet.set_attn_processor(restore)
            if replaced:
                warnings.warn(
                    f"StyleAligned: {len(replaced)} attention processors were replaced while it was active "
                    "(e.g. by loading an adapter that sets processors); they were left as found",
                    UserWarning,
                    stacklevel=3,
                )

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        with restoring(ctx):
            inversion = self._reference_inversion(ctx)
            if inversion is not None:
                stack = self._use_real_reference(ctx, inversion)
            else:
                stack = contextlib.nullcontext()
                if self.reference_prompt is not None:
                    self._prepend_reference(ctx, self.reference_prompt, _seeded(self.reference_seed))
            per_group = batch_size(ctx)
            with stack, self.installed(ctx.pipe.unet, per_group):
                yield ctx

    # -- the reference -----------------------------------------------------------------------

    def _prepend_reference(self, ctx: GenerationContext, prompt: str, generator: torch.Generator) -> None:
        if int(ctx.call_kwargs.get("num_images_per_prompt") or 1) != 1:
            raise ConfigError("StyleAligned with an internal reference needs num_images_per_prompt=1")
        negative = None
        if ctx.negative_prompts is not None:  # the series' negative prompt applies to its reference too
            negative = ctx.negative_prompts[0] if ctx.negative_prompts else ""
        if "latents" in ctx.call_kwargs:  # a previous method fixed the starting latents: add the reference's
            latents = ctx.call_kwargs["latents"]
            first = torch.randn((1, *latents.shape[1:]), generator=generator, dtype=torch.float32).to(latents)
            first = _advance_to_batch_start(ctx, prompt, negative, generator, first)
            ctx.call_kwargs["latents"] = torch.cat([first, latents])
        ctx.prompts = [prompt, *ctx.prompts]
        if ctx.negative_prompts is not None:
            ctx.negative_prompts = [negative, *ctx.negative_prompts]
        ctx.generators = [generator, *ctx.generators]
        ctx.num_internal += 1

    def _reference_inversion(self, ctx: GenerationContext) -> Any:
        if self.reference_inversion is not None:
            return self.reference_inversion
        if self.reference_image is None:
            return None
        if "image" in ctx.call_kwargs:
            raise ConfigError("a real StyleAligned reference cannot be combined with img2img in one call; "
                              "use reference_prompt (a generated reference) with img2img")
        from consistent_diffusion.models.identity import sampling_key

        steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
        cfg = self.inversion_cfg
        if cfg is None:
            cfg = float(ctx.call_kwargs.get("guidance_scale", 3.5))
        size = generation_size(ctx)
        key = (sampling_key(ctx.pipe), steps, cfg, size)  # weights + scheduler, not id()
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = invert(
                ctx.pipe,
                self.reference_image,
                self.reference_image_prompt,
                steps=steps,
                cfg=cfg,
                size=size,
                generator=_seeded(self.reference_seed),
            )
        return self._cache[key]

    def _use_real_reference(self, ctx: GenerationContext, inversion: Any) -> Any:
        """Prepend the real reference as internal row 0, pinned to its noisy latents x_t.

        Returns the context that installs the sampler (the scheduler swap, or the pin on a
        ``ddpm_edit`` scheduler already in place); records it in ``self._sampling``.
        """
        if "image" in ctx.call_kwargs:
            raise ConfigError("a real StyleAligned reference cannot be combined with img2img in one call")
        current = ctx.pipe.scheduler
        composed = isinstance(current, NoiseMapScheduler)  # e.g. ddpm_edit: keep its noise maps, pin row 0
        if ctx.call_kwargs.get("latents") is not None and not composed:
            raise ConfigError("a real StyleAligned reference needs to set the starting latents itself")
        match_inversion_size(ctx, inversion, "style_aligned", steps=False)  # its latent fixes the batch's size
        steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
        ctx.call_kwargs["num_inference_steps"] = steps
        sampler, replaced = _sampler_for_real_reference(current)
        timesteps = sampler.schedule(steps).cpu().long()
        trajectory, source = reference_trajectory(inversion, sampler, timesteps, self.reference_seed)
        unet = ctx.pipe.unet
        if ctx.call_kwargs.get("latents") is None:
            width, height = inversion.size
            factor = int(ctx.pipe.vae_scale_factor)
            shape = (1, int(unet.config.in_channels), height // factor, width // factor)
            # The same draws the pipeline would make for these generators (diffusers' randn_tensor).
            ctx.call_kwargs["latents"] = torch.cat(
                [torch.randn(shape, generator=g, dtype=torch.float32) for g in ctx.generators]
            ).to(device=unet.device, dtype=unet.dtype)
        start = sampler.skip
        latents = ctx.call_kwargs["latents"]
        ctx.call_kwargs["latents"] = torch.cat([trajectory[start : start + 1].to(latents), latents])
        ctx.prompts = [inversion.prompt, *ctx.prompts]
        if ctx.negative_prompts is not None:
            ctx.negative_prompts = [inversion.negative_prompt or "", *ctx.negative_prompts]
        ctx.generators = [_seeded(self.reference_seed), *ctx.generators]
        ctx.num_internal += 1
        self._sampling.clear()
        self._sampling.update(
            sampler="ddpm_edit noise maps" if composed else "DDIMScheduler",
            replaced=replaced,
            steps=steps,
            eta=float(ctx.call_kwargs.get("eta") or 0.0) if not composed else float(sampler.nm_eta),
            timesteps=[int(t) for t in timesteps],
            reference_trajectory=source,
            size=list(inversion.size),
        )
        if replaced is not None:
            warnings.warn(
                f"StyleAligned: a real reference is pinned to its x_t, which needs DDIM sampling; "
                f"{replaced} is replaced by DDIM (eta 0) over the same training schedule for this call",
                UserWarning,
                stacklevel=4,
            )
        return _pinned_first_row(ctx.pipe, sampler, trajectory, swap=not composed)


def _sampler_for_real_reference(current: Any) -> tuple[Any, str | None]:
    """The NoiseMapScheduler that samples a batch with a pinned real reference, and the name of
    the pipeline's scheduler it replaces (None when the pipeline's own is kept).

    ``ddpm_edit``'s scheduler (already a NoiseMapScheduler) is used as is; the pipeline's
    DDIMScheduler is kept (same config; plain DDIM steps with the call's eta); any other
    scheduler (whose samples are not the x_t of eq. 6, or that steps several times per
    timestep) is replaced by DDIM over its training schedule (betas, spacing, prediction type).
    """
    if isinstance(current, NoiseMapScheduler):
        return current, None
    if isinstance(current, DDIMScheduler):
        return noise_map_scheduler(current, exact=False), None
    return noise_map_scheduler(current), type(current).__name__


def reference_trajectory(
    inversion: Any, scheduler: Any, timesteps: torch.Tensor, seed: int
) -> tuple[torch.Tensor, str]:
    """The real reference's x_t at ``timesteps`` (N,) of ``scheduler``: (N + 1, C, h, w), last = x0.

    The inversion's own trajectory ``xs`` when it was made at these timesteps over the same
    noise levels (alphas_cumprod); else drawn afresh from its x0 by eq. 6 (``sample_trajectory``,
    seeded with ``seed``): the pinned row only needs x_t ~ q(x_t | x0) at each step.
    Returns the trajectory and how it was obtained.
    """
    same_steps = torch.equal(timesteps.cpu().long(), inversion.timesteps.cpu().long())
    if same_steps and inversion.scheduler_config is not None:
        levels = noise_map_scheduler(inversion.scheduler_config).alphas_cumprod
        same_steps = torch.equal(levels.cpu(), scheduler.alphas_cumprod.cpu())
    if same_steps:
        return inversion.xs, "inversion"
    drawn = sample_trajectory(scheduler, inversion.x0, timesteps.cpu().long(), _seeded(seed))
    return drawn, f"redrawn from x0 (eq. 6, seed {int(seed)})"


@contextlib.contextmanager
def _pinned_first_row(pipe: Any, sampler: Any, trajectory: torch.Tensor, swap: bool) -> Iterator[None]:
    """Row 0 (just prepended) follows ``trajectory`` on ``sampler``; with ``swap`` the sampler
    replaces the pipeline's scheduler. Undone on exit, even on error."""
    sampler.shift_pins(1)
    sampler.pin(0, trajectory)
    try:
        with swapped_scheduler(pipe, sampler) if swap else contextlib.nullcontext():
            yield
    finally:
        sampler.unpin(0)
        sampler.shift_pins(-1)


def _advance_to_batch_start(
    ctx: GenerationContext, prompt: str, negative: str | None, generator: torch.Generator, latent: torch.Tensor
) -> torch.Tensor:
    """A generated reference's latent at the step where the batch starts.

    ``latent`` (1, C, h, w) is pure noise x_T. When the pipeline's scheduler is a noise-map
    scheduler that skips its first ``skip`` steps (``ddpm_edit`` at ``skip > 0``), the other rows
    start at x_{t_skip}; the reference is brought there by running those ``skip`` steps for it
    alone (same noise maps, guidance and conditioning; ``skip`` UNet calls at batch 1), so it
    is the image it would be at ``skip = 0``. Otherwise ``latent`` is returned unchanged.
    """
    scheduler = ctx.pipe.scheduler
    if not isinstance(scheduler, NoiseMapScheduler) or scheduler.skip == 0:
        return latent
    head = GenerationContext(
        pipe=ctx.pipe,
        prompts=[prompt],
        negative_prompts=None if negative is None else [negative],
        generators=[generator],
        call_kwargs={**ctx.call_kwargs, "latents": latent},
    )
    with swapped_scheduler(ctx.pipe, scheduler.leading_part()):
        return run(head, [], output_type="latent")[0].unsqueeze(0).to(latent)


def _group_norm_hook(state: _SharingState) -> Any:
    def hook(module: nn.GroupNorm, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        per = state.per_group
        if not state.active or per < 2 or x.shape[0] % per != 0 or not output.is_contiguous():
            return None
        # The reference rows keep the stock output (their pooled statistics are their own).
        target = output.clone() if torch.is_grad_enabled() else output
        return shared_group_norm(module, x, per, out=target)

    return hook


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
