"""Run a suite's cells, resumably, sharded across processes; merge them into ``report.json``.

Output folder::

    cells/<task>__<method>/series/...   the cell's series (PNGs, contact sheet, manifest)
    cells/<task>__<method>/cell.json    scores + cost; written last, inside an atomic folder
    prepared/<task>__<training>/...     fine-tunings the cells need (``bench.prepare``), cached
    references/<task>.png               each task's first reference (shown in the report)
    report.json                         every cell, the method x kind table, validation status, and
                                        95% bootstrap intervals (``bench.stats``); each cell's distance
                                        to plain and within-series agreement (``bench.image_columns``)

A cell's folder appears only when complete, so a killed run resumes by skipping finished
cells. Two phases: first every (task, training) pair the cells need is trained, process i of n
taking pairs[i::n]; then, after a barrier, process i runs cells[i::n] (cells sorted by id); the
main process merges once every process is done, so a sharded run's report equals a
single-process one (timings aside). Under ``accelerate launch`` / ``torchrun`` the process index
and count come from ``accelerate.PartialState``; ``bench --workers N`` starts N processes itself.

Every cell generates and scores at ``Suite.threads`` torch threads (default 1), as every training
does: CPU kernels sum in an order that depends on the thread count, so at a fixed count the images
and scores are the same on any machine whatever ``OMP_NUM_THREADS`` says; a run
uses more cores through more processes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from consistent_diffusion.bench.image_columns import with_image_columns
from consistent_diffusion.bench.progress import PrepareBars, PrepareListener
from consistent_diffusion.bench.records import (
    CellCost,
    CellRecord,
    Report,
    Score,
    SuiteSummary,
    TaskSummary,
    TrainingRecord,
    summary_table,
)
from consistent_diffusion.bench.suite import Cell, Suite, Task, TrainingSpec
from consistent_diffusion.core.cpu_kernels import check_pinned, cpu_kernels_label, pin_cpu_kernels
from consistent_diffusion.core.outputs import atomic_output_dir, library_versions, utc_now, write_json_atomic
from consistent_diffusion.methods.base import get_method
from consistent_diffusion.models.loading import model_identity
from consistent_diffusion.series import SeriesConfig, generate_series

Scorer = Callable[..., dict[str, Any]]  # (cell, images, references, model=ModelIdentity) -> {metric: MetricResult dict}


@dataclass(frozen=True)
class Shard:
    """Which slice of the cells this process runs."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} out of range for {self.count} processes")

    def select(self, cells: list[Cell]) -> list[Cell]:
        return cells[self.index :: self.count]


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / cell.id


def is_done(out_dir: Path, cell: Cell) -> bool:
    return (cell_dir(out_dir, cell) / "cell.json").is_file()


def finished_cells(out_dir: Path, suite: Suite) -> int:
    """How many of the suite's cells have their record in ``out_dir`` (progress, resume)."""
    return sum(is_done(out_dir, cell) for cell in suite.cells)


def vae_roundtrip_psnr(pipe: Any, reference: str, size: tuple[int, int]) -> float:
    """PSNR (dB) of ``reference`` after the pipeline's VAE encode+decode: the ceiling any
    latent-space method (e.g. an exact inversion) can reach in pixel space."""
    from consistent_diffusion.core.imageops import psnr
    from consistent_diffusion.core.images import load_image, pil_to_tensor
    from consistent_diffusion.models.vae import decode_latents, encode_image

    decoded = decode_latents(pipe, encode_image(pipe, reference, size))[0]
    original = pil_to_tensor(load_image(reference, size))
    return round(float(psnr(pil_to_tensor(decoded), original)[0]), 3)


def prepare_cell(suite: Suite, cell: Cell, out_dir: Path, load_train_pipe: Callable[[], Any] | None,
                 progress: bool = False) -> list[TrainingRecord]:
    """The prepared trainings ``cell`` needs (trained now where not cached)."""
    from consistent_diffusion.bench.prepare import ensure_prepared

    if cell.method.trainings and load_train_pipe is None:
        raise ValueError(f"cell {cell.id} needs training but no pipeline factory was given for it")
    return [ensure_prepared(out_dir, cell.task, suite.trainings[name], load_train_pipe, progress=progress)
            for name in cell.method.trainings]


