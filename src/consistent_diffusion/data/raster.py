"""Artwork files (PNG, WebP, SVG) -> (64, 64, 3) uint8 RGB composited on white.

SVG is rasterised with resvg (``resvg-py``: a self-contained Rust renderer shipped as a wheel, no
system library, no system fonts loaded), so the same SVG gives the same pixels on every machine.
Bitmaps are decoded with Pillow; anything not already at the target size is resized with Lanczos
after compositing on white (the rule the 64 px PNG styles have always used).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.core.images import to_rgb

IMAGE_SIZE = 64


def _to_array(image: Image.Image, size: int) -> np.ndarray:
    """PIL image (any mode) -> (size, size, 3) uint8 RGB on white."""
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def rasterise_svg(svg: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """SVG markup -> (size, size, 3) uint8 RGB on white, rendered by resvg at ``size`` x ``size``.

    Rendered straight at the target size with a transparent background (resvg anti-aliases edges),
    then composited on white by ``to_rgb``, exactly like a transparent PNG.
    """
    try:
        import resvg_py
    except ImportError as error:  # pragma: no cover - a main dependency
        raise ConsistentDiffusionError("SVG styles need resvg-py: pip install resvg-py") from error
    try:
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True)
    except ValueError as error:
        raise ConsistentDiffusionError(f"resvg could not render an SVG: {error}") from error
    with Image.open(io.BytesIO(bytes(png))) as opened:
        return _to_array(opened, size)


def read_artwork(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One artwork file (.svg, .png, .webp, ...) -> (size, size, 3) uint8 RGB on white."""
    if path.suffix.lower() == ".svg":
        return rasterise_svg(path.read_text(encoding="utf-8"), size)
    with Image.open(path) as opened:
        return _to_array(opened, size)
