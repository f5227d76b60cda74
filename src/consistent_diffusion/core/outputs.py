"""Atomic output folders and JSON files: a crash or a full disk never leaves a
half-written result that looks complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``out``.

    On any error the temporary folder is removed and ``out`` is left as it was. An existing
    ``out`` is an error unless ``overwrite`` (then it is replaced only after success).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    temp.chmod(0o777 & ~_umask())  # mkdtemp makes 0o700; the result should look like a plain mkdir
    try:
        yield temp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(temp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, out)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise ConsistentDiffusionError(f"disk full while writing {out}; nothing was written") from error
        raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    """0o666 minus the process umask: what a plainly created file would get (mkstemp uses 0o600)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds the file is fsynced, given
    normal permissions and renamed onto ``path``. On error the temporary file is removed and
    ``path`` is untouched, so a crash or a full disk never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp, _default_file_mode())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise ConsistentDiffusionError(f"disk full while writing {path}; the previous file (if any) is intact") from error
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (see ``atomic_path``): never a half-written checkpoint."""
    import torch

    with atomic_path(path) as temp:
        torch.save(obj, temp)
    return Path(path)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (see ``atomic_path``)."""
    return write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically (see ``atomic_path``)."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def library_versions() -> dict[str, str]:
    """Versions that decide what a pipeline produces, for manifests."""
    import importlib.metadata as metadata

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("consistent-diffusion", "torch", "diffusers", "transformers", "peft", "accelerate",
                 "numpy", "pillow", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
