"""The Frechet table: generated, untrained, real and unstyled images vs held-out real ones."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.metrics.frechet import frechet_distance
from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate, untrained_pipeline


def frechet_table(dataset, pipe, prompts, generated, real_held, sampling: Sampling, styles: Sequence[str]) -> dict:
    """FD (EfficientNet-Lite0 pooled features) vs held-out real images of ``styles``, of: the generated
    images; the untrained model's (same prompts and seeds); a train-split real sample of ``styles``
    as large as the generated set (so the three share the FD's sample-size bias); and the same
    identities and seeds prompted "<name>" without a style word. gap_closed = (untrained - trained)
    / (untrained - real); unstyled_ratio = FD(unstyled) / FD(styled)."""
    from consistent_diffusion.metrics.extractors import load_features

    features = load_features("efficientnet-lite0")
    held = features.embed(real_held)
    wanted = set(styles)
    train_rows = np.asarray([i for i in dataset.indices("train") if dataset.records[i]["style"] in wanted])
    sample = np.random.default_rng(1).choice(train_rows, size=min(len(generated), len(train_rows)), replace=False)
    real_train = features.embed(as_batch(dataset.images[np.sort(sample)]))
    untrained = generate(untrained_pipeline(pipe), prompts, sampling)
    unstyled = generate(pipe, [{**p, "prompt": p["name"]} for p in prompts], sampling)
    table = {
        "trained_vs_heldout": frechet_distance(features.embed(generated), held),
        "untrained_vs_heldout": frechet_distance(features.embed(untrained), held),
        "real_train_vs_heldout": frechet_distance(real_train, held),
        "unstyled_vs_heldout": frechet_distance(features.embed(unstyled), held),
    }
    gap = table["untrained_vs_heldout"] - table["real_train_vs_heldout"]
    table["gap_closed"] = (table["untrained_vs_heldout"] - table["trained_vs_heldout"]) / gap if gap > 0 else None
    table["unstyled_ratio"] = table["unstyled_vs_heldout"] / table["trained_vs_heldout"]
    table.update(heldout_images=len(real_held), generated_images=len(generated), real_train_images=len(sample))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in table.items()}