def training_units(suite: Suite, cells: list[Cell]) -> list[tuple[Task, TrainingSpec]]:
    """Every (task, training) pair ``cells`` need, once each, in cell order."""
    units: dict[tuple[str, str], tuple[Task, TrainingSpec]] = {}
    for cell in cells:
        for name in cell.method.trainings:
            units.setdefault((cell.task.name, name), (cell.task, suite.trainings[name]))
    return list(units.values())


def prepare_shard(suite: Suite, cells: list[Cell], out_dir: Path, load_train_pipe: Callable[[], Any],
                  shard: Shard = Shard(), progress: bool = False, on_prepare: PrepareListener | None = None) -> None:
    """Phase one: train this process's share of the trainings ``cells`` need (cached ones are
    skipped), after checking every training's options (a bad one fails before any work).
    on_prepare(PrepareProgress): at the start, after each training step and at each training's end."""
    from consistent_diffusion.bench.prepare import (
        check_trainings,
        ensure_prepared,
        is_prepared,
        training_steps,
    )
    from consistent_diffusion.bench.progress import PrepareProgress, StepTimer

    units = training_units(suite, cells)
    if units:
        check_trainings(suite)
    mine = shard.select(units)
    report = on_prepare or (lambda event: None)
    report(PrepareProgress(done=0, total=len(mine)))
    for done, (task, training) in enumerate(mine):
        if not is_prepared(out_dir, task, training):
            running = PrepareProgress(done=done, total=len(mine), task=task.name, training=training.name,
                                      steps=training_steps(training))
            timer = StepTimer(running.steps)
            report(running)

            def stepped(step: int, loss: float, running: PrepareProgress = running, timer: StepTimer = timer) -> None:
                if timer.first is None:  # the pace counts from the first step this session completed
                    timer.start(step)
                report(dataclasses.replace(running, step=step, seconds_left=timer.seconds_left(step)))

            ensure_prepared(out_dir, task, training, load_train_pipe, progress=progress and on_prepare is None,
                            on_step=stepped)
        report(PrepareProgress(done=done + 1, total=len(mine)))
    report(PrepareProgress(done=len(mine), total=len(mine), finished=True))


def run_cell(pipe: Any, suite: Suite, cell: Cell, out_dir: Path, scorer: Scorer, batch_size: int = 8,
             load_train_pipe: Callable[[], Any] | None = None, progress: bool = False) -> CellRecord:
    """Prepare (train what the cell needs), generate, score and write one cell atomically;
    returns its record. ``load_train_pipe`` gives a fresh float32 pipeline to fine-tune;
    ``progress`` shows a training's progress bar."""
    reference = cell.task.references[0] if cell.task.references else None
    prepared = prepare_cell(suite, cell, out_dir, load_train_pipe, progress=progress)
    trained = {training.training: training.artifact for training in prepared}
    methods = [get_method(name, **options)
               for name, options in cell.method.resolved(reference, trained, subject=cell.task.subject,
                                                         reference_prompt=cell.task.reference_prompt)]
    config = SeriesConfig(
        prompts=cell.method.prompts(cell.task.prompts),
        seeds=cell.task.seeds,
        steps=suite.steps,
        guidance_scale=suite.guidance,
        batch_size=batch_size,
    )
    from consistent_diffusion.bench.prepare import torch_threads

    with atomic_output_dir(cell_dir(out_dir, cell), overwrite=True) as temp, torch_threads(suite.threads):
        start = time.perf_counter()
        result = generate_series(pipe, config, methods, out_dir=temp / "series", progress=False)
        seconds = time.perf_counter() - start
        record = CellRecord(
            id=cell.id,
            task=cell.task.name,
            kind=cell.task.kind,
            family=cell.task.family,
            method=cell.method.name,
            stack=tuple(dict(use) for use in cell.method.uses),  # unresolved: "{reference}", no local paths
            prompt_template=cell.method.prompt,
            trainings=tuple(dataclasses.replace(training, artifact=None) for training in prepared),
            num_images=len(result.images),
            scores={name: Score.from_dict(value)
                    for name, value in scorer(cell, result.images, list(cell.task.references),
                                                      model=model_identity(pipe)).items()},
            reference_vae_psnr=vae_roundtrip_psnr(pipe, reference, result.images[0].size) if reference else None,
            cost=CellCost(
                seconds=round(seconds, 3),
                seconds_per_image=round(seconds / max(1, len(result.images)), 4),
                trainable_parameters=sum(training.trainable_parameters for training in prepared),
                train_seconds=round(sum(training.train_seconds for training in prepared), 2),
            ),
        )
        write_json_atomic(record.to_dict(), temp / "cell.json")
    return record


