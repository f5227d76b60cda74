"""The evidence-grade bench: task families and placeholders, the tuning record and how options are
chosen, the quick suite's shape, the report's leakage and tuning sections, --workers failures."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from consistent_diffusion.bench.records import as_report
from consistent_diffusion.bench.report import family_rows, main_table_rows, render_markdown
from consistent_diffusion.bench.suite import MethodSpec, load_suite, suite_from_dict
from consistent_diffusion.core.errors import ConfigError


def _values(mean, seed=0):
    return list(mean + 0.01 * np.random.default_rng(seed).standard_normal(8))


def _cell(task, kind, stack=(), family=None, name=None, **scores):
    method = name or "+".join(m for m, _ in stack) or "plain"
    return {"task": task, "kind": kind, "family": family or kind, "method": method,
            "stack": [{"method": m, **options} for m, options in stack], "num_images": 8,
            "scores": {name: {"aggregate": float(np.mean(_values(v, i))), "per_image": _values(v, i), "validated": True}
                       for i, (name, v) in enumerate(scores.items())}}


def test_families_placeholders_tuning_and_threads_parse(tmp_path):
    (tmp_path / "ref.png").write_bytes(b"")
    data = {"name": "s", "tuning": {"skip": "12, chosen on the tuning suite"}, "threads": 1,
            "methods": {"edit": {"uses": [{"method": "ddpm_edit", "image": "{reference}",
                                           "source_prompt": "{reference_prompt}"}]}},
            "tasks": [{"name": "a", "kind": "style", "family": "style-unseen", "prompts": ["x"], "seeds": [0],
                       "methods": ["edit"], "references": ["ref.png"], "reference_prompt": "giraffe, line style"},
                      {"name": "b", "kind": "object", "prompts": ["x"], "seeds": [0], "methods": ["edit"]}]}
    suite = suite_from_dict(data, base=tmp_path)
    first, second = suite.tasks
    assert first.family == "style-unseen" and second.family == "object", "a task's family defaults to its kind"
    assert suite.tuning == {"skip": "12, chosen on the tuning suite"} and suite.threads == 1
    method = suite.methods["edit"]
    assert method.resolved("R", reference_prompt=first.reference_prompt)[0][1]["source_prompt"] == "giraffe, line style"
    with pytest.raises(ConfigError, match="needs the task's reference_prompt"):
        method.resolved("R", reference_prompt="")
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        suite_from_dict({**data, "threads": 0}, base=tmp_path)
    assert MethodSpec("m", ({"method": "x", "subject": "{subject}"},)).resolved(None, subject="cat")[0][1] == {
        "subject": "cat"}


def test_the_quick_suite_tests_every_claim_on_three_tasks_per_kind_with_its_choices_recorded():
    suite = load_suite("quick")
    by_family = {}
    for task in suite.tasks:
        by_family.setdefault(task.family, []).append(task)
        assert task.methods[0] in ("plain", "ddpm_reconstruct"), "every comparison is paired with plain"
        if task.family != "inversion":
            assert len(task.prompts) * len(task.seeds) >= 8, f"{task.name}: at least 8 images per cell"
    for family in ("style-unnamed", "style-unseen", "object", "shape", "inversion"):
        assert len(by_family[family]) >= 3, family
    assert len(by_family["concept-text"]) + len(by_family["concept-exemplar"]) >= 3
    styles = {"twitter", "google", "openmoji", "openmoji-line", "fluent-flat", "fluent-3d", "fluent-contrast"}
    for task in by_family["style-unnamed"] + by_family["style-unseen"]:
        assert not any(style in prompt for prompt in task.prompts for style in styles), "no style word in the prompts"
    assert all("openmoji-line" in t.references[0] or "fluent-contrast" in t.references[0]
               for t in by_family["style-unseen"]), "unseen styles come from the held-out styles"
    stacks = {tuple(use["method"] for use in m.uses) for m in suite.methods.values()}
    assert {("style_aligned", "controlnet"), ("style_aligned", "lora"), ("lora", "controlnet")} <= stacks
    assert {"style_aligned", "img2img_strength", "ddpm_edit_skip", "controlnet_scale", "lora"} <= set(suite.tuning)
    tuning = load_suite("tuning")
    quick_references = {path for task in suite.tasks for path in task.references}
    assert not quick_references & {path for task in tuning.tasks for path in task.references}, \
        "options are chosen on references the quick suite never uses"
    for name, kind in (("subject_lora", "lora"), ("subject_dreambooth", "dreambooth")):
        recipe = {key: value for key, value in suite.trainings[name].options.items() if key not in ("steps", "seed")}
        tuned = [spec for spec in tuning.trainings.values() if spec.kind == kind]
        assert len(tuned) >= 2 and all({k: v for k, v in spec.options.items() if k not in ("steps", "seed")} == recipe
                                       for spec in tuned), f"the tuning suite varies only {kind}'s steps"
        assert suite.trainings[name].options["steps"] in {spec.options["steps"] for spec in tuned}


def test_the_full_suite_has_more_subjects_and_seeds_than_quick():
    quick, full = load_suite("quick"), load_suite("full")  # parsing checks every reference file exists
    assert full.methods.keys() == quick.methods.keys() and full.tuning == quick.tuning
    families = {t.family for t in quick.tasks}
    assert {t.family for t in full.tasks} == families
    for family in families:
        assert sum(t.family == family for t in full.tasks) > sum(t.family == family for t in quick.tasks), family
    assert {t.name: len(t.seeds) for t in full.tasks}["object-cricket"] == 4


def _tuning_report():
    shift = [("style_aligned", {"shared_score_shift": 2.0})]
    return {"cells": [
        _cell("t", "style", reference_style=0.3, reference_object=0.2, diversity=0.7),
        _cell("t", "style", [("style_aligned", {})], reference_style=0.5, reference_object=0.22, diversity=0.7),
        _cell("t", "style", shift, name="style_aligned_shift2", reference_style=0.8, reference_object=0.5, diversity=0.7),  # copies the subject
        _cell("t", "style", [("img2img", {"strength": 0.4})], name="img2img_40", reference_style=0.9, reference_object=0.6, diversity=0.3),
        _cell("t", "style", [("img2img", {"strength": 0.8})], name="img2img_80", reference_style=0.5, reference_object=0.4, diversity=0.6),
    ]}


def test_the_report_shows_leakage_on_style_rows_and_the_tuning_record():
    data = _tuning_report()
    data["suite"] = {"name": "s", "tuning": {"style_aligned": "defaults, on the tuning suite"},
                     "tasks": [{"name": "t", "kind": "style", "family": "style-unseen", "seeds": [0]}]}
    report = as_report(data)
    from consistent_diffusion.bench.stats import report_intervals

    report = type(report)(**{**report.__dict__, "intervals": report_intervals(report)})
    rows = {row["method"]: row for row in main_table_rows(report)}
    assert rows["style_aligned"]["metric"] == "style to reference"
    assert rows["style_aligned"]["leakage"].startswith("+0.020")
    assert rows["plain"]["leakage"] == "–"
    pooled = {row["method"]: row for row in family_rows(report)}
    assert pooled["style_aligned"]["family"] == "style" and pooled["style_aligned"]["vs_plain"].startswith("+0.200")
    assert pooled["style_aligned"]["leakage"].startswith("+0.020") and pooled["plain"]["vs_plain"] == "–"
    text = render_markdown(report, [])
    assert "## By family (pooled over tasks)" in text
    assert "## How the options were chosen" in text and "defaults, on the tuning suite" in text


PALETTE_ONLY = {"style": "palette", "object": "palette", "text": None, "diversity": None}


def _bench_on_two_workers(suite_path, model, out):
    """The CLI command running ``suite_path`` on ``--workers 2`` with the cheap palette metrics."""
    return [sys.executable, "-m", "consistent_diffusion", "bench", "--suite", str(suite_path), "--model", str(model),
            "--out", str(out), "--quiet", "--workers", "2", "--extractors", json.dumps(PALETTE_ONLY)]


IMG2IMG = ("img2img", '{ method = "img2img", image = "{reference}", strength = 0.5 }')


def _style_suite(folder, name, prompts, seeds, steps=2, second=IMG2IMG):
    """A one-task style suite in ``folder`` (with its red reference): plain beside one other method."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "reference.png")
    method, uses = second
    path = folder / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
