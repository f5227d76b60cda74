"""Progress for the whole bench run: the prepare stage says which training runs, its step and the
time left, on one process (an event per step) and on `--workers N` (files the main process reads);
the cells come after it."""

import json

from PIL import Image

from consistent_diffusion.bench import progress as bench_progress
from consistent_diffusion.bench.progress import PrepareProgress
from consistent_diffusion.bench.runner import run_bench
from consistent_diffusion.bench.scoring import make_scorer
from consistent_diffusion.bench.suite import load_suite
from consistent_diffusion.bench.workers import WORKERS_DIR, _show_prepare
from consistent_diffusion.cli.main import main
from consistent_diffusion.models.loading import load_pipeline

EXTRACTORS = {"style": "palette", "object": "palette", "concept": "palette", "text": None, "diversity": None}

TASK = """
[[tasks]]
name = "{name}"
kind = "object"
prompts = ["a red cat"]
seeds = [0]
references = ["reference.png"]
methods = ["plain", "lora"]
"""
SUITE = """
name = "trained"
steps = 2
guidance = 3.0

[training.subject_lora]
kind = "lora"
instance_prompt = "sks emoji"
steps = 3
rank = 2
learning_rate = 1e-2

[methods.plain]
uses = []

[methods.lora]
uses = [{ method = "lora", weights = "{trained:subject_lora}" }]
prompt = "sks emoji, {prompt}"
"""


def _suite(tmp_path, tasks=("object-red",)):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "reference.png")
    path = tmp_path / "suite.toml"
    path.write_text(SUITE + "".join(TASK.replace("{name}", name) for name in tasks))
    return path


def test_one_process_reports_each_training_step_with_time_left_before_the_cells(tiny_sd_folder, tmp_path):
    suite = load_suite(_suite(tmp_path))
    log = []
    ran = run_bench(suite, tmp_path / "bench", lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS),
                    progress=False, on_prepare=lambda event: log.append(event),
                    after_cell=lambda cell: log.append(cell.id))
    assert sorted(ran) == ["object-red__lora", "object-red__plain"]
    events = [entry for entry in log if isinstance(entry, PrepareProgress)]
    assert log.index(events[-1]) < log.index("object-red__lora"), "the cells start after the prepare stage"
    assert events[0] == PrepareProgress(done=0, total=1)
    running = [event for event in events if event.running]
    assert {(e.task, e.training, e.steps, e.done, e.total) for e in running} == {("object-red", "subject_lora", 3, 0, 1)}
    assert [e.step for e in running] == [0, 1, 2, 3]
    assert running[1].seconds_left is None and running[2].seconds_left > 0 and running[3].seconds_left == 0
    assert running[2].line().startswith("training 1/1 object-red / subject_lora: step 2/3, 0:")
    assert events[-2:] == [PrepareProgress(done=1, total=1), PrepareProgress(done=1, total=1, finished=True)]

    cached = []
    (tmp_path / "bench" / "cells" / "object-red__lora" / "cell.json").unlink()
    run_bench(suite, tmp_path / "bench", lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS),
              progress=False, on_prepare=cached.append)
    assert not any(event.running for event in cached), "a cached training is not trained again"
    assert cached[-1] == PrepareProgress(done=1, total=1, finished=True)


class _Running:
    """A worker process that is still running; after ``calls`` polls it marks its trainings finished."""

    def __init__(self, folder, calls):
        self.folder, self.calls = folder, calls

    def poll(self):
        self.calls -= 1
        if self.calls == 0:
            bench_progress.ProgressFile(bench_progress.progress_path(self.folder, 0), interval=0)(
                PrepareProgress(done=2, total=2, finished=True))
        return None


def test_the_main_process_shows_every_workers_training_until_all_finished(tmp_path, monkeypatch):
    monkeypatch.setattr("consistent_diffusion.bench.workers.POLL_SECONDS", 0.01)
    write = bench_progress.ProgressFile(bench_progress.progress_path(tmp_path, 0), interval=0)
    write(PrepareProgress(done=1, total=2, task="object-red", training="subject_lora", step=40, steps=200,
                          seconds_left=130.0))
    bench_progress.ProgressFile(bench_progress.progress_path(tmp_path, 1))(
        PrepareProgress(done=1, total=1, finished=True))
    lines = []
    _show_prepare([(_Running(tmp_path, 3), None), (_Running(tmp_path, -1), None)], tmp_path, 2, progress=False,
                  on_prepare=lines.append)
    assert lines == ["trainings 2/3 | w0: training 2/2 object-red / subject_lora: step 40/200, 2:10 left"]


def test_workers_write_their_prepare_progress_for_the_main_process(tiny_sd_folder, tmp_path, capsys):
    path = _suite(tmp_path, tasks=("object-red", "object-blue"))
    out = tmp_path / "bench"
    assert main(["bench", "--suite", str(path), "--model", str(tiny_sd_folder), "--out", str(out), "--workers", "2",
                 "--extractors", json.dumps(EXTRACTORS)]) == 0
    events = bench_progress.read_progress(out / WORKERS_DIR, 2)
    assert all(event.finished for event in events)
    assert sorted(event.total for event in events) == [1, 1], "each worker trained one of the two"
    err = capsys.readouterr().err
    assert "prepare (2 workers)" in err and "bench (2 workers)" in err
    assert err.index("prepare (2 workers)") < err.index("bench (2 workers)"), "the cell bar starts after it"
