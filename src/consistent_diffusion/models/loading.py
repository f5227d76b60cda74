"""Load a diffusers pipeline from one spec string, offline by default.

Specs, tried in this order:
- ``"embedded"``: the small model shipped inside this package (see ``models/embedded.py``).
- a local diffusers folder (has ``model_index.json``): SD 1.x/2.x, SDXL or any pipeline
  class named there.
- a single checkpoint file (``.safetensors`` / ``.ckpt``) in the original (LDM) layout, loaded
  through diffusers' single-file loader; offline it needs ``config=`` a local diffusers folder
  of the same architecture (its component configs and tokenizer are used).
- a hub id (``owner/name``): loaded from the local Hugging Face cache. Nothing is downloaded
  unless ``allow_download=True``; a missing model fails fast with a message saying how to
  fetch it or pass a local folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.models.embedded import EMBEDDED_DIR
from consistent_diffusion.models.sampling import (  # noqa: F401 - SCHEDULERS, scheduler_from_config re-exported
    DEFAULT_STEPS,
    OTHER_MODEL_STEPS,
    SCHEDULERS,
    scheduler_from_config,
)

EMBEDDED = "embedded"


def default_steps(model: str) -> int:
    """Denoising steps when the user sets none, for the model ``model`` (a ``--model`` spec): the
    embedded model's sampler needs ``DEFAULT_STEPS``; any other model samples with the scheduler it
    ships, which is tuned for more (``OTHER_MODEL_STEPS``)."""
    return DEFAULT_STEPS if str(model) == EMBEDDED else OTHER_MODEL_STEPS


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_FINGERPRINT_CHUNK = 4 * 1024 * 1024



@dataclass
class ModelIdentity:
    """What a manifest records so that a series can be re-created with the same weights.

    spec: the string the user gave; kind: embedded | folder | single_file | hub;
    fingerprint: sha256 over each weight file's name, size, first and last 4 MiB.
    """

    spec: str
    kind: str
    pipeline_class: str
    path: str | None = None
    fingerprint: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "pipeline_class": self.pipeline_class,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "revision": self.revision,
            **({"extra": self.extra} if self.extra else {}),
        }


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(pipe: Any) -> ModelIdentity:
    """The identity recorded when ``pipe`` was loaded (or a description for in-code pipelines)."""
    if pipe in _IDENTITIES:
        return _IDENTITIES[pipe]
    return ModelIdentity(spec="<in-memory>", kind="in_memory", pipeline_class=type(pipe).__name__)


def set_model_identity(pipe: Any, identity: ModelIdentity) -> None:
    """Attach an identity to a pipeline (used by loaders and by derived pipelines)."""
    _IDENTITIES[pipe] = identity


def fingerprint_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over each file's relative name, size, first and last 4 MiB (fast on multi-GB weights)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else path.name
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as stream:
            digest.update(stream.read(_FINGERPRINT_CHUNK))
            if size > 2 * _FINGERPRINT_CHUNK:
                stream.seek(size - _FINGERPRINT_CHUNK)
                digest.update(stream.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]


def set_scheduler(pipe: Any, name: str) -> Any:
    """Swap the pipeline's scheduler for ``name`` (one of ``SCHEDULERS``), keeping its config."""
    pipe.scheduler = scheduler_from_config(name, pipe.scheduler.config)
    return pipe


def _finish(pipe: Any, identity: ModelIdentity, device: str | torch.device, dtype: torch.dtype) -> Any:
    pipe = pipe.to(device=device)
    if getattr(pipe, "unet", None) is not None and pipe.unet.dtype != dtype:
        with _quiet():
            pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    set_model_identity(pipe, identity)
    return pipe


def _load_embedded(device: str | torch.device, dtype: torch.dtype) -> Any:
    try:
        from consistent_diffusion.models.embedded import load_embedded_pipeline
    except ImportError as error:  # pragma: no cover - only before the embedded model exists
        raise ModelNotFoundError("the embedded model is not part of this installation") from error
    return load_embedded_pipeline(device=device, dtype=dtype)


def _read_model_index(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"{folder}/model_index.json is unreadable: {error}") from error


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, ModelIdentity]:
    import diffusers

    index = _read_model_index(folder)
    class_name = index.get("_class_name", "DiffusionPipeline")
    pipeline_class = getattr(diffusers, class_name, diffusers.DiffusionPipeline)
    with _quiet():
        pipe = pipeline_class.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    identity = ModelIdentity(
        spec=str(folder),
        kind="folder",
        pipeline_class=type(pipe).__name__,
        path=str(folder.resolve()),
        fingerprint=fingerprint_files(_weight_files(folder), root=folder),
    )
    return pipe, identity


