"""A suite's TOML shape, checked before anything is built: every problem a line naming the file, the
task (or method, training) and the key (``Problem``), raised together as one ``SuiteError``.

``schema_problems(data)``: required keys, unknown keys (a typo such as ``promts``), value types,
names a task or method refers to. Pure Python, and a leaf of the bench package (``bench.suite``
runs it while parsing; ``bench.suite_checks`` adds the checks that need the method registry, the
training configs or the files). The vocabulary both share lives here too: task kinds, training
kinds and their required options, the ``"{trained:NAME}"`` placeholder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consistent_diffusion.core.errors import ConfigError

KINDS = ("style", "object", "shape", "concept")
TRAINED_PLACEHOLDER = re.compile(r"^\{trained:([A-Za-z0-9_-]+)\}$")
TRAINING_KINDS = ("dreambooth", "lora", "textual_inversion")  # configs and train functions: bench.prepare.training_kind
REQUIRED_TRAINING_OPTIONS = {
    "dreambooth": ("instance_prompt",),
    "lora": ("instance_prompt",),
    "textual_inversion": ("placeholder_token", "initializer_token"),
}


def trained_name(value: Any) -> str | None:
    """NAME if ``value`` is the placeholder ``"{trained:NAME}"``, else None."""
    match = TRAINED_PLACEHOLDER.match(value) if isinstance(value, str) else None
    return match.group(1) if match else None


@dataclass(frozen=True)
class Problem:
    """One suite problem: ``where`` is e.g. ``task 'style-red'``, ``method 'lora'``, ``training 'x'``."""

    where: str
    key: str
    message: str

    def line(self, source: str) -> str:
        return f"{source}: {self.where}, key {self.key!r}: {self.message}"


class SuiteError(ConfigError):
    """Every problem of one suite file, one line each (the CLI prints them and exits 2)."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(problem.line(source) for problem in self.problems))


def raise_problems(source: str, problems: list[Problem]) -> None:
    if problems:
        raise SuiteError(source, problems)


# ---------------------------------------------------------------------------------------------- schema

def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


# key -> (check, what the value must be)
TASK_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_str, "a string"),
    "kind": (_is_str, "a string"),
    "prompts": (_list_of(_is_str), "a list of strings"),
    "seeds": (_list_of(_is_int), "a list of integers"),
    "methods": (_list_of(_is_str), "a list of method names"),
    "references": (_list_of(_is_str), "a list of image paths"),
    "description": (_is_str, "a string"),
    "subject": (_is_str, "a string"),
    "reference_prompt": (_is_str, "a string"),
    "family": (_is_str, "a string"),
}
REQUIRED_TASK_KEYS = ("name", "kind", "prompts", "seeds", "methods")
METHOD_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "uses": (_list_of(lambda use: isinstance(use, dict) and _is_str(use.get("method"))),
             "a list of tables each with a 'method' name"),
    "prompt": (_is_str, "a string template containing {prompt}"),
}
SUITE_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_str, "a string"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "guidance": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "threads": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "methods": (lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()), "tables [methods.NAME]"),
    "training": (lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()), "tables [training.NAME]"),
    "tasks": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "an array of tables [[tasks]]"),
    "tuning": (lambda v: isinstance(v, dict), "a table"),
}


def _typed(where: str, table: dict[str, Any], keys: dict[str, tuple[Callable[[Any], bool], str]],
           required: tuple[str, ...] = (), closed: bool = True) -> list[Problem]:
    """Missing required keys, unknown keys (when ``closed``) and values of the wrong type."""
    problems = [Problem(where, key, "missing") for key in required if key not in table]
    for key, value in table.items():
        if key not in keys:
            if closed:
                problems.append(Problem(where, key, f"unknown key; accepted: {', '.join(keys)}"))
        elif not keys[key][0](value):
            problems.append(Problem(where, key, f"{key} must be {keys[key][1]}, got {value!r}"))
    return problems


def _task_where(task: dict[str, Any], index: int) -> str:
    name = task.get("name")
    return f"task {name!r}" if isinstance(name, str) else f"task #{index + 1}"


def _trainings_of(spec: dict[str, Any]) -> list[str]:
    uses = spec.get("uses", [])
    return [name for use in uses if isinstance(use, dict) for value in use.values() if (name := trained_name(value))]


def schema_problems(data: dict[str, Any]) -> list[Problem]:
    """The problems of a suite's TOML data that its shape shows (no imports, no files read but none)."""
    problems = _typed("suite", data, SUITE_KEYS, closed=False)  # other top-level keys are suite options
    methods = data.get("methods", {}) if isinstance(data.get("methods"), dict) else {}
    trainings = data.get("training", {}) if isinstance(data.get("training"), dict) else {}
    for name, spec in methods.items():
        if isinstance(spec, dict):
            problems += _typed(f"method {name!r}", spec, METHOD_KEYS)
            undefined = [t for t in _trainings_of(spec) if t not in trainings]
            if undefined:
                problems.append(Problem(f"method {name!r}", "uses", f"undefined trainings {undefined}; "
                                        f"defined: {sorted(trainings)}"))
    for name, spec in trainings.items():
        if isinstance(spec, dict):
            problems += _training_problems(f"training {name!r}", spec)
    tasks = data.get("tasks", []) if isinstance(data.get("tasks"), list) else []
    for index, task in enumerate(tasks):
        if not isinstance(task, dict):
            continue
        where = _task_where(task, index)
        task_problems = _typed(where, task, TASK_KEYS, REQUIRED_TASK_KEYS)
        problems += task_problems + _task_values(where, task)
        if any(p.key == "methods" for p in task_problems):
            continue
        undefined = [m for m in task.get("methods", []) if m not in methods]
        if undefined:
            problems.append(Problem(where, "methods", f"undefined methods {undefined}; defined: {sorted(methods)}"))
        training = [m for m in task.get("methods", []) if m in methods and _trainings_of(methods[m])]
        if training and not task.get("references"):
            problems.append(Problem(where, "references", f"methods {training} train on the task's references, "
                                    "but the task has none"))
    return problems


def _training_problems(where: str, spec: dict[str, Any]) -> list[Problem]:
    kind = spec.get("kind")
    if kind is None:
        return [Problem(where, "kind", f"missing; one of {', '.join(TRAINING_KINDS)}")]
    if kind not in TRAINING_KINDS:
        return [Problem(where, "kind", f"kind {kind!r} is not one of {', '.join(TRAINING_KINDS)}")]
    missing = [option for option in REQUIRED_TRAINING_OPTIONS[kind] if option not in spec]
    if not missing:
        return []
    return [Problem(where, missing[0], f"missing: a {kind} training needs {', '.join(missing)} "
                    "(e.g. instance_prompt = \"sks emoji\"; placeholder_token = \"<sks-emoji>\")")]


def _task_values(where: str, task: dict[str, Any]) -> list[Problem]:
    """Values of the right type that a task still cannot take: an unknown kind, an empty list, a
    name the output folders cannot hold."""
    problems = []
    if isinstance(task.get("kind"), str) and task["kind"] not in KINDS:
        problems.append(Problem(where, "kind", f"kind {task['kind']!r} is not one of {', '.join(KINDS)}"))
    for key in ("prompts", "seeds", "methods"):
        if task.get(key) == []:
            problems.append(Problem(where, key, "must not be empty"))
    if isinstance(task.get("name"), str) and ("__" in task["name"] or "/" in task["name"]):
        problems.append(Problem(where, "name", "may not contain '__' or '/'"))
    return problems
