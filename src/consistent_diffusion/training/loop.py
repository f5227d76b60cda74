"""One training loop on ``accelerate`` for every task: DreamBooth, LoRA DreamBooth, ControlNet and
the embedded model's own stages (``recipes.embedded``: VAE, UNet, decoder).

The same code runs on this CPU (``Accelerator(cpu=True)``), on one GPU, and under
``accelerate launch --multi_gpu`` / ``torchrun`` on several GPUs or machines: modules and the
optimizer go through ``accelerator.prepare``, the loss through ``accelerator.backward``, and only
the main process writes files.

Determinism and resume. Everything random in step ``s`` (which images, timesteps, noise, latent
samples, caption dropout) comes from a generator seeded with ``(seed, s, process index)``, so a
step's result depends only on the weights and optimizer state before it. A checkpoint
(``checkpoints/step_NNNNNN.pt``, written to a temporary file and renamed) holds the trainable
weights, optimizer and learning-rate scheduler state, the global RNG states and the step;
resuming from it after a kill continues at the next step and ends with the same weights as an
uninterrupted run (bit-for-bit on CPU). SIGINT/SIGTERM finish the current step, write a checkpoint
and stop cleanly; so do ``stop_after_steps`` and ``pause_after_minutes`` (planned pauses).

Hand-offs. A checkpoint holds float32 weights, their EMA and the optimizer moments (about 16 bytes
per parameter): too big to carry a long run from one machine to the next in a repository.
``write_handoff`` keeps only the step, the weights and their EMA in float16 (4 bytes per
parameter); a run started with ``warm_start`` set to that file continues the step count, the
learning-rate schedule, the batches and the EMA from there, with fresh AdamW moments re-warmed
over ``lr_warmup_steps`` (a warm restart: not bit-identical to an uninterrupted run).

Budget and schedule. A run ends at ``steps`` or, when ``max_minutes`` is set, once its training
steps have taken that much wall time (summed over resumes), whichever comes first. The learning
rate at step s is ``learning_rate * lr_factor(lr_schedule, s, progress, lr_warmup_steps)``, where
``progress`` in [0, 1] is the larger of the step share and the time share of the budget. With
``ema_decay`` > 0 the loop keeps an exponential moving average of the trainable weights (in the
checkpoints too) and the exported result holds the averaged weights.

Run folder (``out``)::

    train_config.json   the config, base model identity, library versions (checked on resume)
    log.jsonl           one record per logged step: step, loss, lr, seconds, elapsed_s (+ the task's
                        own values), and one {"step", "val": {...}} per validation that measured something
    checkpoints/        step_NNNNNN.pt (the last ``keep_checkpoints``)
    validation/         step_NNNNNN/ images generated at each checkpoint
    class_images/       prior-preservation images (DreamBooth), reused on resume
    <result>/           the final model: model/ (DreamBooth), lora/ (LoRA), controlnet/ (ControlNet)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_torch_save, library_versions, utc_now, write_json_atomic

MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_PATTERN = "step_{:06d}.pt"
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


def step_generator(
    seed: int, step: int, process: int = 0, device: str | torch.device = "cpu", stream: int = 0
) -> torch.Generator:
    """The generator for everything random in one step of one process; ``stream`` separates tasks
    trained with the same seed (``Task.seed_stream``)."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 1_009 + process + stream * 100_000_007)


def lr_factor(schedule: str, step: int, progress: float, warmup: int) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warm-up min(1, (step + 1) / warmup), times 1
    (``constant``) or a cosine from 1 to 0.1 as ``progress`` goes 0 -> 1 (``cosine``)."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "constant":
        return warm
    return warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


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


# ----------------------------------------------------------------------------- the task interface


