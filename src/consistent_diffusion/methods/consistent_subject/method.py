"""The ``consistent_subject`` method: the options and how they apply to one pipeline call.

``ConsistentSubject.applied`` puts the anchors in the batch (the series' first images, prepended as
internal rows when the batch does not hold them; a real reference pinned to its inverted trajectory
as row 0) and installs the hooks of ``attention`` for the call; both are undone on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, Method, call_arguments, register
from consistent_diffusion.methods.common import UNET_PARTS, batch_size, generation_size, restoring
from consistent_diffusion.methods.consistent_subject.attention import (
    SubjectState,
    choose_map_level,
    installed_subject_sharing,
)
from consistent_diffusion.methods.consistent_subject.injection import (
    InjectionPlan,
    captured_dift,
    installed_injection,
    plan_injection,
)
from consistent_diffusion.methods.consistent_subject.masks import subject_token_positions
from consistent_diffusion.methods.inversion import Inversion, inversion_reference
from consistent_diffusion.methods.style_aligned.reference import (
    _seeded,
    cached_reference_inversion,
    prepend_reference,
    use_real_reference,
)

MODES = ("subject", "story")
DEFAULT_ANCHORS = 2  # the reference's n_achors


@register("consistent_subject")
@dataclass(frozen=True)
class ConsistentSubject(Method):
    """Training-free consistent subject (ConsiStory's subject-driven shared self-attention, or
    StoryDiffusion's sampled variant). Defaults follow NVlabs/consistory.

    The subject is named by ``subject`` (a word or phrase of the prompts, e.g. "giraffe") or by
    ``subject_tokens`` (token positions, counting the start token, the same in every prompt).
    Anchors are the images the others copy the subject from: the series' first ``anchors`` images
    (default 2) and/or a real image (``reference_image`` with a ``reference_image_prompt`` naming the
    subject, or ``reference_inversion``), inverted with edit-friendly DDPM inversion and pinned to
    its trajectory as StyleAligned's real reference is; with a real reference ``anchors`` defaults
    to 0 (the reference alone). Stack it before ``style_aligned`` (whose reference must stay row 0).
    """

    subject: str | None = None  # a word/phrase of the prompts naming the subject ("giraffe")
    subject_tokens: tuple[int, ...] | None = None  # or its token positions (start token = 0)
    anchors: int | None = None  # generated anchors: the series' first images (None: 2, or 0 with a real reference)
    mode: str = "subject"  # subject: ConsiStory's masked sharing | story: StoryDiffusion's sampled tokens
    mask_dropout: float = 0.5  # share of an anchor's subject patches hidden each step (paper: 0.5), in [0, 1)
    sample_rate: float = 0.5  # story mode: share of an anchor's tokens shared each step (sa32/sa64), in (0, 1]
    share_parts: tuple[str, ...] = ("up",)  # UNet parts whose self-attention is shared (reference: up)
    vanilla_queries: bool = True  # blend vanilla queries over the first tenth of the steps (paper sec. 3.3)
    mask_window: int = 20  # steps whose cross-attention maps are averaged into the masks (reference: 20)
    mask_level: int | None = None  # down-sampling level of the cross-attention maps (None: auto, see attention)
    seed: int = 0  # seeds the mask dropout / token sampling
    share: bool = True  # False: anchors and hooks in place, nothing shared (a control; stock output)
    feature_injection: bool = False  # ConsiStory's DIFT feature injection (a first full pass: ~2x the cost)
    injection_alpha: float = 0.8  # weight of the anchor's feature in an injected pixel (reference: 0.8), in [0, 1]
    reference_image: str | None = None  # a real image of the subject (inverted with DDPM inversion)
    reference_image_prompt: str = ""  # its description, naming the subject (used to invert it and for its mask)
    reference_inversion: Any = None  # an Inversion (or its folder) of the real subject image
    inversion_cfg: float | None = None  # guidance of the reference's inversion (default: the batch's)
    reference_seed: int = 0  # seeds the reference's redrawn trajectory
    _anchor_items: tuple = field(default=(), repr=False, compare=False, hash=False)  # set by for_series
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)
    _sampling: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.subject is not None and (not isinstance(self.subject, str) or not self.subject.strip()):
            raise ConfigError(f"subject must be a word or phrase of the prompts, got {self.subject!r}")
        if self.subject_tokens is not None:
            tokens = tuple(self.subject_tokens)
            if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
                raise ConfigError(f"subject_tokens must be token positions (integers >= 0), got {self.subject_tokens!r}")
            object.__setattr__(self, "subject_tokens", tokens)
        if self.mode == "subject" and (self.subject is None) == (self.subject_tokens is None):
            raise ConfigError("consistent_subject needs exactly one of subject (a word of the prompts, e.g. 'cat') "
                              "or subject_tokens (token positions)")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.anchors is not None and (isinstance(self.anchors, bool) or not isinstance(self.anchors, int) or self.anchors < 0):
            raise ConfigError(f"anchors must be an integer >= 0 (or unset), got {self.anchors!r}")
        if not _number(self.mask_dropout) or not 0 <= self.mask_dropout < 1:
            raise ConfigError(f"mask_dropout must be a number in [0, 1), got {self.mask_dropout!r}")
        if not _number(self.sample_rate) or not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be a number in (0, 1], got {self.sample_rate!r}")
        parts = tuple(self.share_parts)
        if not parts or any(p not in UNET_PARTS for p in parts):
            raise ConfigError(f"share_parts must name some of {', '.join(UNET_PARTS)}, got {self.share_parts!r}")
        object.__setattr__(self, "share_parts", parts)
        for name in ("mask_window",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("mask_level", "seed", "reference_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not _number(self.injection_alpha) or not 0 <= self.injection_alpha <= 1:
            raise ConfigError(f"injection_alpha must be a number in [0, 1], got {self.injection_alpha!r}")
        if self.feature_injection and self.mode != "subject":
            raise ConfigError("feature_injection needs subject masks: use mode='subject'")
        for name in ("vanilla_queries", "share", "feature_injection"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.reference_image is not None and self.reference_inversion is not None:
            raise ConfigError("give at most one real subject reference: reference_image or reference_inversion")
        if self.reference_image is not None:
            from consistent_diffusion.core.images import load_image

            load_image(self.reference_image)  # fail early on a missing or corrupt file
            if self.subject is not None and self.subject.lower() not in self.reference_image_prompt.lower():
                raise ConfigError(f"reference_image_prompt must name the subject {self.subject!r} (its mask comes from "
                                  f"that word's cross-attention), got {self.reference_image_prompt!r}")
        if self.inversion_cfg is not None and (not _number(self.inversion_cfg) or self.inversion_cfg < 0):
            raise ConfigError(f"inversion_cfg must be a number >= 0, got {self.inversion_cfg!r}")
        if isinstance(self.reference_inversion, (str, os.PathLike)):
            object.__setattr__(self, "reference_inversion", Inversion.load(self.reference_inversion))

    # -- description and series ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Options that re-create the method (``get_method("consistent_subject", **options)``)."""
        options = {name: getattr(self, name) for name in self.__dataclass_fields__
                   if not name.startswith("_") and name != "reference_inversion"}
        options["share_parts"] = list(self.share_parts)
        if self.subject_tokens is not None:
            options["subject_tokens"] = list(self.subject_tokens)
        if self.reference_image is not None:
            options["reference_image"] = os.path.abspath(self.reference_image)
        if self.reference_inversion is not None:
            options["reference_inversion"] = inversion_reference(self.reference_inversion)
        described: dict[str, Any] = {"name": self.name, "options": options}
        if self._sampling:
            described["sampling"] = dict(self._sampling)
        return described

    @property
    def has_real_reference(self) -> bool:
        return self.reference_image is not None or self.reference_inversion is not None

    @property
    def generated_anchors(self) -> int:
        """How many of the series' first images are anchors."""
        if self.anchors is not None:
            return self.anchors
        return 0 if self.has_real_reference else DEFAULT_ANCHORS

    def for_series(self, items: Sequence[tuple[int, str, int]], batch_size: int) -> ConsistentSubject:
        """The same anchors in every batch: when the series spans several batches, its first
        ``generated_anchors`` images (prompt, seed) become internal rows of the batches that do
        not start with them."""
        count = self.generated_anchors
        if count == 0 or len(items) <= batch_size:
            return self
        anchors = tuple((prompt, int(seed)) for _, prompt, seed in items[:count])
        return replace(self, _anchor_items=anchors, _cache={}, _sampling={})

    # -- one call -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        with restoring(ctx):
            _check_not_under_style_aligned(ctx.pipe.unet)
            if int(ctx.call_kwargs.get("num_images_per_prompt") or 1) != 1:
                raise ConfigError("consistent_subject needs num_images_per_prompt=1 (give one prompt per image)")
            generated = self._place_generated_anchors(ctx)
            inversion = self._reference_inversion(ctx)
            stack: Any = contextlib.nullcontext()
            if inversion is not None:
                stack = use_real_reference(ctx, inversion, self.reference_seed, self._sampling)
            real = 1 if inversion is not None else 0
            anchors = list(range(real)) + [real + i for i in range(generated)]
            with stack:
                plan = self._first_pass(ctx, anchors) if self.feature_injection and self.share else None
                state = self._state(ctx, anchors)
                injecting = installed_injection(ctx.pipe.unet, state, plan) if plan else contextlib.nullcontext()
                with installed_subject_sharing(ctx.pipe.unet, state, self.share_parts), injecting:
                    yield ctx

    def _first_pass(self, ctx: GenerationContext, anchors: list[int]) -> InjectionPlan | None:
        """Feature injection's first pass (sec. 3.4): the whole call with shared attention only, to
        get the final subject masks and the DIFT features; the generators are rewound after it, so
        the second pass starts from the same noise. None when there is nothing to inject."""
        state = self._state(ctx, anchors)
        saved = [generator.get_state() for generator in ctx.generators]
        captured: dict[str, Any] = {}
        unet = ctx.pipe.unet
        with installed_subject_sharing(unet, state, self.share_parts), captured_dift(unet, state, captured), \
                call_arguments(ctx.pipe, ctx.call_kwargs) as call_kwargs:
            ctx.pipe(prompt=ctx.prompts, negative_prompt=ctx.negative_prompts, generator=ctx.generators,
                     output_type="latent", **call_kwargs)
        for generator, rng in zip(ctx.generators, saved, strict=True):
            generator.set_state(rng)
        if "features" not in captured or not anchors:
            return None
        plan = plan_injection(state, captured["features"], state.steps)
        plan.alpha = float(self.injection_alpha)
        return plan

    def _place_generated_anchors(self, ctx: GenerationContext) -> int:
        """Make the batch start with the generated anchors (prepending them as internal rows when a
        later batch of the series lacks them); returns how many anchors there are."""
        count = self.generated_anchors
        if not self._anchor_items:
            return min(count, len(ctx.prompts))
        present = [(p, int(g.initial_seed())) for p, g in zip(ctx.prompts, ctx.generators, strict=False)][:count]
        if present != list(self._anchor_items):
            for prompt, seed in reversed(self._anchor_items):
                prepend_reference(ctx, prompt, _seeded(seed))
        return len(self._anchor_items)

    def _state(self, ctx: GenerationContext, anchors: list[int]) -> SubjectState:
        pipe = ctx.pipe
        rows = batch_size(ctx)
        positions = self._positions(pipe, ctx.prompts)
        if self.mode == "subject" and anchors and not any(positions[a] for a in anchors):
            raise ConfigError(f"no anchor prompt names the subject {self.subject or self.subject_tokens!r}: "
                              f"{[ctx.prompts[a] for a in anchors]}")
        guidance = float(ctx.call_kwargs.get("guidance_scale", 7.5))
        cfg = guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        width, height = generation_size(ctx)
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        latent = (height // factor, width // factor)
        steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
        level = self.mask_level if self.mask_level is not None else choose_map_level(pipe.unet, latent)
        return SubjectState(
            n=rows, groups=2 if cfg else 1, anchors=anchors, positions=positions, steps=steps, mode=self.mode,
            share=self.share, dropout=float(self.mask_dropout), sample_rate=float(self.sample_rate), seed=self.seed,
            window=self.mask_window, blend_steps=steps // 10 if self.vanilla_queries and self.mode == "subject" else 0,
            map_level=level, latent_size=latent,
            train_timesteps=int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000)),
        )

    def _positions(self, pipe: Any, prompts: Sequence[str]) -> list[list[int]]:
        if self.mode == "story":
            return [[] for _ in prompts]
        if self.subject_tokens is not None:
            return [list(self.subject_tokens) for _ in prompts]
        return subject_token_positions(pipe.tokenizer, prompts, self.subject)

    def _reference_inversion(self, ctx: GenerationContext) -> Any:
        if self.reference_inversion is not None:
            return self.reference_inversion
        if self.reference_image is None:
            return None
        return cached_reference_inversion(ctx, self.reference_image, self.reference_image_prompt, self.inversion_cfg,
                                          self.reference_seed, self._cache)


def _check_not_under_style_aligned(unet: Any) -> None:
    """ConfigError when StyleAligned's processors are already installed: its reference must stay row 0
    and its processor must be the outer one (it takes this method's anchors in, ``extra_keys``)."""
    from consistent_diffusion.methods.style_aligned.attention import SharedAttentionProcessor

    if any(isinstance(p, SharedAttentionProcessor) for p in unet.attn_processors.values()):
        raise ConfigError("stack consistent_subject before style_aligned (methods apply in order; StyleAligned's "
                          "reference must stay the first row and its attention takes the subject anchors in)")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and torch.isfinite(torch.tensor(float(value)))
