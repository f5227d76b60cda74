"""What the web app runs, as plain library calls (no web code here): checked uploads, a series from
the page's form, a subject fine-tune, a bench run, a report folder opened, advice.

Every job writes where the CLI would (one output folder per job, with its manifest), so a job done
in the browser is re-created from the command line: a series folder by ``generate
--from-manifest``, any of its images by ``generate --from-image`` (the uploads a series reads are
kept under the jobs' ``inputs/`` folder, ``app.uploads``). The image prompt section is
``app.image_prompt``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consistent_diffusion.app.image_prompt import ImagePromptForm, image_prompt_method
from consistent_diffusion.app.uploads import (
    DEFAULT_LIMITS,
    UploadLimits,
    check_image,
    check_images,
    keep_upload,
)
from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.models.sampling import DEFAULT_STEPS

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)


def job_folder(root: str | os.PathLike, kind: str) -> Path:
    """A new output folder name for one job: ROOT/<kind>-<UTC time>[-n] (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(root) / f"{kind}-{stamp}"
    candidate, index = base, 1
    while candidate.exists():
        index += 1
        candidate = base.with_name(f"{base.name}-{index}")
    return candidate


def zip_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as ``folder.zip`` beside it (written atomically); returns the zip's path."""
    from consistent_diffusion.core.outputs import atomic_path

    folder = Path(folder)
    target = folder.with_suffix(".zip")
    with atomic_path(target) as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    return target


# -- make a series ----------------------------------------------------------------------------


@dataclass
class SeriesForm:
    """The "Make a series" form: what to generate and the method stack, as the page sends it."""

    prompts: str  # one prompt a line
    seeds: str = "0 1 2 3"  # numbers separated by spaces or commas
    steps: int = DEFAULT_STEPS
    guidance: float = 5.0  # the embedded model's setting (its model card)
    size: int | None = None  # square side in pixels (None: the model's own)
    negative_prompt: str = ""
    init_image: str | None = None  # img2img reference
    strength: float = 0.6
    style_image: str | None = None  # StyleAligned real reference
    style_prompt: str = ""  # StyleAligned generated reference (if no image)
    style_aligned: bool = False
    subject: str = ""  # consistent_subject word
    edit_image: str | None = None  # DDPM edit of an uploaded image
    edit_source_prompt: str = ""
    edit_skip: int = 0
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file, weight)
    dreambooth: str | None = None  # a DreamBooth run folder
    control_image: str | None = None
    control_preprocess: str = "canny"
    control_scale: float = 1.0
    controlnet: str = "default"
    offload: str | None = None  # the low-memory switches (models.memory.LowMemory) for this series
    vae_slicing: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False
    image_prompt: ImagePromptForm = field(default_factory=ImagePromptForm)  # style / subject image prompts

    def prompt_list(self) -> tuple[str, ...]:
        prompts = tuple(line.strip() for line in self.prompts.splitlines() if line.strip())
        if not prompts:
            raise ConfigError("write at least one prompt (one a line)")
        return prompts

    def seed_list(self) -> tuple[int, ...]:
        parts = [p for p in self.seeds.replace(",", " ").split() if p]
        try:
            seeds = tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"seeds must be whole numbers separated by spaces, got {self.seeds!r}") from None
        if not seeds:
            raise ConfigError("give at least one seed")
        return seeds


def form_methods(form: SeriesForm, limits: UploadLimits = DEFAULT_LIMITS, inputs: str | os.PathLike | None = None,
                 pipe: Any = None) -> list[Any]:
    """The method stack the form asks for, in the CLI's stacking order, uploads checked first. With
    ``inputs`` every upload is kept there (``keep_upload``) and the stack reads (and records) the
    kept copy; with ``pipe`` the image prompt's adapters are checked against it."""
    from consistent_diffusion.methods.base import get_method

    def upload(path: str, what: str) -> str:
        checked = check_image(path, limits, what)
        return str(keep_upload(checked, inputs) if inputs is not None else checked)

    methods: list[Any] = []
    if form.init_image and form.edit_image:
        raise ConfigError("img2img and DDPM edit both set the starting point; use one")
    if form.init_image:
        methods.append(get_method("img2img", image=upload(form.init_image, "img2img reference"),
                                  strength=float(form.strength)))
    if form.edit_image:
        methods.append(get_method("ddpm_edit", image=upload(form.edit_image, "image to edit"),
                                  source_prompt=form.edit_source_prompt, skip=int(form.edit_skip)))
    if form.subject.strip():
        methods.append(get_method("consistent_subject", subject=form.subject.strip()))
    if form.style_aligned or form.style_image or form.style_prompt.strip():
        options: dict[str, Any] = {}
        if form.style_image:
            options["reference_image"] = upload(form.style_image, "style reference")
        elif form.style_prompt.strip():
            options["reference_prompt"] = form.style_prompt.strip()
        methods.append(get_method("style_aligned", **options))
    image_prompt = image_prompt_method(form.image_prompt, upload, pipe)
    if image_prompt is not None:
        methods.append(image_prompt)
    if form.dreambooth:
        methods.append(get_method("dreambooth", model=form.dreambooth))
    if form.loras:
        methods.append(get_method("lora", weights=tuple(p for p, _ in form.loras),
                                  scales=tuple(float(w) for _, w in form.loras)))
    if form.control_image:
        methods.append(get_method("controlnet", controlnets=form.controlnet,
                                  images=upload(form.control_image, "control image"),
                                  preprocess=form.control_preprocess, scales=(float(form.control_scale),)))
    return methods


