"""Inversion and edit output folders (what `consistent-diffusion invert` / `edit` write).

invert folder: ``inversion.safetensors`` + ``inversion.json`` (the record, see ``record``),
``input.png`` (the image as inverted), ``reconstruction.png`` and ``manifest.json``.
edit folder: ``edit_pNN.png`` per prompt, ``contact_sheet.png`` and ``manifest.json``.
Each folder appears only when complete (written to a temporary sibling, then renamed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core import recipe
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import contact_sheet, load_image, save_png_atomic
from consistent_diffusion.core.outputs import atomic_output_dir, library_versions, utc_now, write_json_atomic
from consistent_diffusion.methods.inversion.method import edit, invert, reconstruct
from consistent_diffusion.methods.inversion.record import INVERSION_META, INVERSION_TENSORS, Inversion
from consistent_diffusion.models.loading import model_identity
from consistent_diffusion.models.vae import decode_latents, native_size, vae_factor

INVERT_FORMAT = "consistent-diffusion/inversion"
EDIT_FORMAT = "consistent-diffusion/edit"


@dataclass
class InvertedFolder:
    """What ``invert_to_folder`` made: the inversion (``path`` set to the folder), its latent
    reconstruction error max |x0_hat - x0| and the folder."""

    inversion: Inversion
    reconstruction_error: float
    path: Path


def _runtime(pipe: Any, runtime: dict[str, Any] | None) -> dict[str, Any]:
    if runtime is not None:
        return dict(runtime)
    return {"device": str(getattr(pipe, "device", "cpu")), "dtype": str(pipe.unet.dtype).replace("torch.", "")}


def inversion_size(pipe: Any, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """(width, height) to invert at: the given sides or the native size; checked against the VAE factor."""
    default_w, default_h = native_size(pipe)
    size = (width or default_w, height or default_h)
    factor = vae_factor(pipe)
    if size[0] % factor or size[1] % factor:
        raise ConfigError(f"width and height must be multiples of {factor} for this model, got {size[0]}x{size[1]}")
    return size


def invert_to_folder(
    pipe: Any,
    image: Any,
    out: str | os.PathLike,
    prompt: str = "",
    *,
    steps: int = 50,
    cfg: float = 3.5,
    eta: float = 1.0,
    negative_prompt: str | None = None,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    model: str | None = None,
    overwrite: bool = False,
    runtime: dict[str, Any] | None = None,
) -> InvertedFolder:
    """Invert ``image`` (``invert``, noises seeded with ``seed``), check the reconstruction and
    write the invert folder ``out``. runtime: recorded in the manifest (default: the pipe's
    device and dtype)."""
    size = inversion_size(pipe, width, height)
    inversion = invert(pipe, image, prompt, steps=steps, cfg=cfg, eta=eta, negative_prompt=negative_prompt,
                       generator=torch.Generator().manual_seed(seed), size=size, model=model)
    latent = reconstruct(pipe, inversion).float().cpu()
    error = float((latent - inversion.x0).abs().max())
    with atomic_output_dir(out, overwrite=overwrite) as temp:
        inversion.save(temp)
        save_png_atomic(load_image(image, size), temp / "input.png")
        save_png_atomic(decode_latents(pipe, latent)[0], temp / "reconstruction.png")
        manifest = {
            "format": INVERT_FORMAT,
            "created": utc_now(),
            "command": "invert",
            "image": os.path.abspath(image) if isinstance(image, (str, os.PathLike)) else "<in-memory image>",
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "cfg": cfg,
            "eta": eta,
            "seed": seed,
            "width": size[0],
            "height": size[1],
            "model": model_identity(pipe).to_dict(),
            "runtime": _runtime(pipe, runtime),
            "reconstruction_max_abs_error_latent": error,
            "files": [INVERSION_TENSORS, INVERSION_META, "input.png", "reconstruction.png"],
            "versions": library_versions(),
        }
        write_json_atomic(manifest, temp / "manifest.json")
    inversion.path = os.path.abspath(out)
    return InvertedFolder(inversion=inversion, reconstruction_error=error, path=Path(out))


def edit_filename(index: int) -> str:
    return f"edit_p{index:02d}.png"


def edit_to_folder(
    pipe: Any,
    inversion: Inversion,
    out: str | os.PathLike,
    prompts: list[str] | None = None,
    *,
    cfg: float | None = None,
    skip: int = 0,
    negative_prompt: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    runtime: dict[str, Any] | None = None,
) -> list[Any]:
    """Edit ``inversion`` with each prompt (``edit``; default: the source prompt, cfg: the
    inversion's) and write the edit folder ``out``. ``seed`` is recorded only (the noise is
    the inversion's). Returns the edited PIL images, one per prompt."""
    prompts = list(prompts or [inversion.prompt])
    cfg = inversion.cfg if cfg is None else cfg
    images = edit(pipe, inversion, prompts, cfg_tar=cfg, skip=skip, negative_prompt=negative_prompt)
    files = [edit_filename(index) for index in range(len(prompts))]
    source = os.path.abspath(inversion.path) if inversion.path is not None else "<unsaved inversion>"
    with atomic_output_dir(out, overwrite=overwrite) as temp:
        manifest = {
                "format": EDIT_FORMAT,
                "created": utc_now(),
                "command": "edit",
                "inversion": source,
                "source_prompt": inversion.prompt,
                "source_cfg": inversion.cfg,
                "prompts": prompts,
                "negative_prompt": negative_prompt,
                "skip": skip,
                "cfg": cfg,
                "seed": seed,
                "images": [{"file": f, "prompt": p} for f, p in zip(files, prompts, strict=True)],
                "model": model_identity(pipe).to_dict(),
                "runtime": _runtime(pipe, runtime),
                "versions": library_versions(),
            }
        for name, image, prompt in zip(files, images, prompts, strict=True):
            save_png_atomic(image, temp / name, text=edit_recipe_text(manifest, name, prompt, inversion, image.size))
        save_png_atomic(contact_sheet(list(images), columns=len(images)), temp / "contact_sheet.png")
        write_json_atomic(manifest, temp / "manifest.json")
    return images


def edit_recipe_text(manifest: dict[str, Any], file: str, prompt: str, inversion: Inversion,
                     size: tuple[int, int]) -> dict[str, str]:
    """PNG chunks of one edit (``core.recipe``): A1111 ``parameters`` and our recipe (the edit folder's
    manifest and which image). The noise is the inversion's, so its seed is the inversion's."""
    fields = {
        "Steps": inversion.steps,
        "Sampler": "DDPM (edit-friendly inversion)",
        "CFG scale": manifest["cfg"],
        "Seed": inversion.config.get("seed"),
        "Size": f"{size[0]}x{size[1]}",
        **recipe.model_fields(manifest["model"]),
        "Methods": "ddpm_edit",
        "Skip": manifest["skip"],
        **recipe.version_field(),
    }
    parameters = recipe.format_parameters(prompt, manifest.get("negative_prompt") or "", fields)
    return recipe.png_text(parameters, {"kind": "ddpm-edit", "request": manifest, "image": {"file": file, "prompt": prompt}})
