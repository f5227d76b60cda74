"""The options every training run shares (``LoopConfig``: steps, learning rate and schedule,
checkpoints, pauses, hand-offs, precision, threads), validated on creation, and the small checks
the tasks' own configs reuse. ``training.loop`` runs them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from consistent_diffusion.core.errors import ConfigError

MIXED_PRECISION = ("no", "fp16", "bf16")
# Fields that may change when resuming a run (everything else must match the first run).
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "progress", "resume", "validation_prompts",
                     "validation_steps", "validation_count", "log_every", "threads", "max_minutes",
                     "checkpoint_minutes", "stop_after_steps", "pause_after_minutes", "warm_start",
                     "mixed_precision", "single_process"}
LR_SCHEDULES = ("constant", "cosine")


@dataclass(kw_only=True)
class LoopConfig:
    """Options every fine-tuning run shares. Subclasses add their own fields (keyword-only)."""

    out: Path  # run folder (created; see the module docstring for its layout)
    steps: int = 400  # optimisation steps in total (a resumed run continues up to this)
    batch_size: int = 1  # examples per step and process
    learning_rate: float = 5e-6  # peak learning rate
    lr_warmup_steps: int = 0  # linear warm-up over this many steps
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (to 10% of the peak over the budget)
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    checkpoint_every: int = 100  # steps between checkpoints (and validation images)
    checkpoint_minutes: float | None = None  # also checkpoint once this much wall time passed since the last
    max_minutes: float | None = None  # wall-time budget of the training steps (None: steps only)
    stop_after_steps: int | None = None  # pause (checkpoint, return stopped) after this many steps this session
    pause_after_minutes: float | None = None  # pause likewise once this session's steps took this much wall time
    warm_start: Path | None = None  # a write_handoff file to continue from when ``out`` has no checkpoint
    ema_decay: float = 0.0  # EMA of the trainable weights, exported instead of them (0: no EMA)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # makes the run reproducible on CPU
    device: str = "cpu"  # "cpu" forces the CPU; anything else lets accelerate choose its GPU
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU); weights are stored in float32
    gradient_checkpointing: bool = False  # trade compute for memory on large models
    threads: int | None = None  # torch CPU threads during the run (None: torch's default)
    resolution: int | None = None  # training image side in pixels; None = the model's native size
    validation_prompts: tuple[str, ...] = ()  # generated at each checkpoint (empty: none)
    validation_steps: int = 25  # denoising steps for validation images
    log_every: int = 1  # steps between log.jsonl records
    resume: bool = False  # continue the run in ``out`` from its newest checkpoint
    progress: bool = True  # tqdm progress bar with the loss
    single_process: bool = False  # train in this process only, even under torchrun (``LocalAccelerator``)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.validation_prompts = tuple(self.validation_prompts)
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "validation_steps", "log_every"):
            check_int(self, name, minimum=1)
        check_int(self, "lr_warmup_steps", minimum=0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warm_start is not None:
            self.warm_start = Path(self.warm_start)
        for name in ("checkpoint_minutes", "max_minutes", "pause_after_minutes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(f"{name} must be a number > 0 or unset, got {value!r}")
        if self.stop_after_steps is not None:
            check_int(self, "stop_after_steps", minimum=1)
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        check_int(self, "seed", minimum=0)
        for name in ("learning_rate", "adam_weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.resolution is not None:
            check_int(self, "resolution", minimum=8)
        if self.threads is not None:
            check_int(self, "threads", minimum=1)
        if self.single_process and self.mixed_precision == "fp16":
            raise ConfigError("single_process training supports mixed_precision 'no' or 'bf16' (fp16 needs a loss scaler)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data


def check_int(config: Any, name: str, minimum: int) -> None:
    """ConfigError unless ``config.name`` is an integer >= ``minimum``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive(config: Any, *names: str) -> None:
    """ConfigError unless each ``config.name`` is a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be a number > 0, got {value!r}")


# ----------------------------------------------------------------------------- randomness
