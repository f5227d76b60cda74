"""ControlNet preprocessors: pure functions image -> control image (PIL in, PIL out).

Every control image is RGB, the size of its input, binary (0 or 255 in all three channels), with
the structure drawn **white on black**, the convention of the public ControlNets (lllyasviel's
canny/scribble/seg models) and of the ControlNets trained here.

- ``canny``: Canny edges of the luma. The implementation is shared with the shape metric
  (``core.imageops.canny``), so "canny F1 of an output against its control image" re-extracts edges
  exactly as the control image was made.
- ``silhouette``: the foreground mask, from the alpha channel when the image has one, otherwise
  from the difference to the background colour (the median of the one-pixel border), holes filled
  (``core.imageops.foreground_mask``).
- ``scribble``: coarse strokes, as a user would draw them: Canny edges of a stronger blur,
  dilated. ``from_drawing=True`` instead reads a user's own drawing (dark strokes on light paper,
  or light on dark) and returns it thresholded and, if needed, inverted.

None of them modifies its input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import load_image, pil_to_tensor

ALPHA_THRESHOLD = 128  # alpha >= this is foreground


def _mask_to_image(mask: torch.Tensor | np.ndarray) -> Image.Image:
    """Boolean mask (H, W) or (1, 1, H, W) -> RGB PIL, white where True."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    array = array.reshape(array.shape[-2:]).astype(bool)
    grey = np.where(array, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


def image_to_mask(image: Image.Image) -> np.ndarray:
    """A control image (any mode) -> boolean (H, W) array, True where it is bright (> 127)."""
    return np.asarray(image.convert("L")) > 127


def _rgb(image: Image.Image | Any) -> Image.Image:
    """Any image (PIL or path) -> RGB, transparency composited on white."""
    return load_image(image)


def canny(image: Image.Image, sigma: float = 1.0, low: float = 0.08, high: float = 0.2) -> Image.Image:
    """Canny edges, white on black. Thresholds are gradient magnitudes of luma in [0, 1] units
    (a full black-to-white step is 1); ``sigma`` is the Gaussian blur in pixels."""
    from consistent_diffusion.core.imageops import canny as canny_edges

    if not 0 <= low <= high:
        raise ConfigError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    if sigma < 0:
        raise ConfigError(f"canny sigma must be >= 0, got {sigma}")
    edges = canny_edges(pil_to_tensor(_rgb(image)), sigma=sigma, low=low, high=high)
    return _mask_to_image(edges)


def _alpha(image: Image.Image) -> np.ndarray | None:
    """The alpha channel (H, W) uint8 if the image has real transparency, else None."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            return alpha
    return None


def silhouette(image: Image.Image, threshold: float = 0.08, fill_holes: bool = True) -> Image.Image:
    """Foreground silhouette, white on black: alpha >= 128 when the image has transparency,
    otherwise pixels differing from the border's median colour by more than ``threshold`` (in
    [0, 1] units, any channel); ``fill_holes`` fills enclosed background (eyes, teeth)."""
    from consistent_diffusion.core.imageops import fill_holes as fill
    from consistent_diffusion.core.imageops import foreground_mask

    if not 0 <= threshold < 1:
        raise ConfigError(f"silhouette threshold must be in [0, 1), got {threshold}")
    alpha = _alpha(image) if isinstance(image, Image.Image) else None
    if alpha is not None:
        mask = torch.from_numpy(alpha >= ALPHA_THRESHOLD).view(1, 1, *alpha.shape)
        return _mask_to_image(fill(mask) if fill_holes else mask)
    mask = foreground_mask(pil_to_tensor(_rgb(image)), threshold=threshold, fill=fill_holes)
    return _mask_to_image(mask)


def scribble(image: Image.Image, sigma: float = 2.0, width: int = 1, from_drawing: bool = False) -> Image.Image:
    """Coarse strokes, white on black: Canny of a ``sigma``-pixel blur, dilated by ``width`` pixels.

    from_drawing: the image *is* a scribble (a user's drawing): threshold it at mid-grey and make
    the strokes white (the minority colour is taken as the strokes).
    """
    from consistent_diffusion.core.imageops import canny as canny_edges
    from consistent_diffusion.core.imageops import dilate

    if width < 0:
        raise ConfigError(f"scribble width must be >= 0, got {width}")
    rgb = _rgb(image)
    if from_drawing:
        dark = np.asarray(rgb.convert("L")) < 128
        strokes = dark if dark.mean() <= 0.5 else ~dark
        return _mask_to_image(strokes)
    edges = canny_edges(pil_to_tensor(rgb), sigma=sigma, low=0.04, high=0.1)
    return _mask_to_image(dilate(edges, width))


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "canny": canny,
    "silhouette": silhouette,
    "scribble": scribble,
}
CONDITIONS = tuple(PREPROCESSORS)


def make_control(condition: str, image: Any, size: tuple[int, int] | int | None = None, **options: Any) -> Image.Image:
    """Control image for ``condition`` from an image (path or PIL), optionally resized and
    centre-cropped first (``size``: (width, height) or one int); transparency is kept for silhouettes."""
    if condition not in PREPROCESSORS:
        raise ConfigError(f"unknown control condition {condition!r}; accepted: {', '.join(CONDITIONS)}")
    if not isinstance(image, Image.Image):
        image = _open_keeping_alpha(image)
    if size is not None:
        from PIL import ImageOps

        width, height = (size, size) if isinstance(size, int) else size
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return PREPROCESSORS[condition](image, **options)


def _open_keeping_alpha(path: Any) -> Image.Image:
    """Open an image file with its alpha channel (load_image would composite it on white)."""
    from pathlib import Path

    from consistent_diffusion.core.errors import ImageInputError

    load_image(path)  # missing / corrupt / empty files fail here, by name
    with Image.open(Path(path)) as opened:
        opened.load()
        image = opened.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if image.width < 1 or image.height < 1:  # pragma: no cover - load_image checked
        raise ImageInputError(f"image {path} is empty")
    return image
