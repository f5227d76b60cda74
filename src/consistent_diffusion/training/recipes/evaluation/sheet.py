"""The comparison contact sheet: fixed prompts for one or more models side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consistent_diffusion.core.images import tensor_to_pil
from consistent_diffusion.training.recipes.evaluation.prompts import SHEET_PROMPTS, sheet_prompts
from consistent_diffusion.training.recipes.evaluation.sampling import Sampling, generate


def comparison_sheet(models: Sequence[tuple[str, Any, Sampling]], prompts: Sequence[str] = SHEET_PROMPTS,
                     seeds: int = 4, scale: int = 2):
    """A labelled PIL image: one row per prompt, ``seeds`` images (seeds 0..seeds-1) per model, the
    models' blocks side by side (each with its own sampling settings), names in a header row."""
    from PIL import Image, ImageDraw

    items = sheet_prompts(prompts, seeds)
    blocks = [tensor_to_pil(generate(pipe, items, sampling)) for _, pipe, sampling in models]
    titles = [(name, f"guidance {sampling.guidance:g}, rescale {sampling.guidance_rescale:g}, {sampling.steps} steps")
              for name, _, sampling in models]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = blocks[0][0].width * scale
    label_width, gap, header, pad = 260, 12, 28, 2
    block_width = max([seeds * (cell + pad)] + [int(measure.textlength(t)) + pad for pair in titles for t in pair])
    sheet = Image.new("RGB", (label_width + len(models) * (block_width + gap), header + len(prompts) * (cell + pad)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for m, (name, settings) in enumerate(titles):
        x0 = label_width + m * (block_width + gap)
        draw.text((x0, 4), name, fill="black")
        draw.text((x0, 15), settings, fill="dimgray")
    for row, prompt in enumerate(prompts):
        y = header + row * (cell + pad)
        draw.text((4, y + cell // 2 - 6), prompt, fill="black")
        for m, images in enumerate(blocks):
            x0 = label_width + m * (block_width + gap)
            for s in range(seeds):
                tile = images[row * seeds + s].resize((cell, cell), Image.Resampling.NEAREST)
                sheet.paste(tile, (x0 + s * (cell + pad), y))
    return sheet
