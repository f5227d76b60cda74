"""The guidance scale chosen on a separate tuning prompt set."""

from __future__ import annotations

from collections.abc import Sequence

from consistent_diffusion.data.emoji import EmojiDataset
from consistent_diffusion.training.recipes.evaluation.probe_accuracy import probe_scores
from consistent_diffusion.training.recipes.evaluation.prompts import TUNING_SEED_OFFSET, prompt_set
from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate


def choose_guidance(pipe, dataset: EmojiDataset, candidates: list[float], sampling: Sampling, probes_dir,
                    styles: Sequence[str], per_category: int = 2) -> dict:
    """Pick the guidance scale maximising style + category accuracy on a *tuning* prompt set.

    The tuning set takes other identities (the tail of each category's permutation, see
    ``prompt_set``) and other noise seeds (TUNING_SEED_OFFSET+) than the measured set, so the
    reported numbers are not tuned on.
    """
    prompts = prompt_set(dataset, per_category, styles, seed_offset=TUNING_SEED_OFFSET, tuning=True)
    sweep = {}
    for guidance in candidates:
        images = generate(pipe, prompts, Sampling(sampling.steps, guidance, sampling.guidance_rescale))
        scores = probe_scores(images, prompts, probes_dir)
        sweep[str(guidance)] = {k: scores[k] for k in ("style_accuracy", "category_accuracy")}
    best = max(candidates, key=lambda g: sweep[str(g)]["style_accuracy"] + sweep[str(g)]["category_accuracy"])
    return {"images_per_setting": len(prompts), "sweep": sweep, "chosen": best}
