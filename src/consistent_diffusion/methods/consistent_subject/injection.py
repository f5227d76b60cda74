"""ConsiStory's feature injection (Tewel et al. 2024, sec. 3.4), as UNet forward hooks.

A first full pass (SDSA only) gives each image's final subject mask (no dropout) and its DIFT
features (Tang et al. 2023): the output of the first up block that reaches half the latent size,
at the step whose timestep is nearest 261 of 1000 (the reference's), conditional half, smoothed
with a 3x3 Gaussian (sigma 1). Each target pixel is matched to its nearest pixel (cosine distance)
inside the subject mask of the anchors it sees (``correspondences``); the best anchor per pixel
wins. In the second pass, over steps [steps // 10, steps // 3], the self-attention outputs (after
``to_out``) of the layers at that grid, in down and up blocks, are blended at the target's subject
pixels whose distance is below the Otsu threshold of its distances:
``x_i <- alpha x_nn + (1 - alpha) x_i`` with alpha 0.8, conditional half only.

As the reference, the images are updated in place one after another: an image reads features
already injected into an earlier one (anchor 1 reads anchor 0's injected pixels; the other images
read the injected anchors). Anchors come first, so they still do not depend on the rest of the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from consistent_diffusion.methods.common import unet_part
from consistent_diffusion.methods.consistent_subject.masks import otsu_threshold

DIFT_TIMESTEP_FRACTION = 0.261  # the reference takes DIFT features at t = 261 of 1000
INJECTION_ALPHA = 0.8


def gaussian_smooth(features: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """(n, C, h, w) -> the same, each channel convolved with a normalised 3x3 Gaussian (zero padding)."""
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(features)
    channels = features.shape[1]
    return F.conv2d(features, kernel.expand(channels, 1, 3, 3), padding=1, groups=channels)


def up_block_output_levels(unet: Any) -> list[int]:
    """Down-sampling level of each up block's output (its upsampler lowers the level by one)."""
    count = len(unet.up_blocks)
    return [count - 1 - i - (1 if block.upsamplers is not None else 0) for i, block in enumerate(unet.up_blocks)]


def dift_block(unet: Any) -> int:
    """The first up block whose output is at half the latent size or finer (SDXL: up_blocks.0,
    the reference's; SD 1.x/2.x: up_blocks.1)."""
    levels = up_block_output_levels(unet)
    return next((i for i, level in enumerate(levels) if level <= 1), len(levels) - 1)


@dataclass
class Correspondences:
    """Per target row: (hw,) best source row, source pixel, and whether the pixel is injected."""

    source_row: dict[int, torch.Tensor] = field(default_factory=dict)
    source_pixel: dict[int, torch.Tensor] = field(default_factory=dict)
    apply: dict[int, torch.Tensor] = field(default_factory=dict)


def correspondences(features: torch.Tensor, masks: torch.Tensor, anchors: Sequence[int]) -> Correspondences:
    """Nearest neighbours from every row to the anchors it sees (the reference's ``cyclic_nn_map``,
    which checks no cycle, + ``inject_outputs``' choice).

    features: (n, C, h, w) smoothed DIFT features at the injection grid; masks: (n, h*w) bool subject
    masks there. For row i and each anchor a != i, the cosine distance of every pixel of i to the
    pixels of a inside a's mask (others: 2); per pixel the anchor with the smallest distance wins. A
    pixel is injected when it is in i's mask and its distance is below the Otsu threshold of all of
    i's best distances."""
    n = features.shape[0]
    flat = F.normalize(features.flatten(2).transpose(1, 2).float(), dim=-1)  # (n, hw, C)
    found = Correspondences()
    for i in range(n):
        sources = [a for a in anchors if a != i]
        if not sources:
            continue
        distances, pixels = [], []
        for a in sources:
            distance = 1 - flat[i] @ flat[a].T  # (hw target, hw source)
            distance[:, ~masks[a].to(distance.device)] = 2.0
            best, where = distance.min(dim=1)
            distances.append(best)
            pixels.append(where)
        stacked = torch.stack(distances)  # (sources, hw)
        best, which = stacked.min(dim=0)
        rows = torch.tensor(sources, device=which.device)[which]
        pixel = torch.stack(pixels).gather(0, which.unsqueeze(0)).squeeze(0)
        found.source_row[i] = rows
        found.source_pixel[i] = pixel
        found.apply[i] = masks[i].to(best.device) & (best < otsu_threshold(best))
    return found


