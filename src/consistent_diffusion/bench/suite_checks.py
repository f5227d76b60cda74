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
from typing import TYPE_CHECKING, Any

from consistent_diffusion.bench.suite_schema import (  # noqa: F401 - re-exported: the schema stage
    Problem,
    SuiteError,
    _is_int,
    raise_problems,
    schema_problems,
)

if TYPE_CHECKING:
    from pathlib import Path

    from consistent_diffusion.bench.suite import Suite


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