@dataclass
class SeriesJob:
    """A finished series: its folder (manifest, PNGs with recipes, contact sheet), a zip of it and its scores."""

    folder: Path
    images: list[Path]
    contact_sheet: Path
    manifest: Path
    archive: Path
    scores: dict[str, dict[str, Any]]


def make_series(pipe: Any, form: SeriesForm, out_root: str | os.PathLike, limits: UploadLimits = DEFAULT_LIMITS,
                progress: bool = True) -> SeriesJob:
    """Generate the form's series into a new job folder, zip it and score it (style, object, text,
    diversity, each with its validation status; the references are the uploads the stack reads).
    Uploads are kept in ``out_root/inputs`` (the manifest and the PNGs' recipes name those copies)."""
    from consistent_diffusion.models.memory import LowMemory, low_memory_applied
    from consistent_diffusion.series import SeriesConfig, generate_series, image_filename

    methods = form_methods(form, limits, inputs=Path(out_root) / "inputs", pipe=pipe)
    size = int(form.size) if form.size else None
    config = SeriesConfig(prompts=form.prompt_list(), seeds=form.seed_list(), steps=int(form.steps),
                          guidance_scale=float(form.guidance), height=size, width=size,
                          negative_prompt=form.negative_prompt or "")
    low_memory = LowMemory(offload=form.offload or None, vae_slicing=bool(form.vae_slicing),
                           vae_tiling=bool(form.vae_tiling), attention_slicing=bool(form.attention_slicing))
    folder = job_folder(out_root, "series")
    with low_memory_applied(pipe, low_memory):
        result = generate_series(pipe, config, methods, out_dir=folder, progress=progress)
    prompted = form.image_prompt
    references = [p for p in (form.style_image, form.init_image, form.edit_image, prompted.style_image,
                              prompted.subject_image) if p]
    scores = series_scores(pipe, result.images, [p for _, p, _ in config.items], references)
    return SeriesJob(folder=folder, images=[folder / image_filename(i, s) for i, _, s in config.items],
                     contact_sheet=folder / "contact_sheet.png", manifest=folder / "manifest.json",
                     archive=zip_folder(folder), scores=scores)


def series_scores(pipe: Any, images: list[Any], prompts: list[str], references: list[str]) -> dict[str, dict[str, Any]]:
    """{metric: {"value", "validated", "note"}} for style, object, text, diversity (``metrics.score``)."""
    from consistent_diffusion.metrics.score import score

    results = score(images, prompts=prompts, references=references or None, model=pipe)
    table = {}
    for name, result in results.items():
        data = result.to_dict()
        value = data.get("aggregate")
        table[name] = {"value": None if value is None else round(float(value), 4), "validated": data.get("validated"),
                       "note": (data.get("details") or {}).get("not_measured", "")}
    return table


# -- fine-tune a subject ------------------------------------------------------------------------


class Cancelled(ConsistentDiffusionError):
    """Raised by a training step when the user cancelled; the last checkpoint stays."""


@dataclass
class SubjectTraining:
    """A fine-tune from the page: the run folder, its result (None if cancelled) and losses."""

    run: Path
    result: Path | None
    steps: int
    losses: list[float]
    cancelled: bool = False


def train_subject(pipe: Any, images: Sequence[str | os.PathLike], out_root: str | os.PathLike, kind: str = "lora",
                  instance_prompt: str = "sks emoji", steps: int = 200, learning_rate: float | None = None,
                  on_step: Callable[[int, float], None] | None = None, cancel: threading.Event | None = None,
                  limits: UploadLimits = DEFAULT_LIMITS) -> SubjectTraining:
    """LoRA DreamBooth (``kind="lora"``) or full DreamBooth on 3-20 uploaded images, into a new run
    folder; ``on_step(step, loss)`` after every step; setting ``cancel`` stops after the current
    step, keeping the last checkpoint (written every 25 steps), so ``--resume`` continues it."""
    if kind not in ("lora", "dreambooth"):
        raise ConfigError(f"kind must be lora or dreambooth, got {kind!r}")
    checked = check_images(list(images), limits, "subject image")
    if len(checked) < 3:
        raise ConfigError(f"upload 3-20 images of the subject; got {len(checked)}")
    run = job_folder(out_root, f"train-{kind}")
    instance = run / "instance"
    instance.mkdir(parents=True)
    for index, path in enumerate(checked):
        shutil.copyfile(path, instance / f"{index:02d}{path.suffix.lower()}")

    def step_end(step: int, loss: float) -> None:
        if on_step is not None:
            on_step(step, loss)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled at step {step}")

    common = {"out": run / "run", "instance_dir": instance, "instance_prompt": instance_prompt, "steps": int(steps),
              "checkpoint_every": 25, "progress": False, "validation_prompts": (instance_prompt,)}
    try:
        if kind == "lora":
            from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora

            config = LoraDreamBoothConfig(**common, learning_rate=learning_rate or 1e-3)
            result = train_lora(config, pipe, on_step_end=step_end)
        else:
            from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth

            config = DreamBoothConfig(**common, learning_rate=learning_rate or 1e-4)
            result = train_dreambooth(config, pipe, on_step_end=step_end)
    except Cancelled:
        from consistent_diffusion.training.checkpoints import list_checkpoints

        done = list_checkpoints(run / "run")
        return SubjectTraining(run=run, result=None, steps=done[-1][0] if done else 0, losses=[], cancelled=True)
    return SubjectTraining(run=run, result=result.result, steps=result.step, losses=list(result.losses))


