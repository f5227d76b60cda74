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

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_torch_save, library_versions, utc_now, write_json_atomic
from consistent_diffusion.training.accelerators import LocalAccelerator, StopFlag
from consistent_diffusion.training.checkpoints import (
    CHECKPOINT_PATTERN,
    EMA,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    load_handoff,
    rng_states,
    set_rng_states,
)
from consistent_diffusion.training.loop_config import RESUMABLE_CHANGES, LoopConfig


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
            with torch.random.fork_rng(devices=[]), torch.no_grad(), accelerator.autocast():
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
    with StopFlag().installed() as flag, tqdm(
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
