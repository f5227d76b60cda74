"""Subject masks from cross-attention (ConsiStory, Tewel et al. 2024, section 3.1).

- ``subject_token_positions``: where the subject's tokens sit in each prompt as the text encoder sees
  it (special tokens counted: CLIP's BOS, BERT's [CLS] are position 0).
- ``subject_map``: one cross-attention layer's contribution, the softmax attention probabilities
  ``softmax(Q K^T / sqrt(d))`` over all text tokens (BOS included, as the reference does), averaged
  over heads and over the subject's tokens: (n, h*w) for the n rows asked for.
- ``otsu_threshold``: Otsu's threshold with 256 bins over the values' range (scikit-image's
  ``threshold_otsu``, which the reference calls).
- ``masks_from_maps``: the mean map over layers and the last ``window`` steps, bilinearly resized to
  each self-attention grid, then thresholded per image and per grid (``map > otsu``): (n, h*w) bool.
- ``keep_mask``: the paper's mask dropout (sec. 3.2, "self-attention dropout"): each patch of an
  anchor's subject mask is hidden from the other images with probability p, drawn afresh every step
  and per grid from a generator keyed by (seed, step, grid, anchor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from consistent_diffusion.core.errors import ConfigError


def tokenize_positions(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` padded/truncated as the pipelines encode it (``model_max_length``)."""
    return list(tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids)


def subject_token_positions(tokenizer: Any, prompts: Sequence[str], subject: str) -> list[list[int]]:
    """For each prompt, the positions of every occurrence of ``subject``'s tokens (a word or a
    phrase, matched as a contiguous run of token ids); [] where the prompt does not name it."""
    wanted = list(tokenizer(subject, add_special_tokens=False).input_ids)
    if not wanted:
        raise ConfigError(f"subject {subject!r} has no tokens for this tokenizer")
    positions = []
    for prompt in prompts:
        ids = tokenize_positions(tokenizer, prompt)
        found: list[int] = []
        for start in range(len(ids) - len(wanted) + 1):
            if ids[start : start + len(wanted)] == wanted:
                found.extend(range(start, start + len(wanted)))
        positions.append(found)
    return positions


def subject_map(probs: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """probs: (n, heads, hw, L) softmax cross-attention probabilities of n rows; positions: the
    subject tokens of each row. Returns (n, hw): the mean over heads and subject tokens (zeros for
    a row without subject tokens)."""
    mean_heads = probs.float().mean(dim=1)  # (n, hw, L)
    rows = []
    for row, tokens in zip(mean_heads, positions, strict=True):
        rows.append(row[:, list(tokens)].mean(dim=-1) if tokens else torch.zeros(row.shape[0], dtype=row.dtype, device=row.device))
    return torch.stack(rows)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape) as scikit-image computes it: a ``bins``-bin
    histogram over [min, max], the bin centre maximising the between-class variance
    w1 w2 (m1 - m2)^2. Constant input returns its value (so ``values > threshold`` is empty)."""
    flat = values.detach().double().flatten().cpu()
    low, high = float(flat.min()), float(flat.max())
    if not high > low:
        return low
    hist = torch.histc(flat, bins=bins, min=low, max=high)
    centres = low + (high - low) * (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight1 = hist.cumsum(0)
    weight2 = hist.flip(0).cumsum(0).flip(0)
    mean1 = (hist * centres).cumsum(0) / weight1.clamp_min(1e-12)
    mean2 = ((hist * centres).flip(0).cumsum(0) / weight2.flip(0).clamp_min(1e-12)).flip(0)
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(torch.argmax(variance))])


def masks_from_maps(maps: torch.Tensor, map_size: tuple[int, int], grids: Sequence[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """maps: (n, h*w) mean subject maps on the ``map_size`` (h, w) grid. For each grid (h', w'), the
    maps bilinearly resized to it (align_corners False, as the reference) and thresholded per row
    with Otsu: {grid: (n, h'*w') bool}. A row whose map is flat (no subject) gets an empty mask."""
    n = maps.shape[0]
    image = maps.float().reshape(n, 1, *map_size)
    masks = {}
    for grid in grids:
        resized = image if tuple(grid) == tuple(map_size) else F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
        flat = resized.reshape(n, -1)
        masks[tuple(grid)] = torch.stack([row > otsu_threshold(row) for row in flat])
    return masks


def keep_mask(mask: torch.Tensor, dropout: float, seed: int, step: int, grid: tuple[int, int], anchor: int) -> torch.Tensor:
    """mask: (h*w,) bool subject mask of one anchor. Each True patch stays visible to the other
    images with probability 1 - ``dropout`` (paper sec. 3.2), from a CPU generator keyed by
    (seed, step, grid, anchor), so an anchor's draws do not depend on the rest of the batch."""
    if dropout <= 0:
        return mask
    key = ((seed * 1_000_003 + step) * 1_009 + grid[0] * 131 + grid[1]) * 101 + anchor
    generator = torch.Generator().manual_seed(key)
    draws = torch.rand(mask.numel(), generator=generator)
    return mask & (draws >= dropout).to(mask.device).reshape(mask.shape)


def sampled_tokens(tokens: int, rate: float, seed: int, step: int, grid: tuple[int, int], anchor: int) -> torch.Tensor:
    """StoryDiffusion's token sampling: each of an anchor's ``tokens`` patches is shared with
    probability ``rate`` (sa32/sa64 in the reference), drawn afresh every step: (tokens,) bool."""
    return keep_mask(torch.ones(tokens, dtype=torch.bool), 1.0 - rate, seed, step, grid, anchor)