class Task:
    """What the loop trains. Subclasses fill ``modules`` (name -> module with trainable
    parameters; the loop prepares them with accelerate and hands the prepared versions back in
    ``run``) and implement ``loss``, ``validate`` and ``export``."""

    result_name = "model"  # folder of the final result inside ``out``
    seed_stream = 0  # separates the random streams of tasks that share a seed (see ``step_generator``)

    def __init__(self) -> None:
        self.modules: dict[str, torch.nn.Module] = {}
        self.run: dict[str, Any] = {}  # prepared (possibly DDP-wrapped) modules, for forward passes
        self.progress = 0.0  # share of the budget spent before the current step (set by the loop), in [0, 1]

    def forward_module(self, name: str) -> Any:
        """The module to run forward passes through: prepared by accelerate if training, else raw."""
        return self.run.get(name, self.modules[name])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = []
        for module in self.modules.values():
            params.extend(p for p in module.parameters() if p.requires_grad)
        return params

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trainable parameters per module, detached on the CPU (what checkpoints store)."""
        return {
            name: {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}
            for name, module in self.modules.items()
        }

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module in self.modules.items():
            params = dict(module.named_parameters())
            saved = state.get(name, {})
            expected = {k for k, p in params.items() if p.requires_grad}
            if set(saved) != expected:
                raise ConsistentDiffusionError(f"checkpoint does not match module {name!r} (different model or options)")
            with torch.no_grad():
                for key, value in saved.items():
                    params[key].copy_(value.to(params[key].device, params[key].dtype))

    def prepare(self, accelerator: Any, step_device: torch.device) -> None:  # noqa: B027 - optional hook
        """Called once the accelerator knows its device (move frozen parts there)."""

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self, step: int, folder: Path) -> dict[str, float] | None:
        """At each checkpoint: write validation images for the current weights into ``folder``
        and/or return validation numbers (logged as ``{"step", "val": ...}``); None for nothing."""
        return None

    def export(self, folder: Path) -> None:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a task's trainable weights, with the usual warm-up: after
    0-based step t, shadow <- shadow + (1 - d_t) (weights - shadow), d_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, task: Task, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
                       for name, module in task.modules.items()}

    def _pairs(self, task: Task) -> Iterator[tuple[torch.Tensor, torch.nn.Parameter]]:
        for name, module in task.modules.items():
            shadow = self.shadow[name]
            for key, param in module.named_parameters():
                if key in shadow:
                    yield shadow[key], param

    @torch.no_grad()
    def update(self, task: Task, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, param in self._pairs(task):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, task: Task) -> None:
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


# ----------------------------------------------------------------------------- stop signals


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self.requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.requested = True

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# ----------------------------------------------------------------------------- one process on purpose


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` the loop uses, for a run that stays in this process even
    when the program runs under ``torchrun`` / ``accelerate launch`` (where every ``Accelerator``
    shares the distributed state and would wrap the model for data parallelism across processes).

    The bench's prepare stage trains this way: each shard fine-tunes what its own cells need, and a
    run gives the same weights whether the bench ran in one process or several. Process index 0,
    the device is the CPU or this process's own GPU (``LOCAL_RANK``), bf16 autocast if asked."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def __init__(self, cpu: bool, mixed_precision: str = "no") -> None:
        import os

        if cpu or not torch.cuda.is_available():
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.mixed_precision = mixed_precision

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        for item in objects:
            if isinstance(item, torch.nn.Module):
                item.to(self.device)
        return objects

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        return None

    def print(self, *args: Any) -> None:
        print(*args)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    result: Path | None  # the exported model (None if the run stopped early)
    step: int  # steps completed
    losses: list[float]  # loss of each step run in this process (this session)
    stopped: bool = False  # stopped by a signal before ``steps``
    trainable_parameters: int = 0  # number of values the optimiser updated


def check_out_folder(config: LoopConfig) -> None:
    """Fail fast (before loading data or generating class images) when ``out`` holds a run and
    ``resume`` was not asked for."""
    if not config.resume and list_checkpoints(config.out):
        raise ConfigError(f"{config.out} already holds a training run; pass --resume to continue it or choose another --out")


def _check_run_folder(config: LoopConfig, record: dict[str, Any]) -> None:
    check_out_folder(config)
    path = config.out / "train_config.json"
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    if config.resume:
        old, new = previous.get("config", {}), record["config"]
        changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if changed or previous.get("kind") != record["kind"]:
            raise ConfigError(f"--resume with different options than the run in {config.out}: {', '.join(changed) or 'kind'}; "
                              "use the same options (only steps/checkpoint/validation options may change)")


def run_training(
    task: Task,
    config: LoopConfig,
    kind: str,
    on_step_end: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.steps`` steps (resuming if asked), then export its result.

    on_step_end(step, loss): called after each completed step (tests use it to simulate a kill).
    """
    from accelerate.utils.memory import clear_device_cache

    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_training(task, config, kind, on_step_end)
    finally:
        torch.set_num_threads(previous_threads)
        # The run's accelerator, optimizer and prepared (DDP) wrappers are released here by reference
        # counting; hand the freed blocks back to the device. No gc.collect (Accelerator.free_memory):
        # it walks the whole heap (~0.25 s per run with torch + diffusers loaded) and frees nothing more.
        task.run = {}
        clear_device_cache()


