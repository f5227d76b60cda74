"""Suite problems found before any work: every one a line naming the file, the task (or method,
training) and the key, all raised together as one ``SuiteError``.

Two stages:

- ``schema_problems(data)``: the TOML's shape (``bench.suite.suite_from_dict`` runs it): required
  keys, unknown keys (a typo such as ``promts``), value types, names a task or method refers to.
  Pure Python: parsing a suite imports neither torch nor the training stack.
- ``check_suite(suite)``: what needs the method registry, the training configs or the files
  (``bench`` runs it right after loading, before any model): unknown methods in a stack, training
  options its config rejects, reference images that do not load, a subject word or a fine-tuning's
  instance token that no prompt carries. Each check is a function ``(suite) -> list[Problem]`` in
  ``SUITE_CHECKS``; one more check plugs in by appending to it (``register_check``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consistent_diffusion.core.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from consistent_diffusion.bench.suite import Suite


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
    from consistent_diffusion.bench.suite import trained_name

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
    from consistent_diffusion.bench.suite import REQUIRED_TRAINING_OPTIONS, TRAINING_KINDS

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
    from consistent_diffusion.bench.suite import KINDS

    problems = []
    if isinstance(task.get("kind"), str) and task["kind"] not in KINDS:
        problems.append(Problem(where, "kind", f"kind {task['kind']!r} is not one of {', '.join(KINDS)}"))
    for key in ("prompts", "seeds", "methods"):
        if task.get(key) == []:
            problems.append(Problem(where, key, "must not be empty"))
    if isinstance(task.get("name"), str) and ("__" in task["name"] or "/" in task["name"]):
        problems.append(Problem(where, "name", "may not contain '__' or '/'"))
    return problems


# ---------------------------------------------------------------------------------------------- deep checks

def _word_in(word: str, text: str) -> bool:
    """``word`` (a word or phrase) occurs in ``text`` as whole words, case-insensitively."""
    return re.search(rf"(?<!\w){re.escape(word.strip().lower())}(?!\w)", text.lower()) is not None


def unknown_methods(suite: Suite) -> list[Problem]:
    from consistent_diffusion.methods.base import available_methods

    known = available_methods()
    return [Problem(f"method {spec.name!r}", "uses", f"unknown method {use['method']!r}; available: {', '.join(known)}")
            for spec in suite.methods.values() for use in spec.uses if use["method"] not in known]


def training_options(suite: Suite) -> list[Problem]:
    from consistent_diffusion.bench.prepare import training_problems

    return [Problem(f"training {name!r}", key, message) for name, key, message in training_problems(suite)]


def unreadable_references(suite: Suite) -> list[Problem]:
    from consistent_diffusion.core.errors import ConsistentDiffusionError
    from consistent_diffusion.core.images import load_image

    problems = []
    for task in suite.tasks:
        for reference in task.references:
            try:
                load_image(reference)
            except ConsistentDiffusionError as error:
                problems.append(Problem(f"task {task.name!r}", "references", str(error)))
    return problems


def _anchor_prompts(prompts: tuple[str, ...], seeds: tuple[int, ...], options: dict[str, Any]) -> list[str]:
    """The prompts of consistent subject's generated anchors: the series' first ``anchors`` images,
    prompt-major (``SeriesConfig.items``); default 2, or 0 with a real reference image."""
    anchors = options.get("anchors")
    if anchors is None:
        anchors = 0 if options.get("reference_image") or options.get("reference_inversion") else 2
    count = min(len(prompts) * len(seeds), anchors if _is_int(anchors) else 0)
    return list(dict.fromkeys(prompts[index // len(seeds)] for index in range(count)))


def absent_subjects(suite: Suite) -> list[Problem]:
    """Consistent subject's ``subject`` must be a word of its anchors' prompts (and of a real
    reference's prompt); a fine-tuning's instance token must be in the prompts of the cells using it."""
    problems = []
    for cell in suite.cells:
        task, method = cell.task, cell.method
        prompts = method.prompts(task.prompts)
        where = f"task {task.name!r}"
        for use in method.uses:
            subject = use.get("subject")
            if use["method"] != "consistent_subject" or not isinstance(subject, str):
                continue
            key = "subject" if "{subject}" in subject else f"methods.{method.name}.uses.subject"
            subject = subject.replace("{subject}", task.subject)
            if not subject.strip():
                problems.append(Problem(where, "subject", f"method {method.name!r} needs the task's subject word"))
                continue
            anchors = _anchor_prompts(prompts, task.seeds, use)
            if use.get("reference_image_prompt") is not None:
                anchors.append(str(use["reference_image_prompt"]).replace("{reference_prompt}", task.reference_prompt))
            missing = [prompt for prompt in anchors if not _word_in(subject, prompt)]
            if missing:
                problems.append(Problem(where, key, f"subject {subject!r} (method {method.name!r}) is not a word of the "
                                        f"anchor prompts {missing}"))
        for name in method.trainings:
            token = instance_token(suite.trainings[name].options)
            if token and not any(_word_in(token, prompt) for prompt in prompts):
                problems.append(Problem(where, "prompts", f"no prompt of method {method.name!r} contains {token!r}, "
                                        f"the instance token training {name!r} teaches (give the method "
                                        f"prompt = \"{token} ..., {{prompt}}\")"))
    return problems


def instance_token(options: dict[str, Any]) -> str:
    """The words a fine-tuning teaches: textual inversion's ``placeholder_token``, or the words of
    a DreamBooth/LoRA ``instance_prompt`` that its ``class_prompt`` lacks ("sks emoji" / "emoji" -> "sks")."""
    if isinstance(options.get("placeholder_token"), str):
        return options["placeholder_token"]
    instance = options.get("instance_prompt")
    if not isinstance(instance, str):
        return ""
    common = set(str(options.get("class_prompt", "")).lower().split())
    return " ".join(word for word in instance.split() if word.lower() not in common) or instance


SuiteCheck = Callable[["Suite"], list[Problem]]
SUITE_CHECKS: list[SuiteCheck] = [unknown_methods, training_options, unreadable_references, absent_subjects]


def register_check(check: SuiteCheck) -> SuiteCheck:
    """Add a check ``(suite) -> list[Problem]`` to those ``check_suite`` runs (usable as a decorator)."""
    SUITE_CHECKS.append(check)
    return check


def check_suite(suite: Suite) -> None:
    """Run every check in ``SUITE_CHECKS``; raise one ``SuiteError`` listing all problems found."""
    raise_problems(suite.source or suite.name, [problem for check in SUITE_CHECKS for problem in check(suite)])


def check_suite_for_bench(suite: Suite, file: str | Path) -> None:
    """Everything the bench checks before any model loads: ``check_suite``, then that no emoji
    identity is both in the tuning suite and in an evaluation suite (``bench.suite_identities``)."""
    from consistent_diffusion.bench.suite_identities import check_tuning_identities

    check_suite(suite)
    check_tuning_identities(suite, file)
