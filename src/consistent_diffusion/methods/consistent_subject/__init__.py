"""Consistent subject, training-free: ConsiStory (Tewel et al., SIGGRAPH 2024) and StoryDiffusion's
consistent self-attention (Zhou et al. 2024), as attention processors on any SD 1.x/2.x, SDXL or the
embedded model (the reference code ships a modified SDXL UNet; nothing here is copied from a UNet).

Per call (paper sections in brackets):

1. Subject masks [3.1]: the cross-attention probabilities of the subject's prompt tokens, averaged
   over heads, the layers of one resolution and the last 20 steps, Otsu-thresholded per image at
   every shared grid (``masks``). The mask made from steps < t is used at step t; step 0 is plain.
2. Subject-driven self-attention [3.2]: in the up blocks' self-attention every image also attends
   to the anchors' keys/values inside their subject masks, each mask patch dropped with p = 0.5 per
   step to keep layouts varied (``attention``). Anchors see each other; other images see only the
   anchors: linear in the batch.
3. Vanilla queries [3.3]: over the first tenth of the steps the shared layers' queries are blended
   with those of a plain pass at the same step (weight 0.9 falling by 0.8 / steps per step).

``mode="story"``: StoryDiffusion's cheaper variant, the anchors' tokens shared by random sampling
(rate 0.5 per step) instead of masks; no cross-attention is recorded and no vanilla pass runs.

Anchors: the series' first images (kept in every batch, ``ConsistentSubject.for_series``) and/or a
real image brought in through edit-friendly DDPM inversion, pinned to its trajectory as row 0 (as
StyleAligned's real reference; ``style_aligned.reference``).

4. Feature injection [3.4], optional (``feature_injection``; the reference turns it on, here it is
   opt-in because it doubles the cost): a first pass gives final masks and DIFT features; in the
   second, over steps [steps/10, steps/3], each image's subject pixels at half the latent size take
   0.8 of their nearest anchor pixel's self-attention output (``injection``).

Not implemented: the reference's cached-anchor mode (extra images generated one at a time against
stored anchor features); here anchors are regenerated in each batch of a series, deterministically,
so every batch sees the same anchors.

- ``masks``: subject token positions, subject maps, Otsu, mask dropout, StoryDiffusion sampling.
- ``attention``: ``SubjectState``, the processors, the step hook, ``installed_subject_sharing``.
- ``injection``: DIFT capture, correspondences, the injection hooks.
- ``method``: the ``consistent_subject`` method (``ConsistentSubject``).
"""

from consistent_diffusion.methods.consistent_subject.attention import (
    SubjectAttentionProcessor,
    SubjectMapRecorder,
    SubjectState,
    extended_attention,
    installed_subject_sharing,
)
from consistent_diffusion.methods.consistent_subject.masks import (
    keep_mask,
    masks_from_maps,
    otsu_threshold,
    subject_map,
    subject_token_positions,
)
from consistent_diffusion.methods.consistent_subject.method import ConsistentSubject

__all__ = [
    "ConsistentSubject",
    "SubjectAttentionProcessor",
    "SubjectMapRecorder",
    "SubjectState",
    "extended_attention",
    "installed_subject_sharing",
    "keep_mask",
    "masks_from_maps",
    "otsu_threshold",
    "subject_map",
    "subject_token_positions",
]
