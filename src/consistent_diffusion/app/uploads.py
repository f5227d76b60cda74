"""Uploads the page accepts: checked (readable, within size and pixel limits) and kept.

``check_image`` refuses a corrupt, empty or oversized file with a one-line ``ConfigError`` a person
can act on; ``keep_upload`` copies a checked file into the jobs' ``inputs/`` folder under its
content's hash, so a manifest (and every PNG's recipe) names a file that outlives the browser
session's temporary upload.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consistent_diffusion.core.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be: size per file, pixels per image, files per field."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_files: int = 20

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = UploadLimits()


def check_image(path: str | os.PathLike, limits: UploadLimits = DEFAULT_LIMITS, what: str = "image") -> Path:
    """``path`` if it is a readable, non-empty image within ``limits``; else a ConfigError that says
    what is wrong in words a person can act on (nothing is kept of a refused file)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ConfigError(f"{what} {name}: not found")
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"{what} {name} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ConfigError(f"{what} {name} is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ConfigError(f"{what} {name} is {width}x{height} pixels; the limit is {limits.max_pixels:,} pixels")
            image.load()
    except ConfigError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ConfigError(f"{what} {name} is not a readable image ({type(error).__name__})") from None
    if width < 1 or height < 1:
        raise ConfigError(f"{what} {name} is empty ({width}x{height})")
    return path


def check_images(paths: Sequence[str | os.PathLike], limits: UploadLimits = DEFAULT_LIMITS,
                 what: str = "image") -> list[Path]:
    """Every file checked (``check_image``), and at most ``limits.max_files`` of them."""
    if len(paths) > limits.max_files:
        raise ConfigError(f"{len(paths)} files given; the limit is {limits.max_files}")
    return [check_image(path, limits, what) for path in paths]


def keep_upload(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A copy of ``path`` in ``folder`` named by its content (sha256, 16 hex digits, plus its
    suffix), written atomically; the same file uploaded again is the same copy. Absolute path."""
    from consistent_diffusion.core.outputs import atomic_path

    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(2**20), b""):
            digest.update(chunk)
    target = Path(folder).resolve() / f"{digest.hexdigest()[:16]}{path.suffix.lower()}"
    if not target.is_file():
        with atomic_path(target) as temp:
            shutil.copyfile(path, temp)
    return target
