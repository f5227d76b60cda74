"""The saved inversion record: ``Inversion`` and its folder format.

A folder holds ``inversion.safetensors`` (tensors ``x0``, ``xs``, ``zs``, ``timesteps``, float32
/ int64, on CPU) and ``inversion.json`` (``format_version``, prompt, negative prompt, cfg, and
``config``: steps, eta, height, width, seed, scheduler config, pipeline class, model spec).
Both are written atomically; ``Inversion.load`` names what is missing or wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.outputs import atomic_path, write_text_atomic

INVERSION_TENSORS = "inversion.safetensors"
INVERSION_META = "inversion.json"
FORMAT_VERSION = 1
TENSOR_NAMES = ("x0", "xs", "zs", "timesteps")


@dataclass
class Inversion:
    """An edit-friendly DDPM inversion of one image.

    x0: (1, C, h, w) clean latent (VAE mean, times ``scaling_factor``), float32.
    xs: (N + 1, C, h, w) latents entering each step; ``xs[N] == x0``.
    zs: (N, C, h, w) noise maps; ``zs[i]`` is used at step ``i``.
    timesteps: (N,) int64 scheduler timesteps, descending.
    prompt / negative_prompt / cfg: the source conditioning used for the inversion.
    config: steps, eta, height, width, seed, scheduler config, model spec (JSON-serialisable).
    """

    x0: torch.Tensor
    xs: torch.Tensor
    zs: torch.Tensor
    timesteps: torch.Tensor
    prompt: str
    cfg: float
    negative_prompt: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)  # folder it was saved to / loaded from

    @property
    def steps(self) -> int:
        return int(self.zs.shape[0])

    @property
    def eta(self) -> float:
        return float(self.config.get("eta", 1.0))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.config["width"]), int(self.config["height"])

    @property
    def guidance_rescale(self) -> float | None:
        """The guidance rescale the inversion's predictions used (None: none), so that a
        reconstruction uses the same prediction and lands on ``x0`` exactly."""
        value = self.config.get("guidance_rescale")
        return None if value is None else float(value)

    @property
    def scheduler_config(self) -> dict[str, Any] | None:
        """The config of the scheduler the inversion ran (its training schedule), if recorded."""
        return self.config.get("scheduler") or None

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``inversion.safetensors`` + ``inversion.json`` into ``folder`` (each atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "x0": self.x0.detach().float().cpu().contiguous(),
            "xs": self.xs.detach().float().cpu().contiguous(),
            "zs": self.zs.detach().float().cpu().contiguous(),
            "timesteps": self.timesteps.detach().long().cpu().contiguous(),
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "method": "edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024)",
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "cfg": self.cfg,
            "config": self.config,
        }
        with atomic_path(folder / INVERSION_TENSORS) as temp:
            save_file(tensors, str(temp))
        write_text_atomic(json.dumps(meta, indent=2, sort_keys=True), folder / INVERSION_META)
        if self.path is None:
            self.path = str(folder)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Inversion:
        """Read an inversion written by ``save``; ConfigError names what is missing or wrong."""
        from safetensors.torch import load_file

        folder = Path(folder)
        tensors_path, meta_path = folder / INVERSION_TENSORS, folder / INVERSION_META
        if not tensors_path.is_file() or not meta_path.is_file():
            raise ConfigError(
                f"{folder} is not an inversion folder: it needs {INVERSION_TENSORS} and {INVERSION_META} "
                "(written by `consistent-diffusion invert`)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(tensors_path))
        except Exception as error:  # corrupt JSON or safetensors
            raise ConfigError(f"cannot read inversion in {folder}: {error}") from error
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"inversion in {folder} has format_version {meta.get('format_version')!r}; "
                f"this version reads {FORMAT_VERSION}"
            )
        missing = set(TENSOR_NAMES) - set(tensors)
        if missing:
            raise ConfigError(f"inversion in {folder} lacks tensors {sorted(missing)}")
        return cls(
            x0=tensors["x0"],
            xs=tensors["xs"],
            zs=tensors["zs"],
            timesteps=tensors["timesteps"],
            prompt=meta["prompt"],
            cfg=float(meta["cfg"]),
            negative_prompt=meta.get("negative_prompt"),
            config=meta.get("config", {}),
            path=str(folder),
        )


def inversion_reference(inversion: Inversion) -> str:
    """How a manifest names an inversion: its folder (save it first to make the manifest replayable)."""
    if inversion.path is None:
        return "<unsaved inversion: call Inversion.save(folder) before generating to record it>"
    return str(Path(inversion.path).resolve())