steps = {steps}
[methods.plain]
uses = []
[methods.{method}]
uses = [{uses}]
[[tasks]]
name = "a"
kind = "style"
prompts = {json.dumps(list(prompts))}
seeds = {list(seeds)}
references = ["reference.png"]
methods = ["plain", "{method}"]
""")
    return path


def test_a_failing_worker_stops_the_run_with_its_log(tiny_sd_folder, tmp_path):
    # a method option that only the method itself rejects, in the worker (an unknown method name is a suite
    # error, caught before any worker starts: tests/test_suite_checks.py)
    path = _style_suite(tmp_path, "broken", ["a red cat"], [0],
                        second=("broken", '{ method = "img2img", image = "{reference}", strength = 7.0 }'))
    out = tmp_path / "out"
    completed = subprocess.run(_bench_on_two_workers(path, tiny_sd_folder, out), capture_output=True, text=True,
                               timeout=600, check=False)
    assert completed.returncode == 2
    assert "bench worker" in completed.stderr and "strength must be" in completed.stderr, completed.stderr[-2000:]
    assert "re-run the same command to resume" in completed.stderr
    assert not (out / "report.json").exists()


def _workers_of(out):
    """PIDs of live processes whose command line names ``out`` and ``--worker``."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and b"--worker" in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_killing_the_main_process_stops_its_workers_and_a_rerun_finishes(tiny_sd_folder, tmp_path):
    import signal
    import time

    path = _style_suite(tmp_path, "slow", ["a red cat", "a blue dog", "a green bird", "a tree"], range(4), steps=40)
    out = tmp_path / "out"
    command = _bench_on_two_workers(path, tiny_sd_folder, out)
    main = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_workers_of(out)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(_workers_of(out)) == 2, "both workers started"
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.time() + 5  # a worker's own cells take longer than this (steps = 40)
    while _workers_of(out) and time.time() < deadline:
        time.sleep(0.2)
    assert not _workers_of(out), "no orphaned worker keeps running"
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["complete"]


