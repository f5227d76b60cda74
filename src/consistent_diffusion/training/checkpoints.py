"""A training run's state on disk: checkpoints (``checkpoints/step_NNNNNN.pt``: trainable
weights, optimizer, RNG states, step), compact hand-offs between machines (``write_handoff``:
float16 weights and their EMA, no optimizer moments) and the EMA of the trainable weights. The
loop (``training.loop``) writes and reads them; the CLI, the app and the stage scripts list them."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_torch_save

CHECKPOINT_PATTERN = "step_{:06d}.pt"


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("step_*.pt"):
        with contextlib.suppress(ValueError):
            found.append((int(path.stem.split("_")[1]), path))
    return sorted(found)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read one of our checkpoints (a trusted file we wrote: it holds RNG states, hence not weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - report any unreadable checkpoint by name
        raise ConsistentDiffusionError(f"checkpoint {path} is unreadable ({error}); delete it to resume from an older one") from error


HANDOFF_FORMAT = "consistent-diffusion/train-handoff/v1"


def write_handoff(out: Path, path: Path) -> Path:
    """The newest checkpoint of the run in ``out`` -> a compact hand-off file at ``path`` (atomic):
    {format, kind, step, elapsed_s, trainable, ema} with the weights in float16, no optimizer state."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise ConsistentDiffusionError(f"{out} has no checkpoint to hand off")
    state = load_checkpoint(checkpoints[-1][1])

    def half(weights: dict[str, dict[str, torch.Tensor]] | None) -> dict[str, dict[str, torch.Tensor]] | None:
        if weights is None:
            return None
        return {name: {k: v.half() for k, v in part.items()} for name, part in weights.items()}

    handoff = {"format": HANDOFF_FORMAT, "kind": state.get("kind"), "step": int(state["step"]),
               "elapsed_s": float(state.get("elapsed_s", 0.0)), "trainable": half(state["trainable"]),
               "ema": half(state.get("ema"))}
    atomic_torch_save(handoff, Path(path))
    return Path(path)


def load_handoff(path: Path, kind: str) -> dict[str, Any]:
    """Read a ``write_handoff`` file made by a run of ``kind`` (weights only: loaded with weights_only)."""
    try:
        handoff = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - report any unreadable file by name
        raise ConsistentDiffusionError(f"hand-off {path} is unreadable ({error})") from error
    if not isinstance(handoff, dict) or handoff.get("format") != HANDOFF_FORMAT:
        raise ConsistentDiffusionError(f"{path} is not a training hand-off (write_handoff makes them)")
    if handoff.get("kind") != kind:
        raise ConsistentDiffusionError(f"hand-off {path} is from a {handoff.get('kind')!r} run, not {kind!r}")
    return handoff


class EMA:
    """Exponential moving average of a task's (``training.loop.Task``) trainable weights, with the usual warm-up: after
    0-based step t, shadow <- shadow + (1 - d_t) (weights - shadow), d_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, task: Any, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
                       for name, module in task.modules.items()}

    def _pairs(self, task: Any) -> Iterator[tuple[torch.Tensor, torch.nn.Parameter]]:
        for name, module in task.modules.items():
            shadow = self.shadow[name]
            for key, param in module.named_parameters():
                if key in shadow:
                    yield shadow[key], param

    @torch.no_grad()
    def update(self, task: Any, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, param in self._pairs(task):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, task: Any) -> None:
        """Overwrite the trainable weights with their averages (before export)."""
        for shadow, param in self._pairs(task):
            param.copy_(shadow)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.detach().cpu().clone() for k, v in shadow.items()} for name, shadow in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, shadow in self.shadow.items():
            if set(state.get(name, {})) != set(shadow):
                raise ConsistentDiffusionError(f"checkpoint EMA does not match module {name!r}")
            for key, value in shadow.items():
                value.copy_(state[name][key].to(value.device, value.dtype))
