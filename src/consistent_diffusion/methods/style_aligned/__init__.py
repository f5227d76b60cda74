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

The package:

- ``attention``: the math and the UNet hooks: ``calc_mean_std``/``adain`` (AdaIN),
  ``shared_attention``, ``shared_group_norm``, ``SharedAttentionProcessor`` and
  ``installed_sharing`` (processors + group-norm hooks, reversible).
- ``reference``: the reference row: ``prepend_reference`` (generated), ``use_real_reference``,
  ``reference_trajectory`` and ``cached_reference_inversion`` (real, pinned to its x_t).
- ``method``: the ``style_aligned`` method (``StyleAligned``), thin over the two.
"""

from consistent_diffusion.methods.style_aligned.attention import (
    SharedAttentionProcessor,
    SharingOptions,
    _switch_vector,
    adain,
    calc_mean_std,
    installed_sharing,
    shared_attention,
    shared_group_norm,
)
from consistent_diffusion.methods.style_aligned.method import StyleAligned
from consistent_diffusion.methods.style_aligned.reference import (
    cached_reference_inversion,
    prepend_reference,
    reference_trajectory,
    use_real_reference,
)

__all__ = [
    "SharedAttentionProcessor",
    "SharingOptions",
    "StyleAligned",
    "_switch_vector",
    "adain",
    "cached_reference_inversion",
    "calc_mean_std",
    "installed_sharing",
    "prepend_reference",
    "reference_trajectory",
    "shared_attention",
    "shared_group_norm",
    "use_real_reference",
]
