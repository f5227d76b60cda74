"""No identity in both the tuning suite and an evaluation suite (``bench.suite_identities``)."""

import subprocess
import sys

import pytest
from PIL import Image

from consistent_diffusion.bench.suite import BUILTIN_SUITES_DIR, load_suite, suite_from_dict
from consistent_diffusion.bench.suite_identities import (
    EVALUATION_SUITES,
    SuiteIdentityError,
    check_tuning_identities,
    reference_identity,
)


def test_a_reference_files_identity_is_its_name_before_the_style():
    assert reference_identity("a/man_technologist_fluent-contrast.png") == "man_technologist"
    assert reference_identity("tent_twitter.png") == "tent"


@pytest.mark.parametrize("name", ["tuning", *EVALUATION_SUITES])
def test_the_builtin_suites_share_no_identity_with_the_tuning_suite(name):
    check_tuning_identities(load_suite(name), name)


def _suite(tmp_path, name, reference):
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / reference)
    data = {"name": name, "methods": {"plain": {"uses": []}},
            "tasks": [{"name": "style-x", "kind": "style", "prompts": ["p"], "seeds": [0], "methods": ["plain"],
                       "references": [reference]}]}
    return suite_from_dict(data, base=tmp_path)


def test_an_evaluation_suite_reusing_a_tuning_identity_is_one_line_naming_file_task_and_identity(tmp_path):
    suite = _suite(tmp_path, "standard", "tent_google.png")  # the tuning suite's tent, another style
    with pytest.raises(SuiteIdentityError) as caught:
        check_tuning_identities(suite, "my/standard.toml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("my/standard.toml: task 'style-x': identity 'tent'")
    assert "tuning.toml task 'tune-style-unnamed-tent'" in message
    assert (caught.value.file, caught.value.task, caught.value.identity) == ("my/standard.toml", "style-x", "tent")
    check_tuning_identities(_suite(tmp_path, "standard", "giraffe_google.png"), "ok.toml")  # not a tuning identity
    check_tuning_identities(_suite(tmp_path, "my-study", "tent_google.png"), "study.toml")  # not an evaluation suite


def test_a_tuning_suite_reusing_an_evaluation_identity_is_an_error_too(tmp_path):
    with pytest.raises(SuiteIdentityError, match=r"identity 'giraffe' is also in quick.toml"):
        check_tuning_identities(_suite(tmp_path, "tuning", "giraffe_google.png"), "tuning.toml")


def test_the_bench_command_exits_2_with_the_one_line_before_loading_a_model(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(folder / "onion_google.png")
    (folder / "quick.toml").write_text('name = "quick"\n[methods.plain]\nuses = []\n[[tasks]]\nname = "t"\n'
                                       'kind = "style"\nprompts = ["p"]\nseeds = [0]\nmethods = ["plain"]\n'
                                       'references = ["onion_google.png"]\n')
    done = subprocess.run([sys.executable, "-m", "consistent_diffusion", "bench", "--suite", str(folder / "quick.toml"),
                           "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "identity 'onion'" in lines[0] and "task 't'" in lines[0], done.stderr
    assert BUILTIN_SUITES_DIR.is_dir()