def _single_file_pipeline_class(path: Path) -> Any:
    """SDXL if the checkpoint has the second (OpenCLIP) text encoder, else SD 1.x/2.x."""
    import diffusers
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    is_sdxl = any(key.startswith("conditioner.embedders.1") for key in checkpoint)
    return diffusers.StableDiffusionXLPipeline if is_sdxl else diffusers.StableDiffusionPipeline


def _load_single_file(path: Path, dtype: torch.dtype, config: str | None) -> tuple[Any, ModelIdentity]:
    pipeline_class = _single_file_pipeline_class(path)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise ModelNotFoundError(f"config folder {config} has no model_index.json (pass a diffusers folder)")
    try:
        with _quiet():
            pipe = pipeline_class.from_single_file(
                str(path), config=config, torch_dtype=dtype, local_files_only=True
            )
    except Exception as error:
        hint = (
            " Offline, pass config=DIR (CLI: --config DIR), a local diffusers folder of the same "
            "architecture, so its component configs and tokenizer are used."
            if config is None
            else ""
        )
        raise ModelNotFoundError(
            f"could not load single-file checkpoint {path}: {type(error).__name__}: {_first_line(error)}.{hint}"
        ) from error
    identity = ModelIdentity(
        spec=str(path),
        kind="single_file",
        pipeline_class=type(pipe).__name__,
        path=str(path.resolve()),
        fingerprint=fingerprint_files([path]),
        extra={"config": config} if config else {},
    )
    return pipe, identity


def _load_hub(repo_id: str, dtype: torch.dtype, revision: str | None, allow_download: bool) -> tuple[Any, ModelIdentity]:
    import diffusers

    try:
        with _quiet():
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                repo_id, torch_dtype=dtype, revision=revision, local_files_only=not allow_download
            )
    except Exception as error:
        how = (
            "it is not in the local Hugging Face cache and downloading is off"
            if not allow_download
            else f"download failed ({type(error).__name__}: {_first_line(error)})"
        )
        raise ModelNotFoundError(
            f"cannot load hub model {repo_id!r}: {how}. Fetch it where you have network "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass the folder: --model DIR"
            + ("" if allow_download else ", or allow downloading with --allow-download")
        ) from None
    identity = ModelIdentity(
        spec=repo_id,
        kind="hub",
        pipeline_class=type(pipe).__name__,
        revision=revision or "main",
        extra={"commit": getattr(pipe, "_name_or_path", None)},
    )
    return pipe, identity


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


@contextlib.contextmanager
def _quiet():
    """Silence diffusers/transformers chatter (type warnings, progress bars) while loading."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        diffusers_logging.set_verbosity(previous)


def load_pipeline(
    spec: str = EMBEDDED,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    scheduler: str | None = None,
    config: str | None = None,
    revision: str | None = None,
    allow_download: bool = False,
) -> Any:
    """Return a ready diffusers pipeline for ``spec`` (see module docstring), on ``device``/``dtype``.

    scheduler: optional name from ``SCHEDULERS`` to swap in.
    config: for single-file checkpoints, a local diffusers folder with the architecture's configs.
    revision / allow_download: for hub ids only.
    Raises ModelNotFoundError with a one-line fix for anything that cannot be loaded.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model spec must be a non-empty string, got {spec!r}")
    path = Path(os.path.expanduser(spec))
    if spec == EMBEDDED:
        pipe = _load_embedded(device, dtype)
        weights = EMBEDDED_DIR
        identity = ModelIdentity(
            spec=EMBEDDED,
            kind="embedded",
            pipeline_class=type(pipe).__name__,
            fingerprint=fingerprint_files(_weight_files(weights), root=weights),
            extra={"package_version": __import__("consistent_diffusion").__version__},
        )
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json); "
                "pass a diffusers folder, a .safetensors/.ckpt file, a hub id, or 'embedded'"
            )
        pipe, identity = _load_folder(path, dtype)
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(f"{path}: unsupported model file type {path.suffix!r}; accepted: .safetensors, .ckpt")
        pipe, identity = _load_single_file(path, dtype, config)
    elif _looks_like_hub_id(spec) and not path.exists():
        pipe, identity = _load_hub(spec, dtype, revision, allow_download)
    else:
        raise ModelNotFoundError(
            f"model not found: {spec!r} is not 'embedded', an existing folder or file, or a hub id (owner/name)"
        )
    pipe = _finish(pipe, identity, device, dtype)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' -> torch dtype, with a clear error."""
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
              "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"unknown dtype {name!r}; accepted: float32, float16, bfloat16")
    return dtypes[name]