def run_bench(
    suite: Suite,
    out_dir: str | Path,
    load_pipe: Callable[[], Any],
    scorer: Scorer,
    shard: Shard = Shard(),
    batch_size: int = 8,
    progress: bool = True,
    after_cell: Callable[[Cell], None] | None = None,
    load_train_pipe: Callable[[], Any] | None = None,
    barrier: Callable[[], None] | None = None,
    on_prepare: PrepareListener | None = None,
) -> list[str]:
    """Run this process's unfinished cells; returns the ids it ran. First this process's share
    of the trainings the unfinished cells need (``prepare_shard``), then ``barrier()`` (every
    process waits for the others' trainings; None with one process), then the cells.
    ``load_pipe`` is called once, only if there are cells to run; ``load_train_pipe`` (default
    ``load_pipe``) once per training not cached yet: each training gets a fresh pipeline.
    on_prepare(PrepareProgress): the prepare stage's progress (default with ``progress``: a bar per
    training, ``bench.progress.PrepareBars``); the cell bar starts after it."""
    check_pinned(pin_cpu_kernels())  # the same numbers on any x86-64 CPU (core.cpu_kernels)
    out_dir = Path(out_dir)
    unfinished = [cell for cell in suite.cells if not is_done(out_dir, cell)]
    bars = PrepareBars(disable=not progress) if on_prepare is None else None
    try:
        prepare_shard(suite, unfinished, out_dir, load_train_pipe or load_pipe, shard, progress=progress,
                      on_prepare=on_prepare or bars)
    finally:
        if bars is not None:
            bars.close()
    if barrier is not None:
        barrier()
    todo = [cell for cell in shard.select(suite.cells) if not is_done(out_dir, cell)]
    ran: list[str] = []
    if not todo:
        return ran
    pipe = load_pipe()
    write_json_atomic({"model": model_identity(pipe).to_dict()}, out_dir / f"model.{shard.index}.json")
    with tqdm(todo, desc=f"bench {suite.name}", unit="cell", disable=not progress) as bar:
        for cell in bar:
            bar.set_postfix_str(cell.id)
            run_cell(pipe, suite, cell, out_dir, scorer, batch_size=batch_size,
                     load_train_pipe=load_train_pipe or load_pipe, progress=progress)
            ran.append(cell.id)
            if after_cell is not None:
                after_cell(cell)
    return ran


REFERENCES_DIR = "references"


def copy_references(suite: Suite, out_dir: Path) -> None:
    """Each task's first reference as ``references/<task>.png`` in the output folder, so the report
    shows it beside the cells without naming a path of the machine that ran it."""
    from consistent_diffusion.core.images import load_image, save_png_atomic

    for task in suite.tasks:
        target = out_dir / REFERENCES_DIR / f"{task.name}.png"
        if task.references and not target.is_file():
            save_png_atomic(load_image(task.references[0]), target)


def merge_report(suite: Suite, out_dir: str | Path) -> Report:
    """Collect every finished cell into ``report.json`` (complete only if no cell is missing)."""
    out_dir = Path(out_dir)
    records, missing = [], []
    for cell in suite.cells:
        path = cell_dir(out_dir, cell) / "cell.json"
        if path.is_file():
            records.append(CellRecord.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        else:
            missing.append(cell.id)
    models = sorted(out_dir.glob("model.*.json"))
    model = json.loads(models[0].read_text(encoding="utf-8"))["model"] if models else None
    report = Report(
        suite=SuiteSummary(
            name=suite.name, source=suite.source, steps=suite.steps, guidance=suite.guidance,
            tasks=tuple(TaskSummary(name=t.name, kind=t.kind, prompts=t.prompts, seeds=t.seeds, methods=t.methods,
                                    description=t.description, family=t.family) for t in suite.tasks),
            tuning=suite.tuning,
        ),
        model=model,
        complete=not missing,
        missing_cells=tuple(missing),
        cells=tuple(records),
        table=summary_table(records),
        created=utc_now(),
        versions={**library_versions(), "cpu_kernels": cpu_kernels_label()},
    )
    report = with_image_columns(report, out_dir, suite.threads)  # distance to plain, within series; intervals
    copy_references(suite, out_dir)
    write_json_atomic(report.to_dict(), out_dir / "report.json")
    return report
