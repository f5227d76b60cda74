"""Cross-style identity retrieval of generated images among real ones, in the content probe's
embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from consistent_diffusion.data.emoji import EmojiDataset
from consistent_diffusion.metrics.common import as_batch, cosine_matrix
from consistent_diffusion.metrics.extractors.probes import embed, load_probe


def top_k_identity_hits(query: torch.Tensor, query_identities: Sequence[str], query_styles: Sequence[str],
                        gallery: torch.Tensor, gallery_identities: Sequence[str], gallery_styles: Sequence[str],
                        k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(hit (Q,) bool, chance (Q,) float) of cross-style top-k identity retrieval.

    query (Q, D), gallery (G, D) embeddings, ranked by cosine similarity. Query q searches the
    gallery images whose style differs from its own; a hit when its identity is among the identities
    of the k nearest. chance = the probability that k images drawn at random without replacement from
    the same M searched images include one of the m images of q's identity:
    1 - prod_{j<k} (M - m - j) / (M - j).
    """
    sims = cosine_matrix(query.float(), gallery.float())
    g_ids, g_styles = np.asarray(gallery_identities), np.asarray(gallery_styles)
    hits, chance = np.zeros(len(query), dtype=bool), np.zeros(len(query))
    for q in range(len(query)):
        searched = np.flatnonzero(g_styles != query_styles[q])
        nearest = searched[torch.topk(sims[q, searched], min(k, len(searched))).indices.numpy()]
        hits[q] = query_identities[q] in set(g_ids[nearest].tolist())
        total, same = len(searched), int((g_ids[searched] == query_identities[q]).sum())
        chance[q] = 1 - np.prod([(total - same - j) / (total - j) for j in range(min(k, total))])
    return hits, chance


@torch.no_grad()
def embed_rows(model, images: np.ndarray, rows: np.ndarray, batch: int = 512) -> torch.Tensor:
    """Probe embeddings (len(rows), D) of uint8 dataset images, converted a batch at a time."""
    return torch.cat([embed(model, as_batch(images[rows[s:s + batch]])) for s in range(0, len(rows), batch)])


def identity_retrieval(generated: torch.Tensor, prompts: list[dict], dataset: EmojiDataset, probes_dir: Path | None,
                       k: int = 5) -> dict:
    """Top-k retrieval of each generated image's identity among real train-split images of every
    trained style but the prompt's, in the content probe's unit embedding (``top_k_identity_hits``).

    The gallery is the same for every model (all trained styles of the dataset), whatever styles
    the model is measured on. ``real_hit_rate``: the same retrieval with the real image of each
    prompt's identity and style as the query, what the probe can do at best (None where a prompt's
    real image is missing)."""
    model, _ = load_probe("content", probes_dir)
    rows = dataset.trainable("train")
    gallery = embed_rows(model, dataset.images, rows)
    identities = [dataset.records[i]["identity"] for i in rows]
    styles = [dataset.records[i]["style"] for i in rows]
    query_identities, query_styles = [p["identity"] for p in prompts], [p["style"] for p in prompts]
    hits, chance = top_k_identity_hits(embed(model, generated), query_identities, query_styles, gallery, identities,
                                       styles, k)
    position = {key: j for j, key in enumerate(zip(identities, styles, strict=True))}
    real = [position.get(key) for key in zip(query_identities, query_styles, strict=True)]
    real_hits = None
    if real and None not in real:
        real_hits = top_k_identity_hits(gallery[real], query_identities, query_styles, gallery, identities, styles,
                                        k)[0]
    per_style = {s: round(float(hits[[p["style"] == s for p in prompts]].mean()), 4)
                 for s in dict.fromkeys(query_styles)}
    return {"k": k, "hit_rate": round(float(hits.mean()), 4), "chance": round(float(chance.mean()), 5),
            "real_hit_rate": round(float(real_hits.mean()), 4) if real_hits is not None else None,
            "per_style": per_style, "queries": len(prompts), "gallery_images": len(rows)}
