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

from consistent_diffusion.errors import ConfigError, ConsistentDiffusionError


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


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON to a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=False)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


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
