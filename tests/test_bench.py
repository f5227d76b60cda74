"""The bench end to end on a tiny pipeline: two cells, kill + resume, 2-process merge; the
typed records against the JSON they read and write; the built-in suites."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from consistent_diffusion.bench.records import (
    CellRecord,
    Report,
    Score,
    TrainingRecord,
    as_report,
    load_report,
)
from consistent_diffusion.bench.runner import merge_report, run_bench, run_cell
from consistent_diffusion.bench.scoring import make_scorer
from consistent_diffusion.bench.suite import available_suites, load_suite
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.models.loading import load_pipeline

EXTRACTORS = {"style": "palette", "object": "palette", "concept": "palette", "text": None, "diversity": None}

SUITE = """
name = "two-cells"
steps = 2
guidance = 3.0

[methods.plain]
uses = []

[methods.img2img]
uses = [{ method = "img2img", image = "{reference}", strength = 0.5 }]

[[tasks]]
name = "style-red"
kind = "style"
prompts = ["a red cat", "a red dog"]
seeds = [0, 1]
references = ["reference.png"]
methods = ["plain", "img2img"]
"""


@pytest.fixture
def suite_file(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "reference.png")
    path = tmp_path / "suite.toml"
    path.write_text(SUITE)
    return path


def _approx_equal(a, b, tolerance=1e-2):
    """Nested equality, floats within ``tolerance`` (thread counts change the last bits)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_approx_equal(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_approx_equal(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tolerance * max(1.0, abs(a))
    return a == b


def _scores(report):
    return {cell.id: {name: score.to_dict() for name, score in cell.scores.items()} for cell in as_report(report).cells}


def _round_trips(path, record_class):
    """The file's JSON read into ``record_class`` and written back gives the same text."""
    from consistent_diffusion.core.outputs import write_json_atomic

    text = path.read_text(encoding="utf-8")
    copy = path.with_name(f"copy-{path.name}")
    write_json_atomic(record_class.from_dict(json.loads(text)).to_dict(), copy)
    same = copy.read_text(encoding="utf-8") == text
    copy.unlink()
    return same


def test_run_kill_resume_and_report(suite_file, tiny_sd_folder, tmp_path):
    suite = load_suite(suite_file)
    assert [cell.id for cell in suite.cells] == ["style-red__img2img", "style-red__plain"]
    out = tmp_path / "bench"
    scorer = make_scorer(EXTRACTORS)
    loads = []

    def load():
        loads.append(1)
        return load_pipeline(str(tiny_sd_folder))

    def killed_after_first(cell):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(suite, out, load, scorer, progress=False, after_cell=killed_after_first)
    finished = sorted(p.name for p in (out / "cells").iterdir())
    assert finished == ["style-red__img2img"]  # complete or absent, nothing half-written
    assert (out / "cells" / "style-red__img2img" / "cell.json").is_file()
    mtime = (out / "cells" / "style-red__img2img" / "cell.json").stat().st_mtime_ns

    assert run_bench(suite, out, load, scorer, progress=False) == ["style-red__plain"]
    assert (out / "cells" / "style-red__img2img" / "cell.json").stat().st_mtime_ns == mtime
    assert run_bench(suite, out, load, scorer, progress=False) == []
    assert len(loads) == 2  # no model load when there is nothing left to do

    report = merge_report(suite, out)
    assert report.complete and len(report.cells) == 2
    for cell in report.cells:
        assert {"style", "diversity", "reference_object", "reference_fidelity"} <= set(cell.scores)
        assert cell.num_images == 4
        assert 0.0 < cell.aggregate("reference_psnr") < 100.0
        assert _round_trips(out / "cells" / cell.id / "cell.json", CellRecord)
    # the two methods really produced different series
    cells = {cell.id: cell for cell in report.cells}
    assert cells["style-red__img2img"].aggregate("reference_psnr") != cells["style-red__plain"].aggregate("reference_psnr")
    assert "/" not in json.dumps([list(c.stack) for c in report.cells])  # no local paths in the report
    assert _round_trips(out / "report.json", Report)
    assert load_report(out) == report

    from consistent_diffusion.bench.report import write_reports

    md, page = write_reports(report, out)
    assert "style-red__plain" in md.read_text() and "<svg" in page.read_text()
    assert "cells/style-red__plain/series/contact_sheet.png" in page.read_text()
    assert (out / "references" / "style-red.png").is_file(), "the reference travels with the report"
    assert "stroke-opacity" in page.read_text(), "error bars on the plots"
    assert "vs plain, paired [95% CI]" in md.read_text()
    difference = report.cell_interval("style-red__img2img", "style", "vs_plain")
    assert difference is not None and difference.low <= difference.mean <= difference.high


def _bench_in_two_processes(suite_file, model, out, port, timeout):
    """``torchrun --nproc_per_node 2 -m consistent_diffusion bench`` on ``suite_file``, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "consistent_diffusion", "bench", "--suite", str(suite_file), "--model", str(model),
               "--out", str(out), "--quiet", "--extractors", json.dumps(EXTRACTORS)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=timeout, check=False)


def test_two_processes_merge_equals_single_process(suite_file, tiny_sd_folder, tmp_path):
    suite = load_suite(suite_file)
    single = tmp_path / "single"
    run_bench(suite, single, lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS), progress=False)
    expected = merge_report(suite, single)

    sharded = tmp_path / "sharded"
    completed = _bench_in_two_processes(suite_file, tiny_sd_folder, sharded, port=29533, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    merged = load_report(sharded)
    assert merged.complete
    assert _approx_equal(_scores(merged), _scores(expected))
    assert not _approx_equal(_scores(merged), {k: {} for k in _scores(expected)})
    assert merged.table.keys() == expected.table.keys()


def test_suite_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown suite 'nope'"):
        load_suite("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tasks]]\nname="t"\nkind="colour"\nprompts=["a"]\nseeds=[0]\nmethods=["plain"]\n')
    with pytest.raises(ConfigError, match="kind 'colour' is not one of"):
        load_suite(bad)
    bad.write_text('[[tasks]]\nname="t"\nkind="style"\nprompts=["a"]\nseeds=[0]\nmethods=["x"]\n')
    with pytest.raises(ConfigError, match="undefined methods"):
        load_suite(bad)


def test_advisor_ranks_by_measured_gain_and_respects_constraints(suite_file, tiny_sd_folder, tmp_path):
    from consistent_diffusion.bench.advisor import advise, format_advice

    suite = load_suite(suite_file)
    out = tmp_path / "bench"
    run_bench(suite, out, lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS), progress=False)
    report = merge_report(suite, out)
    ranked = advise(report, ["style"])
    assert {rec.method for rec in ranked} == {"plain", "img2img"}
    assert ranked[0].score >= ranked[-1].score
    assert all(rec.method != "img2img" for rec in advise(report, ["style"], have="text-only"))
    assert "gain" in format_advice(ranked, ["style"])


TRAINING_SUITE = """
name = "trained"
steps = 2
guidance = 3.0

[training.subject_lora]
kind = "lora"
instance_prompt = "sks emoji"
steps = 2
rank = 2
learning_rate = 1e-2

[training.subject_full]
kind = "dreambooth"
instance_prompt = "sks emoji"
class_prompt = "emoji"
prior_preservation = true
num_class_images = 2
class_steps = 2
steps = 2
learning_rate = 1e-3

[methods.lora]
uses = [{ method = "lora", weights = "{trained:subject_lora}" }]
prompt = "sks emoji, {prompt}"

[methods.dreambooth]
uses = [{ method = "dreambooth", model = "{trained:subject_full}" }]
prompt = "sks emoji, {prompt}"

[[tasks]]
name = "object-red"
kind = "object"
prompts = ["a red cat"]
seeds = [0, 1]
references = ["reference.png"]
methods = ["lora", "dreambooth"]
"""


def test_cells_that_need_training_are_prepared_once_and_costed(suite_file, tiny_sd_folder, tmp_path):
    path = tmp_path / "trained.toml"
    path.write_text(TRAINING_SUITE)
    suite = load_suite(path)
    assert suite.methods["lora"].trainings == ["subject_lora"]
    out = tmp_path / "bench"
    loads = []

    def load():
        loads.append(1)
        return load_pipeline(str(tiny_sd_folder))

    assert sorted(run_bench(suite, out, load, make_scorer(EXTRACTORS), progress=False)) == [
        "object-red__dreambooth", "object-red__lora"]
    assert len(loads) == 3, "one pipeline to generate with, a fresh one per training"
    prepared = {p.name: json.loads((p / "prepared.json").read_text()) for p in (out / "prepared").iterdir()
                if (p / "prepared.json").is_file()}
    assert sorted(prepared) == ["object-red__subject_full", "object-red__subject_lora"]
    assert not list((out / "prepared").glob("*.partial*"))
    lora, full = prepared["object-red__subject_lora"], prepared["object-red__subject_full"]
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"]
    assert lora["steps"] == full["steps"] == 2 and lora["instance_images"] == 1
    assert _round_trips(out / "prepared" / "object-red__subject_lora" / "prepared.json", TrainingRecord)
    report = merge_report(suite, out)
    cells = {cell.method: cell for cell in report.cells}
    for name, record in (("lora", lora), ("dreambooth", full)):
        assert cells[name].cost.trainable_parameters == record["trainable_parameters"]
        assert cells[name].cost.train_seconds > 0
        assert cells[name].trainings[0].training == record["training"]
        assert cells[name].trainings[0].artifact is None, "a cell's copy of the training names no local path"
        assert cells[name].needs_training and cells[name].needs_reference
    manifest = json.loads((out / "cells" / "object-red__lora" / "series" / "manifest.json").read_text())
    assert "sks emoji, a red cat" in json.dumps(manifest)
    assert "/" not in json.dumps([list(c.stack) for c in report.cells])
    from consistent_diffusion.bench.advisor import advise, format_advice

    advice = format_advice(advise(report, ["object"]), ["object"])
    assert "s of training per subject" in advice and "trainable parameters" in advice
    assert advise(report, ["object"], allow_training=False) == []
    assert advise(report, ["object"], have="text-only") == [], "trained on the task's reference images"

    stamp = (out / "prepared" / "object-red__subject_lora" / "prepared.json").stat().st_mtime_ns
    for cell in ("object-red__lora", "object-red__dreambooth"):
        shutil.rmtree(out / "cells" / cell)
    assert len(run_bench(suite, out, load, make_scorer(EXTRACTORS), progress=False)) == 2
    assert len(loads) == 4, "trainings are cached: only the generation pipeline is loaded again"
    assert (out / "prepared" / "object-red__subject_lora" / "prepared.json").stat().st_mtime_ns == stamp
    assert _scores(merge_report(suite, out)) == _scores(report), "same seeds, same cached weights, same images"


def test_training_suite_errors_are_clear(tmp_path):
    from consistent_diffusion.bench.prepare import check_trainings

    bad = tmp_path / "bad.toml"
    head = '[methods.m]\nuses=[{ method = "lora", weights = "{trained:x}" }]\n'
    task = '[[tasks]]\nname="t"\nkind="object"\nprompts=["a"]\nseeds=[0]\nmethods=["m"]\n'
    bad.write_text(head + task)
    with pytest.raises(ConfigError, match="undefined trainings"):
        load_suite(bad)
    bad.write_text('[training.x]\nkind="lora"\ninstance_prompt="sks"\n' + head + task)
    with pytest.raises(ConfigError, match="has none"):
        load_suite(bad)
    Image.new("RGB", (32, 32)).save(tmp_path / "reference.png")
    with_references = task + 'references=["reference.png"]\n'
    bad.write_text('[training.x]\nkind="lora"\ninstance_prompt="sks"\nrnak=4\n' + head + with_references)
    with pytest.raises(ConfigError, match="unknown options \\['rnak'\\]"):
        check_trainings(load_suite(bad))
    bad.write_text('[training.x]\nkind="lora"\ninstance_prompt="sks"\nout="here"\n' + head + with_references)
    with pytest.raises(ConfigError, match="unknown options \\['out'\\]"):
        check_trainings(load_suite(bad))
    bad.write_text('[training.x]\nkind="hypernetwork"\n' + head + task)
    with pytest.raises(ConfigError, match="not one of dreambooth, lora, textual_inversion"):
        load_suite(bad)
    bad.write_text('[training.x]\nkind="textual_inversion"\ninstance_prompt="sks"\n' + head + task)
    with pytest.raises(ConfigError, match="needs placeholder_token, initializer_token"):
        load_suite(bad)
    bad.write_text('[methods.m]\nuses=[]\nprompt="sks"\n' + task)
    with pytest.raises(ConfigError, match="template"):
        load_suite(bad)


def test_a_bad_training_option_fails_before_any_model_loads(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "reference.png")
    path = tmp_path / "bad.toml"
    path.write_text(TRAINING_SUITE.replace("rank = 2", "rank = 0"))
    suite = load_suite(path)  # parsing does not import the training configs
    loads = []
    with pytest.raises(ConfigError, match="training 'subject_lora': rank must be a positive integer"):
        run_bench(suite, tmp_path / "bench", lambda: loads.append(1), make_scorer(EXTRACTORS), progress=False)
    assert loads == [] and not (tmp_path / "bench" / "cells").exists()


ROOT = Path(__file__).resolve().parents[1]
REFERENCE_REPORTS = [(ROOT / "src" / "consistent_diffusion" / "assets" / "bench" / "report.json", "standard"),
                     (ROOT / "docs" / "bench" / "report.json", "standard"),
                     (ROOT / "docs" / "bench-quick" / "report.json", "quick")]


@pytest.mark.parametrize(("path", "suite"), REFERENCE_REPORTS, ids=["shipped", "docs", "docs-quick"])
def test_committed_reference_reports_round_trip_exactly(path, suite):
    """The committed evidence is the standard suite's report (docs/bench, and the package's copy
    that `advise` reads); the quick suite's smoke view sits in docs/bench-quick."""
    assert _round_trips(path, Report)
    report = load_report(path)
    assert report.complete and report.suite.name == suite
    assert sorted(c.id for c in report.cells) == [c.id for c in load_suite(suite).cells], "every cell of the suite"
    from consistent_diffusion.bench.records import summary_table

    assert summary_table(report.cells) == report.table, "the table is the mean of the cells' scores"
    plain = report.plain("object-cricket")
    assert plain is not None and plain.is_plain and plain.consistency is plain.scores["object"]
    style = report.plain("style-unseen-gear")
    assert style.family == "style-unseen" and style.consistency is style.scores["reference_style"]
    assert [cell.id for cell in report.select(["ddpm_edit"], task="inversion-giraffe")] == [
        "inversion-giraffe__ddpm_reconstruct"]
    assert report.suite.tuning["ddpm_edit_skip"].startswith("12"), "the report records how options were chosen"


def test_score_keeps_unknown_keys_and_reads_metric_results():
    data = {"name": "text_alignment", "extractor": None, "aggregate": None, "per_image": [], "higher_is_better": True,
            "range": [-1.0, 1.0], "validated": None, "validation": None, "details": {}, "measured": False}
    assert Score.from_dict(data).to_dict() == data and list(Score.from_dict(data).to_dict()) == list(data)
    assert not Score.from_dict(data).measured
    from consistent_diffusion.metrics.common import MetricResult

    result = MetricResult(name="style_consistency", extractor="palette", per_image=[0.5, 0.7], aggregate=0.6)
    assert Score.from_dict(result).to_dict() == result.to_dict()


def test_validation_status_of_a_report():
    def cell(task, **validated):
        return {"task": task, "kind": "style", "method": "plain",
                "scores": {name: {"aggregate": 0.5, "validated": flag} for name, flag in validated.items()}}

    report = Report.from_dict({"cells": [cell("a", style=True, text=True, diversity=None),
                                         cell("b", style=True, text=False, diversity=None)]})
    assert report.validation_status == {"style": True, "text": False, "diversity": None}
    assert report.complete and report.missing_cells == ()


def test_parsing_a_suite_imports_neither_torch_nor_training():
    code = ("import sys\n"
            "from consistent_diffusion.bench.suite import load_suite, available_suites\n"
            "from consistent_diffusion.bench.records import load_report\n"
            "from consistent_diffusion.bench.advisor import advise\n"
            "from consistent_diffusion.bench.report import render_markdown\n"
            "from consistent_diffusion.bench.claims import evaluate_claims\n"
            "for name in available_suites(): load_suite(name)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')\n"
            "               or m.startswith('consistent_diffusion.training'))\n"
            "print(heavy)\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert completed.stdout.strip() == "[]", completed.stdout


def test_builtin_suites_trainings_build_their_configs():
    from consistent_diffusion.bench.prepare import check_trainings

    assert {"quick", "new-subject"} <= set(available_suites())
    for name in available_suites():
        check_trainings(load_suite(name))


NEW_SUBJECT_VARIANTS = ["plain", "img2img_60"] + [
    f"{kind}{prior}_lr{lr}" for kind, rates in (("lora", ("1e-3", "5e-3")), ("dreambooth", ("1e-4", "5e-4")))
    for lr in rates for prior in ("", "_prior")]


def test_new_subject_suite_lists_the_study():
    suite = load_suite("new-subject")
    subjects = {"new-subject-blue-heart": "blue heart", "new-subject-lizard": "lizard", "new-subject-onion": "onion"}
    assert (suite.steps, suite.guidance, suite.source) == (20, 7.5, "built-in:new-subject")
    assert [cell.id for cell in suite.cells] == sorted(f"{task}__{method}" for task in subjects
                                                       for method in NEW_SUBJECT_VARIANTS)
    for task in suite.tasks:
        name = subjects[task.name]
        assert task.kind == "object" and task.seeds == (0, 1, 2, 3)
        assert task.prompts == (f"{name}, google style", f"{name}, twitter style")
        assert [Path(ref).name for ref in task.references] == [f"{name.replace(' ', '_')}_{style}.png"
                                                                for style in ("google", "twitter")]
        assert all(Image.open(ref).size == (64, 64) for ref in task.references)
    assert suite.methods["plain"].uses == () and suite.methods["img2img_60"].uses[0]["strength"] == 0.6
    for method in NEW_SUBJECT_VARIANTS[2:]:
        spec, (training,) = suite.methods[method], suite.methods[method].trainings
        kind = method.split("_")[0]
        assert training == method and suite.trainings[training].kind == kind
        assert spec.prompts(("lizard, google style",)) == ("sks emoji, lizard, google style",)
        options = suite.trainings[training].options
        assert options["prior_preservation"] == ("_prior" in method)
        assert options["learning_rate"] == float(method.rsplit("_lr", 1)[1])
        assert (options["steps"], options["batch_size"], options["num_class_images"]) == (300, 2, 16)
        assert options.get("rank") == (8 if kind == "lora" else None)


def test_a_new_subject_cell_runs_on_a_tiny_pipeline(tiny_sd_folder, tmp_path):
    """One fine-tuned cell of the study (LoRA with prior preservation), shrunk to single steps."""
    from consistent_diffusion.models.loading import load_pipeline

    suite = load_suite("new-subject")
    name = "lora_prior_lr5e-3"
    training = suite.trainings[name]
    small = dataclasses.replace(training, options={**training.options, "steps": 1, "num_class_images": 1,
                                                   "class_steps": 1})
    suite = dataclasses.replace(suite, steps=1, trainings={**suite.trainings, name: small})
    cell = next(cell for cell in suite.cells if cell.id == f"new-subject-lizard__{name}")
    record = run_cell(load_pipeline(str(tiny_sd_folder)), suite, cell, tmp_path, make_scorer(EXTRACTORS), batch_size=8,
                      load_train_pipe=lambda: load_pipeline(str(tiny_sd_folder)))
    assert record.num_images == 8 and record.kind == "object"
    assert {"object", "reference_object", "reference_fidelity", "reference_psnr"} <= set(record.scores)
    assert record.trainings[0].options["prior_preservation"] is True and record.cost.trainable_parameters > 0
    assert record == CellRecord.from_dict(json.loads((tmp_path / "cells" / cell.id / "cell.json").read_text()))


def test_textual_inversion_and_consistent_subject_cells(suite_file, tiny_sd_folder, tmp_path):
    """A textual-inversion training (no class images, its own required options) and a
    consistent-subject stack whose subject word comes from the task (``{subject}``)."""
    path = tmp_path / "new.toml"
    path.write_text("""
name = "new-methods"
steps = 2
guidance = 3.0

[training.concept_ti]
kind = "textual_inversion"
placeholder_token = "<sks-thing>"
initializer_token = "cat"
templates = ["a {}"]
steps = 2
batch_size = 1

[methods.textual_inversion]
uses = [{ method = "textual_inversion", embeddings = "{trained:concept_ti}" }]
prompt = "<sks-thing>, {prompt}"

[methods.consistent_subject]
uses = [{ method = "consistent_subject", subject = "{subject}", reference_image = "{reference}", reference_image_prompt = "a {subject}" }]

[[tasks]]
name = "object-red"
kind = "object"
subject = "cat"
prompts = ["a red cat", "a blue cat"]
seeds = [0]
references = ["reference.png"]
methods = ["textual_inversion", "consistent_subject"]
""")
    suite = load_suite(path)
    from consistent_diffusion.bench.prepare import check_trainings

    check_trainings(suite)
    out = tmp_path / "bench"
    done = run_bench(suite, out, lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS), progress=False)
    assert sorted(done) == ["object-red__consistent_subject", "object-red__textual_inversion"]
    prepared = json.loads((out / "prepared" / "object-red__concept_ti" / "prepared.json").read_text())
    assert prepared["kind"] == "textual_inversion" and prepared["trainable_parameters"] == 32  # one 32-d vector
    stack = json.loads((out / "cells" / "object-red__consistent_subject" / "series" / "manifest.json").read_text())
    assert stack["methods"][0]["options"]["subject"] == "cat"
    assert stack["methods"][0]["options"]["reference_image_prompt"] == "a cat"


def test_training_cells_under_two_processes_equal_one_process(tiny_sd_folder, tmp_path):
    """Each shard fine-tunes what its own cells need inside its own process (not data-parallel
    across the processes, which crashed: rank 0 trained a DreamBooth while rank 1 trained a LoRA),
    so a sharded run's scores are those of a one-process run."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "reference.png")
    path = tmp_path / "trained.toml"
    path.write_text(TRAINING_SUITE)
    suite = load_suite(path)
    single = tmp_path / "single"
    run_bench(suite, single, lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS), progress=False)
    expected = merge_report(suite, single)
    sharded = tmp_path / "sharded"
    completed = _bench_in_two_processes(path, tiny_sd_folder, sharded, port=29541, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    merged = load_report(sharded)
    assert merged.complete and sorted(c.id for c in merged.cells) == sorted(c.id for c in expected.cells)
    assert _approx_equal(_scores(merged), _scores(expected), tolerance=1e-6)
    for name in ("object-red__subject_lora", "object-red__subject_full"):
        assert (sharded / "prepared" / name / "prepared.json").is_file()


def test_a_trained_cell_does_not_depend_on_threads_or_workers(tiny_sd_folder, tmp_path):
    """Two fresh processes, one at OMP_NUM_THREADS=1 on one worker, one at 2 threads on
    ``--workers 2`` (its own processes, a file barrier between trainings and cells): the same
    scores to the last bit. Cells and trainings run at the suite's thread count (1)."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "reference.png")
    path = tmp_path / "trained.toml"
    path.write_text(TRAINING_SUITE)
    reports = []
    for threads, workers in (("1", "1"), ("2", "2")):
        out = tmp_path / f"threads{threads}"
        command = [sys.executable, "-m", "consistent_diffusion", "bench", "--suite", str(path), "--model",
                   str(tiny_sd_folder), "--out", str(out), "--quiet", "--workers", workers,
                   "--extractors", json.dumps(EXTRACTORS)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                                   env={**os.environ, "OMP_NUM_THREADS": threads})
        assert completed.returncode == 0, completed.stderr[-2000:]
        reports.append(_scores(load_report(out)))
    assert (tmp_path / "threads2" / ".workers" / "worker1.log").is_file()  # it did run on two processes
    assert reports[0] == reports[1]
