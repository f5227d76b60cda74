"""Data for fine-tuning: instance images, prior-preservation class images, captioned image sets.

Every image a user gives passes ``images.load_image`` (any size and mode; transparency on white),
then is resized and centre-cropped to the training resolution. Unreadable files are reported by
name and skipped; a set with no usable image is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.core.images import list_images, load_image, save_png_atomic
from consistent_diffusion.core.outputs import write_json_atomic


@dataclass
class LoadedImages:
    """Usable images (RGB, ``size`` x ``size``), their files, and the files that were skipped."""

    images: list[Image.Image]
    files: list[Path]
    skipped: list[tuple[Path, str]]  # (file, reason)


def load_image_set(source: str | os.PathLike | Sequence[str | os.PathLike], size: int, what: str = "instance") -> LoadedImages:
    """Load a folder (or list) of images, resized + centre-cropped to ``size``.

    Corrupt or unreadable files are skipped with a warning that names each one; no usable image
    at all raises ImageInputError listing what was wrong.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        files = list_images(folder)
        where = str(folder)
    else:
        files = [Path(p) for p in source]
        where = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    images, used, skipped = [], [], []
    for path in files:
        try:
            images.append(load_image(path, size))
            used.append(path)
        except ImageInputError as error:
            skipped.append((path, str(error)))
    if skipped:
        names = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
        warnings.warn(f"skipped {len(skipped)} unreadable {what} image(s): {names}", UserWarning, stacklevel=2)
    if not images:
        detail = f" (unreadable: {', '.join(p.name for p, _ in skipped)})" if skipped else ""
        raise ImageInputError(f"no usable {what} images in {where}{detail}; give at least one readable image")
    return LoadedImages(images=images, files=used, skipped=skipped)


def class_images_folder(root: Path, prompt: str, size: int, steps: int, guidance: float) -> Path:
    """Cache folder of class images for one (prompt, size, steps, guidance): reused on resume."""
    key = json.dumps([prompt, size, steps, guidance])
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_class_images(
    pipe: Any,
    prompt: str,
    count: int,
    folder: Path,
    size: int,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> list[Image.Image]:
    """Class images for prior preservation, generated with the *base* model and cached on disk.

    Image i is ``class_{i:04d}.png``, generated with seed ``seed + i`` through ``methods.run`` (no
    method stacked); files already present (from an earlier or interrupted run) are reused, only
    the missing ones are generated.
    """
    from tqdm.auto import tqdm

    from consistent_diffusion.methods.base import GenerationContext, run

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"prompt": prompt, "size": size, "steps": steps, "guidance": guidance, "seed": seed},
                      folder / "class_images.json")
    paths = [folder / f"class_{i:04d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    with tqdm(total=len(missing), desc="class images", unit="img", disable=not progress or not missing) as bar:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            ctx = GenerationContext(
                pipe=pipe,
                prompts=[prompt] * len(chunk),
                negative_prompts=None,
                generators=[torch.Generator("cpu").manual_seed(seed + i) for i in chunk],
                call_kwargs={"num_inference_steps": steps, "guidance_scale": guidance, "height": size, "width": size},
            )
            with torch.no_grad():
                images = run(ctx)
            for i, image in zip(chunk, images, strict=True):
                save_png_atomic(image, paths[i])
            bar.update(len(chunk))
    return load_image_set(paths, size, what="class").images


@dataclass
class CaptionedImages:
    """Images (RGB, ``size`` x ``size``) with one caption each."""

    images: list[Image.Image]
    captions: list[str]


def load_captioned_images(
    source: str | os.PathLike, size: int, default_caption: str = "", split: str | None = "train", limit: int | None = None,
    heldout_styles: bool = False,
) -> CaptionedImages:
    """Images with captions from one of:

    - an emoji dataset folder (``images.npy`` + ``labels.json``, see ``data.emoji``): the rows of
      ``split`` in trained styles (``EmojiDataset.trainable``: never a held-out style, unless
      ``heldout_styles``, for measuring; split None: every row) with their ``caption``;
    - an image folder with ``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``, the
      Hugging Face imagefolder convention) or a ``NAME.txt`` caption beside each image; images
      without a caption get ``default_caption``.
    """
    folder = Path(source)
    if (folder / "images.npy").is_file() and (folder / "labels.json").is_file():
        from consistent_diffusion.data.emoji import load_emoji_dataset

        dataset = load_emoji_dataset(folder)
        if not split:
            rows = range(len(dataset.records))
        else:
            rows = dataset.indices(split=split) if heldout_styles else dataset.trainable(split)
        rows = list(rows)[:limit] if limit else list(rows)
        if not rows:
            raise ConfigError(f"{folder} has no rows in split {split!r} in a trained style")
        images = [load_image(Image.fromarray(dataset.images[i]), size) for i in rows]
        captions = [str(dataset.records[i].get("caption") or default_caption) for i in rows]
        return CaptionedImages(images=images, captions=captions)
    loaded = load_image_set(folder, size, what="training")
    captions_by_name: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                captions_by_name[str(record["file_name"])] = str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConfigError(f"{metadata}:{number}: expected {{\"file_name\": ..., \"text\": ...}} ({error})") from None
    captions = []
    for path in loaded.files:
        sidecar = path.with_suffix(".txt")
        if path.name in captions_by_name:
            captions.append(captions_by_name[path.name])
        elif sidecar.is_file():
            captions.append(sidecar.read_text(encoding="utf-8").strip())
        else:
            captions.append(default_caption)
    images = loaded.images
    if limit:
        images, captions = images[:limit], captions[:limit]
    return CaptionedImages(images=images, captions=captions)