def _run_training(task: Task, config: LoopConfig, kind: str, on_step_end: Callable[[int, float], None] | None) -> TrainResult:
    from accelerate import Accelerator

    config.out.mkdir(parents=True, exist_ok=True)
    record = {"format": f"consistent-diffusion/train/{kind}/v1", "kind": kind, "created": utc_now(),
              "config": config.to_dict(), "model": task.identity(), "versions": library_versions()}
    _check_run_folder(config, record)
    if config.single_process:
        accelerator: Any = LocalAccelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision)
    else:
        accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision)
    device = accelerator.device
    task.prepare(accelerator, device)
    params = task.trainable_parameters()
    if not params:
        raise ConsistentDiffusionError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    names = list(task.modules)
    prepared = accelerator.prepare(*task.modules.values(), optimizer)
    task.run = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer = prepared[len(names)]
    ema = EMA(task, config.ema_decay) if config.ema_decay > 0 else None

    start, elapsed, restart = 0, 0.0, 0  # restart: the step a warm start began at (its learning-rate warm-up)
    checkpoints = list_checkpoints(config.out)
    if config.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1][1])
        task.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_states(state["rng"])
        start, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        restart = int(state.get("restart_step", 0))
        accelerator.print(f"resuming {config.out} at step {start}")
    elif config.warm_start is not None:
        handoff = load_handoff(config.warm_start, kind)
        task.load_trainable_state(handoff["trainable"])
        if ema is not None:
            ema.load_state_dict(handoff["ema"] if handoff.get("ema") is not None else handoff["trainable"])
        start, elapsed = int(handoff["step"]), float(handoff["elapsed_s"])
        restart = start
        accelerator.print(f"warm start from {config.warm_start} at step {start} (fresh optimizer moments)")
    if accelerator.is_main_process:
        write_json_atomic(record, config.out / "train_config.json")
    log_path = config.out / "log.jsonl"

    def log(entry: dict[str, Any]) -> None:
        with open(log_path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")

    def save_checkpoint(step: int, elapsed: float) -> None:
        if accelerator.is_main_process:
            state = {"step": step, "elapsed_s": elapsed, "trainable": task.trainable_state(),
                     "optimizer": optimizer.state_dict(), "rng": rng_states(), "kind": kind, "restart_step": restart}
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_torch_save(state, checkpoint_dir(config.out) / CHECKPOINT_PATTERN.format(step))
            for _, old in list_checkpoints(config.out)[: -config.keep_checkpoints]:
                old.unlink(missing_ok=True)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                values = task.validate(step, config.out / "validation" / f"step_{step:06d}")
            if values:
                log({"step": step, "elapsed_s": round(elapsed, 3), "val": values})
        accelerator.wait_for_everyone()

    budget_s = config.max_minutes * 60.0 if config.max_minutes is not None else math.inf

    def spent(step: int, elapsed: float) -> bool:
        return step >= config.steps or elapsed >= budget_s

    for module in task.run.values():
        module.train()
    losses: list[float] = []
    stopped = False
    step = start
    last_save = time.monotonic()
    session_s = 0.0  # wall time of this session's steps (pause_after_minutes)
    with _StopFlag().installed() as flag, tqdm(
        total=config.steps, initial=start, desc=f"train {kind}", unit="step",
        disable=not config.progress or not accelerator.is_main_process,
    ) as bar:
        while not spent(step, elapsed):
            began = time.perf_counter()
            task.progress = max(step / config.steps, elapsed / budget_s)
            lr = config.learning_rate * lr_factor(config.lr_schedule, step - restart, task.progress, config.lr_warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = step_generator(config.seed, step, accelerator.process_index, stream=task.seed_stream)
            with accelerator.autocast():
                loss, logs = task.loss(step, generator, device)
            accelerator.backward(loss)
            if config.max_grad_norm > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(task, step)
            step += 1
            value = float(accelerator.gather(loss.detach().float().reshape(1)).mean())
            seconds = time.perf_counter() - began
            elapsed += seconds
            session_s += seconds
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if accelerator.is_main_process and (step % config.log_every == 0 or spent(step, elapsed)):
                log({"step": step, "loss": value, "lr": lr, "seconds": round(seconds, 4),
                     "elapsed_s": round(elapsed, 3), **logs})
            if on_step_end is not None:
                on_step_end(step, value)
            paused = (flag.requested or (config.stop_after_steps is not None and len(losses) >= config.stop_after_steps)
                      or (config.pause_after_minutes is not None and session_s >= config.pause_after_minutes * 60))
            due = config.checkpoint_minutes is not None and time.monotonic() - last_save > config.checkpoint_minutes * 60
            if step % config.checkpoint_every == 0 or spent(step, elapsed) or paused or due:
                save_checkpoint(step, elapsed)
                last_save = time.monotonic()
            if paused and not spent(step, elapsed):
                stopped = True
                accelerator.print(f"stopped at step {step}; continue with --resume")
                break

    result = None
    if not stopped and accelerator.is_main_process:
        from consistent_diffusion.core.outputs import atomic_output_dir

        for module in task.run.values():
            module.eval()
        if ema is not None:
            ema.copy_to(task)
        result = config.out / task.result_name
        with atomic_output_dir(result, overwrite=True) as temp:
            task.export(temp)
            write_json_atomic({**record, "steps_done": step, "elapsed_s": round(elapsed, 3), "finished": utc_now()},
                              temp / "training.json")
    accelerator.wait_for_everyone()
    return TrainResult(out=config.out, result=result, step=step, losses=losses, stopped=stopped,
                       trainable_parameters=sum(p.numel() for p in params))


def write_validation_images(images: Sequence[Any], prompts: Sequence[str], folder: Path) -> None:
    """Save validation images and a contact sheet (one column per prompt)."""
    from consistent_diffusion.core.images import contact_sheet, save_png_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        save_png_atomic(image, folder / f"{index:02d}.png")
    if images:
        save_png_atomic(contact_sheet(list(images), columns=len(images), labels=[p[:20] for p in prompts]),
                        folder / "contact_sheet.png")