def test_the_apps_bench_runs_on_worker_processes_with_the_same_numbers(tiny_sd_folder, tmp_path):
    """The app's "run the bench" on two processes of the CLI (the model given as its command-line
    arguments) writes the report an in-process run does, and counts progress in both."""
    from consistent_diffusion.app import jobs
    from consistent_diffusion.models.loading import load_pipeline

    path = _style_suite(tmp_path, "small", ["a red cat", "a blue dog"], [0, 1])
    counts = {"here": [], "workers": []}
    here = jobs.run_quick_bench(lambda: load_pipeline(str(tiny_sd_folder)), tmp_path / "here", suite=str(path),
                                on_progress=lambda done, total: counts["here"].append((done, total)))
    there = jobs.run_quick_bench(None, tmp_path / "workers", suite=str(path), workers=2,
                                 model_argv=["--model", str(tiny_sd_folder)],
                                 on_progress=lambda done, total: counts["workers"].append((done, total)))
    assert (there / ".workers" / "worker1.log").is_file()
    here_scores, there_scores = ([cell["scores"] for cell in json.loads((folder / "report.json").read_text())["cells"]]
                                 for folder in (here, there))
    assert here_scores == there_scores
    assert counts["here"][-1] == (2, 2) and counts["workers"][-1] == (2, 2)


def test_cpu_kernels_are_pinned_on_x86_only_and_a_users_choice_wins():
    from consistent_diffusion.core.cpu_kernels import PINNED, cpu_kernels_label, pin_cpu_kernels

    environ = {"MKL_CBWR": "COMPATIBLE"}
    assert pin_cpu_kernels(environ, machine="x86_64") == {**PINNED, "MKL_CBWR": "COMPATIBLE"} == environ
    assert cpu_kernels_label(environ) == "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_CBWR=COMPATIBLE"
    arm: dict[str, str] = {}
    assert pin_cpu_kernels(arm, machine="aarch64") == {} and arm == {} and cpu_kernels_label(arm) == "native"


def test_a_fresh_bench_process_runs_the_pinned_kernels():
    """The pin takes effect when it runs before torch's first computation (what `bench` does), and
    ``check_pinned`` says so when it came too late."""
    import platform
    import subprocess
    import sys

    if platform.machine().lower() not in {"x86_64", "amd64"}:
        pytest.skip("only x86-64 CPUs choose between AVX2 and AVX-512 kernels")
    script = ("import os, sys\n"
              "for name in ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'MKL_CBWR'): os.environ.pop(name, None)\n"
              "from consistent_diffusion.core.cpu_kernels import check_pinned, pin_cpu_kernels\n"
              "import torch\n"
              "native = torch.backends.cpu.get_cpu_capability() if 'native' in sys.argv else None\n"
              "print(check_pinned(pin_cpu_kernels()) is None, torch.backends.cpu.get_cpu_capability(), native)\n")
    pinned = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert pinned[:2] == ["True", "AVX2"] or pinned[1] == "DEFAULT", pinned
    late = subprocess.run([sys.executable, "-c", script, "native"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert late[0] == str(late[2] != "AVX512"), "a pin after torch chose AVX-512 kernels is reported"
