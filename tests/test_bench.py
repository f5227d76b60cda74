"""The bench end to end on a tiny pipeline: two cells, kill + resume, 2-process merge."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from consistent_diffusion.bench.runner import merge_report, run_bench
from consistent_diffusion.bench.scoring import make_scorer
from consistent_diffusion.bench.suite import load_suite
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
    return {cell["cell"]: cell["scores"] for cell in report["cells"]}


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
    assert report["complete"] and len(report["cells"]) == 2
    for cell in report["cells"]:
        assert {"style", "diversity", "reference_object", "reference_fidelity"} <= set(cell["scores"])
        assert cell["num_images"] == 4
    scores = _scores(report)
    for cell in scores.values():
        assert 0.0 < cell["reference_psnr"]["aggregate"] < 100.0
    # the two methods really produced different series
    assert scores["style-red__img2img"]["reference_psnr"] != scores["style-red__plain"]["reference_psnr"]
    assert "/" not in json.dumps([c["stack"] for c in report["cells"]])  # no local paths in the report

    from consistent_diffusion.bench.report import write_reports

    md, page = write_reports(report, out)
    assert "style-red__plain" in md.read_text() and "<svg" in page.read_text()
    assert "cells/style-red__plain/series/contact_sheet.png" in page.read_text()


def test_two_processes_merge_equals_single_process(suite_file, tiny_sd_folder, tmp_path):
    suite = load_suite(suite_file)
    single = tmp_path / "single"
    run_bench(suite, single, lambda: load_pipeline(str(tiny_sd_folder)), make_scorer(EXTRACTORS), progress=False)
    expected = merge_report(suite, single)

    sharded = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "consistent_diffusion", "bench", "--suite", str(suite_file), "--model", str(tiny_sd_folder),
               "--out", str(sharded), "--quiet", "--extractors", json.dumps(EXTRACTORS)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    merged = json.loads((sharded / "report.json").read_text())
    assert merged["complete"]
    assert _approx_equal(_scores(merged), _scores(expected))
    assert not _approx_equal(_scores(merged), {k: {} for k in _scores(expected)})
    assert merged["table"].keys() == expected["table"].keys()


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
    report = merge_report(suite, out)
    cells = {cell["method"]: cell for cell in report["cells"]}
    for name, record in (("lora", lora), ("dreambooth", full)):
        assert cells[name]["cost"]["trainable_parameters"] == record["trainable_parameters"]
        assert cells[name]["cost"]["train_seconds"] > 0
        assert cells[name]["trainings"][0]["training"] == record["training"]
    manifest = json.loads((out / "cells" / "object-red__lora" / "series" / "manifest.json").read_text())
    assert "sks emoji, a red cat" in json.dumps(manifest)
    assert "/" not in json.dumps([c["stack"] for c in report["cells"]])
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
    bad = tmp_path / "bad.toml"
    head = '[methods.m]\nuses=[{ method = "lora", weights = "{trained:x}" }]\n'
    task = '[[tasks]]\nname="t"\nkind="object"\nprompts=["a"]\nseeds=[0]\nmethods=["m"]\n'
    bad.write_text(head + task)
    with pytest.raises(ConfigError, match="undefined trainings"):
        load_suite(bad)
    bad.write_text('[training.x]\nkind="lora"\ninstance_prompt="sks"\n' + head + task)
    with pytest.raises(ConfigError, match="has none"):
        load_suite(bad)
    bad.write_text('[training.x]\nkind="lora"\ninstance_prompt="sks"\nrnak=4\n' + head + task)
    with pytest.raises(ConfigError, match="unknown options \\['rnak'\\]"):
        load_suite(bad)
    bad.write_text('[training.x]\nkind="textual_inversion"\n' + head + task)
    with pytest.raises(ConfigError, match="not one of dreambooth, lora"):
        load_suite(bad)
    bad.write_text('[methods.m]\nuses=[]\nprompt="sks"\n' + task)
    with pytest.raises(ConfigError, match="template"):
        load_suite(bad)
