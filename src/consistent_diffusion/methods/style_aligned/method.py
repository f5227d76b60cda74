"""The ``style_aligned`` method: the ``StyleAligned`` options and how they apply to one pipeline call.

``StyleAligned.applied`` puts the reference in row 0 of the batch (``reference``: prepended,
generated or real) and installs the sharing hooks on the UNet (``attention``) for the call; both are
undone on exit. Tensor layouts are those of ``attention`` ((groups, per, tokens, channels), row 0
the reference) and ``reference`` (latents (B, C, h, w), the reference first).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import UNET_PARTS, batch_size, restoring
from consistent_diffusion.methods.inversion import Inversion, inversion_reference
from consistent_diffusion.methods.style_aligned.attention import _SharingState, installed_sharing
from consistent_diffusion.methods.style_aligned.reference import (
    _seeded,
    cached_reference_inversion,
    prepend_reference,
    use_real_reference,
)


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
    min_shared_tokens: int = 0  # self-attention layers with fewer spatial tokens (h * w) stay unshared (0: all share)
    share_parts: tuple[str, ...] = UNET_PARTS  # UNet parts whose self-attention shares (paper: all; group norms: all)
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
        if not isinstance(self.min_shared_tokens, int) or isinstance(self.min_shared_tokens, bool) \
                or self.min_shared_tokens < 0:
            raise ConfigError(f"min_shared_tokens must be an integer >= 0, got {self.min_shared_tokens!r}")
        parts = tuple(self.share_parts) if isinstance(self.share_parts, (list, tuple)) else ()
        if not parts or any(part not in UNET_PARTS for part in parts):
            raise ConfigError(f"share_parts must name some of {', '.join(UNET_PARTS)}, got {self.share_parts!r}")
        object.__setattr__(self, "share_parts", parts)
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
        options["share_parts"] = list(self.share_parts)
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

    def installed(self, unet: Any, per_group: int) -> contextlib.AbstractContextManager[_SharingState]:
        """Install the shared-attention processors (and group-norm hooks) on ``unet`` for batches
        of ``per_group`` images per CFG half (``attention.installed_sharing``).

        Restores the previous processors and removes the hooks on exit, even on error. Layers
        whose processor was replaced by someone else meanwhile are left as they are (warning).
        """
        return installed_sharing(unet, self, per_group)

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        with restoring(ctx):
            inversion = self._reference_inversion(ctx)
            if inversion is not None:
                stack = use_real_reference(ctx, inversion, self.reference_seed, self._sampling)
            else:
                stack = contextlib.nullcontext()
                if self.reference_prompt is not None:
                    prepend_reference(ctx, self.reference_prompt, _seeded(self.reference_seed))
            per_group = batch_size(ctx)
            with stack, self.installed(ctx.pipe.unet, per_group):
                yield ctx

    def _reference_inversion(self, ctx: GenerationContext) -> Any:
        """The real reference's ``Inversion`` for this call, or None for a generated reference."""
        if self.reference_inversion is not None:
            return self.reference_inversion
        if self.reference_image is None:
            return None
        return cached_reference_inversion(
            ctx, self.reference_image, self.reference_image_prompt, self.inversion_cfg, self.reference_seed, self._cache
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
