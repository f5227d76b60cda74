"""Style- and category-probe accuracy of generated images."""

from __future__ import annotations

from pathlib import Path

import torch

from consistent_diffusion.metrics.extractors.probes import load_probe, predict


def probe_scores(images: torch.Tensor, prompts: list[dict], probes_dir: Path | None) -> dict:
    """Style and category accuracy of generated images, per the shipped probes (argmax over all labels)."""
    style_probe, style_meta = load_probe("style", probes_dir)
    content_probe, content_meta = load_probe("content", probes_dir)
    style_pred = predict(style_probe, images).argmax(1)
    category_pred = predict(content_probe, images).argmax(1)
    style_true = torch.tensor([style_meta["labels"].index(p["style"]) for p in prompts])
    category_true = torch.tensor([content_meta["labels"].index(p["category"]) for p in prompts])
    per_style = {
        style: round(float((style_pred == style_true)[style_true == k].float().mean()), 4)
        for k, style in enumerate(style_meta["labels"]) if bool((style_true == k).any())
    }
    return {
        "style_accuracy": round(float((style_pred == style_true).float().mean()), 4),
        "style_accuracy_per_style": per_style,
        "style_chance": round(1 / len(style_meta["labels"]), 4),
        "category_accuracy": round(float((category_pred == category_true).float().mean()), 4),
        "category_chance": round(1 / len(content_meta["labels"]), 4),
        "probe_heldout_real": {"style": style_meta.get("val"), "content": content_meta.get("val")},
    }
