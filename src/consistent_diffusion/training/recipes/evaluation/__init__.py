"""Measure the embedded model's quality and write it into its model card.

Measures, on fixed prompt sets and seeds, every image generated through ``methods.run`` with the
model's own sampling settings (steps, guidance chosen on a separate tuning set, ``guidance_rescale``
0.7 for a zero-terminal-SNR scheduler):
- VAE reconstruction PSNR on held-out real images (val + holdout identities, never trained on);
- style-probe and category-probe accuracy on images generated with "<name>, <style> style" prompts
  (at least ``MIN_PROMPT_IMAGES`` images, categories balanced);
- identity retrieval: top-k hit rate of those images among real train-split images of the other
  trained styles, in the content probe's embedding, with its exact chance rate;
- colour binding: "<colour> heart, <style> style" for eight colours, judged by ``dominant_colour``
  (validated on the real hearts first), with a Wilson 95% interval;
- how much of the output's mean colour the starting noise's channel means explain (R^2, Lin et al.
  2024 sec. 3: with a non-zero terminal SNR the noise, not the prompt, picks the colour);
- Frechet distance (``metrics.frechet``) in EfficientNet-Lite0 ImageNet features: generated vs
  held-out real, untrained model (random init, same architecture), real (train) vs held-out real,
  and prompts without a style word vs with one;
- CPU time for 8 images at 30 steps.

A model is measured on ``styles``: by default the dataset's trained styles its style probe can
label (``measured_styles``). A model trained on fewer styles (the first embedded model knew only
google and twitter) is measured on the styles it was trained on, given explicitly: prompts in a
style a model never saw would measure the prompt set, not the model.

``evaluate(EvalConfig(...))`` returns the results dict; ``quality_markdown`` renders its table (old
model beside new when a baseline results dict is given); ``comparison_sheet`` draws 24 fixed prompts
for one or more models side by side; ``write_model_card`` writes the weights folder's
MODEL_CARD.md. ``scripts/eval_embedded.py`` is the command line.

The package, one job a module (lower modules never import this one): ``prompts`` (prompt sets,
held-out rows, measured styles), ``sampling`` (settings, generation, starting noise, timing),
``probe_accuracy`` (probe accuracy), ``retrieval`` (identity retrieval), ``guidance`` (guidance tuning),
``stats`` (Wilson interval, R^2), ``colour`` (colour classifier, colour binding, noise -> colour),
``frechet`` (the Frechet table), ``report`` (the quality table), ``sheet`` (the comparison sheet),
``card`` (the model card), ``run`` (``EvalConfig`` and ``evaluate``). Every name is re-exported here.
"""

from __future__ import annotations

from consistent_diffusion.training.recipes.evaluation.card import write_model_card
from consistent_diffusion.training.recipes.evaluation.colour import (
    BACKGROUND_C,
    BACKGROUND_L,
    BLACK_L,
    BROWN_C,
    BROWN_HUE,
    BROWN_L,
    GREY_L,
    HUE_BINS,
    NEUTRAL_C,
    colour_binding,
    dominant_colour,
    heart_rows,
    noise_colour_r2,
    pixel_colours,
    srgb_to_lab,
    validate_colour_classifier,
)
from consistent_diffusion.training.recipes.evaluation.frechet import frechet_table
from consistent_diffusion.training.recipes.evaluation.guidance import choose_guidance
from consistent_diffusion.training.recipes.evaluation.probe_accuracy import probe_scores
from consistent_diffusion.training.recipes.evaluation.prompts import (
    COLOUR_SEED_OFFSET,
    COLOURS,
    MEASURE_SEED_OFFSET,
    MIN_PROMPT_IMAGES,
    NOISE_PROMPT_STYLE,
    NOISE_SEED_OFFSET,
    SHEET_PROMPTS,
    TUNING_SEED_OFFSET,
    colour_prompts,
    default_per_category,
    eligible_identities,
    heldout_rows,
    measured_styles,
    noise_prompt,
    prompt_set,
    sheet_prompts,
)
from consistent_diffusion.training.recipes.evaluation.report import (
    QUALITY_ROWS,
    quality_markdown,
    quality_rows,
)
from consistent_diffusion.training.recipes.evaluation.retrieval import (
    embed_rows,
    identity_retrieval,
    top_k_identity_hits,
)
from consistent_diffusion.training.recipes.evaluation.run import EvalConfig, evaluate
from consistent_diffusion.training.recipes.evaluation.sampling import (
    Sampling,
    generate,
    sampling_of,
    starting_noise,
    time_generation,
    untrained_pipeline,
)
from consistent_diffusion.training.recipes.evaluation.sheet import comparison_sheet
from consistent_diffusion.training.recipes.evaluation.stats import r_squared, wilson_interval

__all__ = [
    "BACKGROUND_C", "BACKGROUND_L", "BLACK_L", "BROWN_C", "BROWN_HUE", "BROWN_L", "COLOURS", "COLOUR_SEED_OFFSET",
    "GREY_L", "HUE_BINS", "MEASURE_SEED_OFFSET", "MIN_PROMPT_IMAGES", "NEUTRAL_C", "NOISE_PROMPT_STYLE",
    "NOISE_SEED_OFFSET", "QUALITY_ROWS", "SHEET_PROMPTS", "TUNING_SEED_OFFSET", "EvalConfig", "Sampling",
    "choose_guidance", "colour_binding", "colour_prompts", "comparison_sheet", "default_per_category",
    "dominant_colour", "eligible_identities", "embed_rows", "evaluate", "frechet_table", "generate", "heart_rows",
    "heldout_rows", "identity_retrieval", "measured_styles", "noise_colour_r2", "noise_prompt", "pixel_colours",
    "probe_scores", "prompt_set", "quality_markdown", "quality_rows", "r_squared", "sampling_of", "sheet_prompts",
    "srgb_to_lab", "starting_noise", "time_generation", "top_k_identity_hits", "untrained_pipeline",
    "validate_colour_classifier", "write_model_card", "wilson_interval",
]