# -- compare ------------------------------------------------------------------------------------


def open_report(folder: str | os.PathLike) -> dict[str, Any]:
    """A bench output folder for the page: {"rows", "claims", "plots" (SVG), "images" (paths), "report"}."""
    from consistent_diffusion.bench.claims import evaluate_claims
    from consistent_diffusion.bench.records import load_report
    from consistent_diffusion.bench.report import COLUMNS, main_table_rows, trade_off_plots

    folder = Path(folder)
    if not (folder / "report.json").is_file():
        raise ConfigError(f"{folder} holds no report.json (a `consistent-diffusion bench --out` folder)")
    report = load_report(folder)
    if not report.intervals:  # a report from before intervals were stored: compute them
        import dataclasses

        from consistent_diffusion.bench.stats import report_intervals

        report = dataclasses.replace(report, intervals=report_intervals(report))
    rows = [[row[key] for key, _ in COLUMNS] for row in main_table_rows(report)]
    images = [(folder / "cells" / cell.id / "series" / "contact_sheet.png", cell.id) for cell in report.cells]
    return {"columns": [title for _, title in COLUMNS], "rows": rows, "claims": evaluate_claims(report),
            "plots": trade_off_plots(report), "images": [(str(p), c) for p, c in images if p.is_file()],
            "report": report}


def run_quick_bench(load_pipe: Callable[[], Any], out_root: str | os.PathLike, suite: str = "quick",
                    after_cell: Callable[[Any], None] | None = None, model_argv: list[str] | None = None,
                    workers: int = 1, on_progress: Callable[[int, int], None] | None = None,
                    on_prepare: Callable[[str], None] | None = None) -> Path:
    """Run a bench suite into a new job folder (resumable like the CLI's), merge and render it.

    With ``model_argv`` (the model's command-line arguments) and ``workers`` > 1 the cells run on
    that many processes of ``consistent-diffusion bench`` (``bench.workers``), else here, one
    thread per cell. after_cell(cell) / on_progress(done, total): progress, per cell or counted;
    on_prepare(line): the fine-tunings before the cells (which training, its step, time left)."""
    from consistent_diffusion.bench.report import write_reports
    from consistent_diffusion.bench.runner import finished_cells, merge_report, run_bench
    from consistent_diffusion.bench.scoring import make_scorer
    from consistent_diffusion.bench.suite import load_suite
    from consistent_diffusion.bench.suite_checks import check_suite_for_bench

    loaded = load_suite(suite)
    check_suite_for_bench(loaded, suite)
    folder = job_folder(out_root, "bench")
    total = len(loaded.cells)
    if model_argv is not None and workers > 1:
        from consistent_diffusion.bench.workers import run_workers

        run_workers(["bench", "--suite", suite, "--out", str(folder), *model_argv], folder, workers, loaded.threads,
                    done_cells=lambda: finished_cells(folder, loaded), total_cells=total,
                    progress=False, on_progress=None if on_progress is None else lambda done: on_progress(done, total),
                    on_prepare=on_prepare)
    else:
        def counted(cell: Any) -> None:
            if after_cell is not None:
                after_cell(cell)
            if on_progress is not None:
                on_progress(finished_cells(folder, loaded), total)

        run_bench(loaded, folder, load_pipe, make_scorer(), progress=False, after_cell=counted,
                  on_prepare=None if on_prepare is None else lambda event: on_prepare(event.line()))
    write_reports(merge_report(loaded, folder), folder)
    return folder


def advice(report: Any, needs: str, constraints: Any = None) -> str:
    """The advisor's text for a comma list of needs."""
    from consistent_diffusion.bench.advisor import advise, format_advice, parse_needs

    parsed = parse_needs(needs)
    dropped: list[tuple[str, str]] = []
    return format_advice(advise(report, parsed, constraints=constraints, dropped=dropped), parsed, dropped)