@dataclass
class InjectionPlan:
    """What the second pass injects: correspondences at ``grid``, over steps [first, last]."""

    found: Correspondences
    grid: tuple[int, int]
    first: int
    last: int
    alpha: float = INJECTION_ALPHA


def _injection_hook(state: Any, plan: InjectionPlan) -> Any:
    """Forward hook on a self-attention module: blend its output at the planned pixels (cond half)."""

    def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if state.in_vanilla_pass or not plan.first <= state.step <= plan.last or output.ndim != 3:
            return None
        batch, tokens, channels = output.shape
        if tokens != plan.grid[0] * plan.grid[1] or batch % state.groups or batch // state.groups < state.n:
            return None
        start = batch - state.n  # this method's rows of the conditional half
        blended = output.clone()
        mine = blended[start:]  # rows in order, each reading the rows injected before it (as the reference)
        for i, apply in sorted(plan.found.apply.items()):
            if not bool(apply.any()):
                continue
            source = mine[plan.found.source_row[i].to(output.device), plan.found.source_pixel[i].to(output.device)]
            where = apply.to(output.device)
            mine[i][where] = plan.alpha * source[where] + (1 - plan.alpha) * mine[i][where]
        return blended

    return hook


@contextlib.contextmanager
def installed_injection(unet: Any, state: Any, plan: InjectionPlan, parts: Sequence[str] = ("down", "up")) -> Iterator[None]:
    """Hooks on the self-attention modules of ``parts`` (reference: down and up); removed on exit."""
    handles = []
    try:
        for name, module in unet.named_modules():
            if name.endswith("attn1") and unet_part(name) in parts:
                handles.append(module.register_forward_hook(_injection_hook(state, plan)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def captured_dift(unet: Any, state: Any, out: dict) -> Iterator[None]:
    """Keep in ``out["features"]`` the DIFT block's output (this method's conditional rows, (n, C, h, w),
    smoothed) at the step whose timestep is nearest 26.1% of the training schedule."""
    block = unet.up_blocks[dift_block(unet)]
    target = DIFT_TIMESTEP_FRACTION * int(unet_training_timesteps(state))

    def hook(module: Any, args: tuple, output: Any) -> None:
        if state.in_vanilla_pass or state.timestep is None:
            return
        distance = abs(float(state.timestep) - target)
        if distance >= out.get("distance", math.inf):
            return
        sample = output[0] if isinstance(output, tuple) else output
        out["features"] = gaussian_smooth(sample[sample.shape[0] - state.n :].detach().float())
        out["distance"], out["step"] = distance, state.step

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def unet_training_timesteps(state: Any) -> int:
    """The schedule's length the timesteps count in (1000 for every SD-family model)."""
    return int(getattr(state, "train_timesteps", 1000) or 1000)


def injection_grid(state: Any) -> tuple[int, int]:
    """The self-attention grid nearest half the latent size (the reference's 64x64 on SDXL at 1024)."""
    levels = sorted(state.attention_levels) or [1]
    level = min(levels, key=lambda lv: (abs(lv - 1), lv))
    return state.grid(level)


def plan_injection(state: Any, features: torch.Tensor, steps: int) -> InjectionPlan:
    """From the first pass' ``state`` and DIFT ``features`` (n, C, h, w): the features resized to the
    injection grid, its final masks, the correspondences and the step range [steps // 10, steps // 3]."""
    grid = injection_grid(state)
    resized = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
    found = correspondences(resized, state.final_masks([grid])[grid], state.anchors)
    return InjectionPlan(found=found, grid=grid, first=steps // 10, last=max(steps // 10, steps // 3))
