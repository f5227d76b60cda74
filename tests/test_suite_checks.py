"""Suite errors before any work: each problem of a suite file is one line naming the file, the task
(or method, training) and the key; `bench` exits 2 before it loads a model, with no traceback."""

import pytest
from PIL import Image

from consistent_diffusion.bench import suite_checks
from consistent_diffusion.bench.suite import load_suite
from consistent_diffusion.cli.commands import bench as bench_command
from consistent_diffusion.cli.main import main

PLAIN = '[methods.plain]\nuses = []\n'
TASK = '[[tasks]]\nname = "t1"\nkind = "style"\nprompts = ["a cat"]\nseeds = [0]\nmethods = ["plain"]\n'
LORA = ('[training.subject_lora]\nkind = "lora"\ninstance_prompt = "sks emoji"\nclass_prompt = "emoji"\nsteps = 2\n'
        '[methods.lora]\nuses = [{ method = "lora", weights = "{trained:subject_lora}" }]\nprompt = "sks emoji, {prompt}"\n')
OBJECT = ('[[tasks]]\nname = "t1"\nkind = "object"\nprompts = ["a cat"]\nseeds = [0]\nmethods = ["lora"]\n'
          'references = ["reference.png"]\n')
SUBJECT = ('[methods.cs]\nuses = [{ method = "consistent_subject", subject = "{subject}" }]\n'
           '[[tasks]]\nname = "t1"\nkind = "object"\nprompts = ["a cat", "a dog"]\nseeds = [0, 1]\n'
           'methods = ["cs"]\nsubject = "dog"\n')

# (suite text, where, key): one suite problem each
CASES = {
    "missing key": (PLAIN + TASK.replace('prompts = ["a cat"]\n', ""), "task 't1'", "prompts"),
    "mistyped key": (PLAIN + TASK + 'promts = ["a dog"]\n', "task 't1'", "promts"),
    "wrong type": (PLAIN + TASK.replace("seeds = [0]", 'seeds = "0"'), "task 't1'", "seeds"),
    "prompts not a list": (PLAIN + TASK.replace('prompts = ["a cat"]', 'prompts = "a cat"'), "task 't1'", "prompts"),
    "unknown task kind": (PLAIN + TASK.replace('"style"', '"colour"'), "task 't1'", "kind"),
    "undefined method": (PLAIN + TASK.replace('methods = ["plain"]', 'methods = ["plian"]'), "task 't1'", "methods"),
    "unknown training kind": (LORA.replace('"lora"\ninstance', '"hypernetwork"\ninstance') + OBJECT,
                              "training 'subject_lora'", "kind"),
    "unknown training option": (LORA.replace("steps = 2", "rnak = 4") + OBJECT, "training 'subject_lora'", "rnak"),
    "bad training value": (LORA.replace("steps = 2", "rank = 0") + OBJECT, "training 'subject_lora'", "rank"),
    "unknown method in a stack": (PLAIN.replace("uses = []", 'uses = [{ method = "img2imgg" }]') + TASK,
                                  "method 'plain'", "uses"),
    "missing reference": (PLAIN + TASK + 'references = ["nowhere.png"]\n', "task 't1'", "references"),
    "corrupt reference": (PLAIN + TASK + 'references = ["corrupt.png"]\n', "task 't1'", "references"),
    "subject absent from the anchor prompts": (SUBJECT, "task 't1'", "subject"),
    "instance token in no prompt": (LORA.replace('prompt = "sks emoji, {prompt}"', "") + OBJECT,
                                    "task 't1'", "prompts"),
}


@pytest.fixture
def loads(monkeypatch):
    """Every model load the bench command asks for (none may happen)."""
    calls = []
    monkeypatch.setattr(bench_command, "load_model_from_args", lambda *a, **k: calls.append(a))
    return calls


def _write(tmp_path, text):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "reference.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_suite_problem_is_one_line_and_exit_2_before_any_model_loads(case, tmp_path, capsys, loads):
    text, where, key = CASES[case]
    path = _write(tmp_path, text)
    code = main(["bench", "--suite", str(path), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and where in lines[0] and f"key {key!r}" in lines[0], lines[0]
    assert "Traceback" not in err
    assert loads == [] and not (tmp_path / "out" / "cells").exists() and not (tmp_path / "out" / "prepared").exists()


def test_every_problem_of_a_file_is_listed_at_once(tmp_path):
    path = _write(tmp_path, PLAIN + TASK.replace('prompts = ["a cat"]\n', 'promts = ["a"]\n').replace("[0]", '"0"'))
    with pytest.raises(suite_checks.SuiteError) as raised:
        load_suite(path)
    assert sorted(p.key for p in raised.value.problems) == ["prompts", "promts", "seeds"]
    assert len(str(raised.value).splitlines()) == 3


def test_the_suite_bar_a_task_without_prompts_in_a_subprocess(tmp_path):
    """The issue's bar, as a user runs it: exit 2, one line naming the task and `prompts`, no traceback."""
    import subprocess
    import sys

    path = _write(tmp_path, PLAIN + TASK.replace('prompts = ["a cat"]\n', ""))
    done = subprocess.run([sys.executable, "-m", "consistent_diffusion", "bench", "--suite", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {path}: task 't1', key 'prompts': missing"]


def test_a_subject_in_the_anchor_prompts_passes_and_a_check_plugs_in(tmp_path, monkeypatch):
    suite = load_suite(_write(tmp_path, SUBJECT.replace('"a cat", "a dog"', '"a dog", "a cat"')))
    suite_checks.check_suite(suite)  # "dog" is in the first prompt: both anchors (prompt-major) have it
    extra = suite_checks.Problem("task 't1'", "seeds", "reused")
    monkeypatch.setattr(suite_checks, "SUITE_CHECKS", [*suite_checks.SUITE_CHECKS, lambda s: [extra]])
    with pytest.raises(suite_checks.SuiteError, match="key 'seeds': reused"):
        suite_checks.check_suite(suite)


def test_the_instance_token_is_what_the_class_prompt_lacks():
    assert suite_checks.instance_token({"instance_prompt": "sks emoji", "class_prompt": "emoji"}) == "sks"
    assert suite_checks.instance_token({"instance_prompt": "sks emoji"}) == "sks emoji"
    assert suite_checks.instance_token({"placeholder_token": "<sks-emoji>", "initializer_token": "emoji"}) == "<sks-emoji>"
