"""No emoji identity in both the tuning suite and an evaluation suite.

The evaluation suites' method options are chosen on the tuning suite (``bench.tuning``); an option
chosen on the very subject or reference it is then scored on would be fitted to the test. A
reference file is named ``<identity>_<style>.png`` (``scripts/bench_references.py``), so its
identity is the name before the last underscore (``man_technologist_fluent-contrast.png`` ->
``man_technologist``); a style never contains an underscore.

``check_tuning_identities`` is self-contained (it reads the other suites' TOML itself and raises
``SuiteIdentityError``, a ``ConfigError``: one line, exit 2 through the CLI). It runs where a suite
is loaded for the bench (the ``bench`` command, the app's bench job). To plug it into a general
suite-validation pass, call it with the loaded ``Suite`` and its file and turn the error's
``file``, ``task`` and ``identity`` attributes into that framework's error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from consistent_diffusion.bench.suite import BUILTIN_SUITES_DIR, Suite
from consistent_diffusion.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TUNING_SUITES = ("tuning",)  # built-in suites options are chosen on
EVALUATION_SUITES = ("quick", "standard", "full")  # built-in suites whose reports are evidence


class SuiteIdentityError(ConfigError):
    """A tuning identity reused by an evaluation suite (one line: file, task, identity)."""

    def __init__(self, file: str, task: str, identity: str, other_file: str, other_task: str) -> None:
        self.file, self.task, self.identity = file, task, identity
        super().__init__(f"{file}: task {task!r}: identity {identity!r} is also in {other_file} task {other_task!r}; "
                         "no identity may be in both the tuning suite and an evaluation suite")


def reference_identity(reference: str | Path) -> str:
    """The emoji identity of a reference file ``<identity>_<style>.png``."""
    stem = Path(reference).stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def task_identities(tasks: list[tuple[str, list[str]]]) -> dict[str, str]:
    """identity -> the first task (name) whose references show it, from (task name, references) pairs."""
    found: dict[str, str] = {}
    for name, references in tasks:
        for reference in references:
            found.setdefault(reference_identity(reference), name)
    return found


def _builtin_tasks(name: str, folder: Path) -> list[tuple[str, list[str]]]:
    path = folder / f"{name}.toml"
    if not path.is_file():
        return []
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return [(task.get("name", "?"), list(task.get("references", ()))) for task in data.get("tasks", ())]


def check_tuning_identities(suite: Suite, file: str | Path, folder: Path = BUILTIN_SUITES_DIR) -> None:
    """Raise ``SuiteIdentityError`` when ``suite`` (loaded from ``file``) is a tuning suite sharing an
    identity with a built-in evaluation suite, or an evaluation suite sharing one with a built-in
    tuning suite. Other suites (a study, a user's own) are not checked."""
    if suite.name in TUNING_SUITES:
        others = EVALUATION_SUITES
    elif suite.name in EVALUATION_SUITES:
        others = TUNING_SUITES
    else:
        return
    mine = [(task.name, list(task.references)) for task in suite.tasks]
    for other in others:
        if other == suite.name:
            continue
        theirs = task_identities(_builtin_tasks(other, folder))
        for task, references in mine:
            for reference in references:
                identity = reference_identity(reference)
                if identity in theirs:
                    raise SuiteIdentityError(str(file), task, identity, f"{other}.toml", theirs[identity])
