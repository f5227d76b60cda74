"""The bench's prepare stage: fine-tune once per (task, training) before the cells that need it.

A suite's ``[training.NAME]`` (DreamBooth, LoRA DreamBooth or textual inversion) is trained on a task's reference
images, from a fresh float32 copy of the benchmarked model, and cached::

    prepared/<task>__<training>/prepared.json   what was trained, its cost, where the artifact is
    prepared/<task>__<training>/run/...         the training run (run/model or run/lora)
    prepared/class_images/...                   prior-preservation class images, shared

The folder is renamed into place only when training finished, so a killed bench resumes the
training from the run's own checkpoints (in ``<id>.partial<rank>``) and never uses half a model.
Its cost (training seconds, trainable parameters) is added to every cell that uses it.

Under ``torchrun`` each training runs inside the one process that needs it (``single_process``),
not data-parallel across the processes: a shard trains for its own cells, and the weights (so
the scores) are those of a one-process run. Two shards that need the same training both train
it; the first to finish is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from consistent_diffusion.bench.records import TrainingRecord
from consistent_diffusion.bench.suite import Suite, Task, TrainingSpec
from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import write_json_atomic

TRAINING_THREADS = 1  # torch CPU threads of every prepare-stage training (a suite may set ``threads``)
SET_BY_RUNNER = frozenset({"out", "instance_dir", "resume", "progress", "class_images_dir",
                           "single_process"})  # not suite options


def training_kind(kind: str) -> tuple[type, Callable[..., Any]]:
    """(config dataclass, train function) of a suite training of ``kind`` (``dreambooth`` | ``lora`` |
    ``textual_inversion``)."""
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora
    from consistent_diffusion.training.textual_inversion import (
        TextualInversionConfig,
        train_textual_inversion,
    )

    return {"dreambooth": (DreamBoothConfig, train_dreambooth), "lora": (LoraDreamBoothConfig, train_lora),
            "textual_inversion": (TextualInversionConfig, train_textual_inversion)}[kind]


def training_problems(suite: Suite) -> list[tuple[str, str, str]]:
    """(training, key, why) for every suite training option its config rejects: an unknown option
    name, one the runner sets itself, or a bad value (the config's own validation)."""
    problems = []
    for training in suite.trainings.values():
        config_class, _ = training_kind(training.kind)
        known = {f.name for f in dataclasses.fields(config_class)} - SET_BY_RUNNER
        unknown = sorted(set(training.options) - known)
        if unknown:
            problems += [(training.name, key, f"unknown options {unknown}; accepted: {', '.join(sorted(known))}")
                         for key in unknown[:1]]
            continue
        try:
            config_class(out=Path("."), instance_dir=Path("."), resume=True, progress=False,
                         **_normalised(training.options))
        except ConfigError as error:
            problems.append((training.name, _named_option(str(error), training.options), str(error)))
    return problems


def _named_option(message: str, options: dict[str, Any]) -> str:
    """The option a config's error message is about (its first word naming one), else ``options``."""
    return next((word for word in message.replace(",", " ").split() if word in options), "options")


def check_trainings(suite: Suite) -> None:
    """Raise ConfigError for the first suite training whose options its config rejects
    (``training_problems``)."""
    for name, _, why in training_problems(suite):
        raise ConfigError(f"training {name!r}: {why}")


def _normalised(options: dict[str, Any]) -> dict[str, Any]:
    """Suite options as the configs take them (TOML arrays -> tuples)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}


def prepared_dir(out_dir: Path, task: Task, training: TrainingSpec) -> Path:
    return out_dir / "prepared" / f"{task.name}__{training.name}"


def _instance_folder(task: Task, folder: Path) -> Path:
    """Copies of the task's references (the instance images) in their own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, reference in enumerate(task.references):
        shutil.copyfile(reference, folder / f"{index:02d}_{Path(reference).name}")
    return folder


def training_steps(training: TrainingSpec) -> int:
    """The steps ``training`` is planned for: its ``steps`` option or its config's default."""
    if "steps" in training.options:
        return int(training.options["steps"])
    config_class, _ = training_kind(training.kind)
    return int(next(f.default for f in dataclasses.fields(config_class) if f.name == "steps"))


def train_for_task(task: Task, training: TrainingSpec, run: Path, class_images: Path, load_pipe: Callable[[], Any],
                   progress: bool = False, on_step: Callable[[int, float], None] | None = None) -> tuple[Any, float]:
    """Train ``training`` on ``task``'s references into ``run``; returns (TrainResult, seconds).
    on_step(step, loss): after each training step (``bench.progress``)."""
    config_class, train = training_kind(training.kind)
    start = time.perf_counter()
    pipe = load_pipe()
    options = _normalised(training.options)
    options.setdefault("checkpoint_every", max(1, int(options.get("steps", 400)) // 2))
    # One torch thread unless the suite says otherwise: CPU kernels sum in an order that depends on
    # the thread count, and hundreds of fine-tuning steps grow those last-bit differences into other
    # weights; at a fixed count the trained weights (so the scores) do not depend on --threads.
    options.setdefault("threads", TRAINING_THREADS)
    options.setdefault("device", "cpu" if pipe.device.type == "cpu" else str(pipe.device))
    if any(f.name == "class_images_dir" for f in dataclasses.fields(config_class)):
        options["class_images_dir"] = class_images
    # Each training stays in this process, also under torchrun: a shard trains what its cells need, and
    # the weights are the same however many processes the bench ran in (``training.accelerators.LocalAccelerator``).
    config = config_class(out=run, instance_dir=_instance_folder(task, run.parent / "instance"), resume=True,
                          progress=progress, single_process=True, **options)
    with torch_threads(config.threads):  # class images (prior preservation) are made at the same count
        result = train(config, pipe, on_step_end=on_step)
    return result, time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``count`` (None: unchanged) inside the block, restored after."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_prepared(out_dir: Path, task: Task, training: TrainingSpec) -> bool:
    return (prepared_dir(out_dir, task, training) / "prepared.json").is_file()


def ensure_prepared(out_dir: Path, task: Task, training: TrainingSpec, load_pipe: Callable[[], Any],
                    progress: bool = False, on_step: Callable[[int, float], None] | None = None) -> TrainingRecord:
    """The record of ``training`` on ``task`` (trained now if not cached); its ``artifact`` is an
    absolute path to pass to the ``dreambooth`` / ``lora`` / ``textual_inversion`` method.
    on_step(step, loss): after each training step."""
    final = prepared_dir(out_dir, task, training)
    if not is_prepared(out_dir, task, training):
        # one partial folder per process: shards that need the same training never share one
        partial = final.with_name(f"{final.name}.partial{os.environ.get('RANK', '0')}")
        result, seconds = train_for_task(task, training, partial / "run", out_dir / "prepared" / "class_images",
                                         load_pipe, progress=progress, on_step=on_step)
        if result.stopped or result.result is None:
            raise ConsistentDiffusionError(f"training {training.name} for task {task.name} was stopped at step "
                                           f"{result.step}; run the same bench command again to resume it")
        shutil.rmtree(partial / "run" / "checkpoints", ignore_errors=True)  # the artifact is all a cell needs
        record = TrainingRecord(
            task=task.name,
            training=training.name,
            kind=training.kind,
            options=training.options,
            instance_images=len(task.references),
            steps=result.step,
            final_loss=round(sum(last := result.losses[-20:]) / len(last), 5) if result.losses else None,
            train_seconds=round(seconds, 2),
            trainable_parameters=result.trainable_parameters,
            artifact=os.path.relpath(result.result, partial),
        )
        write_json_atomic(record.to_dict(), partial / "prepared.json")
        if final.exists():  # another process finished the same training first
            shutil.rmtree(partial)
        else:
            os.replace(partial, final)
    record = TrainingRecord.from_dict(json.loads((final / "prepared.json").read_text(encoding="utf-8")))
    return dataclasses.replace(record, artifact=str((final / record.artifact).resolve()))
