"""Image input/output with clear errors: every image a user gives passes through here.

``load_image`` accepts any mode PIL reads (RGBA/LA/P with transparency are composited on
white, 16-bit and greyscale converted), reports corrupt or missing files by name, and can
resize + centre-crop to a size. ``save_png_atomic`` never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from consistent_diffusion.core.errors import ImageInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image -> RGB; transparency is composited on ``background``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = array / max(float(array.max()), 1.0) * 255.0
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers ``width`` x ``height``, then crop the centre."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def load_image(
    path: str | os.PathLike | Image.Image,
    size: tuple[int, int] | int | None = None,
) -> Image.Image:
    """Read an image as RGB (transparency on white), optionally resized+centre-cropped.

    size: ``(width, height)`` or one int for a square; None keeps the original size.
    Raises ImageInputError naming the file for missing, corrupt or empty images.
    """
    if isinstance(path, Image.Image):
        image = path
        name = "<in-memory image>"
    else:
        name = str(path)
        if not Path(path).is_file():
            raise ImageInputError(f"image not found: {name}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageInputError(f"cannot read image {name}: corrupt or not an image ({error})") from error
    if image.width < 1 or image.height < 1:
        raise ImageInputError(f"image {name} is empty ({image.width}x{image.height})")
    image = to_rgb(image)
    if size is not None:
        width, height = (size, size) if isinstance(size, int) else size
        image = resize_center_crop(image, width, height)
    return image


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> float tensor (1, 3, H, W) in pixel space [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float tensor (B, 3, H, W) in [-1, 1] -> uint8 array (B, H, W, 3) in [0, 255]."""
    array = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
    return [Image.fromarray(a) for a in tensor_to_uint8(images)]


def save_png_atomic(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Write a PNG to a temp file in the same folder, then rename: never half-written.

    text: PNG text chunks (``core.recipe.png_text``): ``parameters`` stays a plain chunk, as other
    tools expect; the others are compressed."""
    from PIL.PngImagePlugin import PngInfo

    from consistent_diffusion.core.outputs import atomic_path

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value, zip=key != "parameters")
    with atomic_path(path) as temp:
        image.save(temp, format="PNG", pnginfo=info)
    return Path(path)


def contact_sheet(images: list[Image.Image], columns: int, labels: list[str] | None = None) -> Image.Image:
    """Grid of equally sized images, ``columns`` per row (labels drawn under each if given)."""
    from PIL import ImageDraw

    if not images:
        raise ValueError("contact_sheet needs at least one image")
    width, height = images[0].size
    label_height = 12 if labels else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * (height + label_height)
        sheet.paste(image.resize((width, height)), (x, y))
        if labels:
            draw.text((x + 2, y + height), labels[index][: max(1, width // 6)], fill="black")
    return sheet
