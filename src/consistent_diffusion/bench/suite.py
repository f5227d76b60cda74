"""Declarative benchmark suites (TOML).

A suite lists *tasks* (a kind of consistency, prompts, seeds, optional reference images) and
*methods* (named stacks of registered methods with options). Every (task, method) pair a task
asks for is one *cell*. Strings ``"{reference}"`` in method options are replaced by the task's
first reference image (an absolute path), so one method definition serves every task.

Methods that need training first (DreamBooth, LoRA DreamBooth, textual inversion) name a
*training* of the suite: ``"{trained:NAME}"`` in an option becomes the artifact of
``[training.NAME]`` trained on the task's reference images (a DreamBooth run folder, a LoRA folder,
an embeddings folder), trained once per task and
cached by the runner. A method's ``prompt`` template (default ``"{prompt}"``) rewrites the
task's prompts for its cells, e.g. ``"sks emoji, {prompt}"`` to call a DreamBooth subject by its
token; metrics still compare images with the task's own prompts. ``"{subject}"`` inside an option's
text becomes the task's ``subject`` word (``consistent_subject``'s ``subject = "{subject}"``), and
``"{reference_prompt}"`` the task's caption of its first reference (a DDPM edit's source prompt).

A task's ``family`` (default: its kind) names the setting a claim is judged on separately, e.g.
``style-unnamed`` (no style word in the prompts) and ``style-unseen`` (a reference in a style the
model never saw): a claim holds only where it holds on every family it is about. ``[tuning]``
records how each method's options were chosen (on which tuning tasks, with what result); the
report carries it.

Example::

    name = "quick"
    guidance = 4.0                 # steps: the default (models.sampling.DEFAULT_STEPS) unless set

    [methods.plain]
    uses = []

    [methods.img2img]
    uses = [{ method = "img2img", image = "{reference}", strength = 0.6 }]

    [training.subject_lora]
    kind = "lora"                  # lora | dreambooth: options of LoraDreamBoothConfig / DreamBoothConfig
    instance_prompt = "sks emoji"
    steps = 200

    [methods.lora]
    uses = [{ method = "lora", weights = "{trained:subject_lora}" }]
    prompt = "sks emoji, {prompt}"

    [[tasks]]
    name = "style-twitter"
    kind = "style"
    prompts = ["cat face, twitter style", "rocket, twitter style"]
    seeds = [0, 1]
    references = ["assets/grinning_face_twitter.png"]
    methods = ["plain", "img2img"]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consistent_diffusion.bench.suite_schema import (  # noqa: F401 - the vocabulary, re-exported
    KINDS,
    REQUIRED_TRAINING_OPTIONS,
    TRAINED_PLACEHOLDER,
    TRAINING_KINDS,
    Problem,
    raise_problems,
    schema_problems,
    trained_name,
)
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.models.sampling import DEFAULT_STEPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_SUITES_DIR = Path(__file__).parent / "suites"
REFERENCE_PLACEHOLDER = "{reference}"
PROMPT_PLACEHOLDER = "{prompt}"
SUBJECT_PLACEHOLDER = "{subject}"
REFERENCE_PROMPT_PLACEHOLDER = "{reference_prompt}"


@dataclass(frozen=True)
class TrainingSpec:
    """A fine-tuning the runner does once per task, on the task's reference images.

    kind: ``dreambooth`` (full) or ``lora`` (LoRA DreamBooth); options: fields of its config
    (``instance_prompt``, ``class_prompt``, ``prior_preservation``, ``steps``, ``learning_rate``,
    ``rank``, ...), checked against the config by ``bench.prepare.check_trainings`` (which imports
    the training stack, so parsing a suite does not).
    """

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TRAINING_KINDS:
            raise ConfigError(f"training {self.name!r}: kind {self.kind!r} is not one of {', '.join(TRAINING_KINDS)}")
        missing = [name for name in REQUIRED_TRAINING_OPTIONS[self.kind] if name not in self.options]
        if missing:
            raise ConfigError(f"training {self.name!r} ({self.kind}) needs {', '.join(missing)} "
                              "(e.g. instance_prompt = \"sks emoji\"; placeholder_token = \"<sks-emoji>\")")


@dataclass(frozen=True)
class MethodSpec:
    """A named stack of registered methods; ``uses`` is a list of {"method": name, **options}."""

    name: str
    uses: tuple[dict[str, Any], ...] = ()
    prompt: str = PROMPT_PLACEHOLDER  # template for the task's prompts in this method's cells

    def __post_init__(self) -> None:
        for use in self.uses:
            if not isinstance(use, dict) or "method" not in use:
                raise ConfigError(f"method {self.name!r}: each entry of uses needs a 'method' key, got {use!r}")
        if not isinstance(self.prompt, str) or PROMPT_PLACEHOLDER not in self.prompt:
            raise ConfigError(f"method {self.name!r}: prompt must be a template containing {PROMPT_PLACEHOLDER}, "
                              f"got {self.prompt!r}")

    @property
    def trainings(self) -> list[str]:
        """Names of the suite trainings this stack needs (``{trained:NAME}`` options)."""
        names = []
        for use in self.uses:
            for value in use.values():
                name = trained_name(value)
                if name and name not in names:
                    names.append(name)
        return names

    def prompts(self, prompts: tuple[str, ...]) -> tuple[str, ...]:
        """The task's prompts through this method's template."""
        return tuple(self.prompt.replace(PROMPT_PLACEHOLDER, prompt) for prompt in prompts)

    def resolved(self, reference: str | None, trained: dict[str, str] | None = None,
                 subject: str | None = None, reference_prompt: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(method name, options) pairs with ``{reference}`` replaced by ``reference``,
        ``{trained:NAME}`` by ``trained[NAME]`` (the path of that training's artifact), and
        ``{subject}`` / ``{reference_prompt}`` inside texts by the task's subject word / reference caption."""
        texts = {SUBJECT_PLACEHOLDER: ("subject", subject), REFERENCE_PROMPT_PLACEHOLDER: ("reference_prompt", reference_prompt)}
        stack = []
        for use in self.uses:
            options = {k: v for k, v in use.items() if k != "method"}
            for key, value in options.items():
                for placeholder, (field_name, text) in texts.items():
                    if isinstance(value, str) and placeholder in value:
                        if not text:
                            raise ConfigError(f"method {self.name!r} needs the task's {field_name} but the task "
                                              "gives none")
                        options[key] = value = value.replace(placeholder, text)
                if value == REFERENCE_PLACEHOLDER:
                    if reference is None:
                        raise ConfigError(f"method {self.name!r} needs a reference image but the task has none")
                    options[key] = reference
                name = trained_name(value)
                if name:
                    if not trained or name not in trained:
                        raise ConfigError(f"method {self.name!r}: training {name!r} was not prepared")
                    options[key] = trained[name]
            stack.append((use["method"], options))
        return stack


@dataclass(frozen=True)
class Task:
    """One consistency task: what to generate and which methods to compare on it."""

    name: str
    kind: str  # style | object | shape | concept
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    references: tuple[str, ...] = ()  # absolute paths after loading
    description: str = ""
    subject: str = ""  # the word naming the task's subject in its prompts (``{subject}`` in method options)
    reference_prompt: str = ""  # the caption of its first reference (``{reference_prompt}``)
    family: str = ""  # the setting claims judge separately (default: the kind)

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.kind)
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.prompts or not self.seeds or not self.methods:
            raise ConfigError(f"task {self.name!r} needs prompts, seeds and methods")
        if "__" in self.name or "/" in self.name:
            raise ConfigError(f"task name {self.name!r} may not contain '__' or '/'")


@dataclass(frozen=True)
class Cell:
    """One unit of benchmark work: a task generated with one method stack."""

    task: Task
    method: MethodSpec

    @property
    def id(self) -> str:
        return f"{self.task.name}__{self.method.name}"


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[Task, ...]
    methods: dict[str, MethodSpec]
    steps: int = DEFAULT_STEPS  # denoising steps (models.sampling); a suite may set its own
    guidance: float = 4.0
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    trainings: dict[str, TrainingSpec] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)  # how each method's options were chosen (``[tuning]``)
    threads: int = 1  # torch CPU threads every cell generates and scores at (``bench.runner``)

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"suite {self.name!r}: threads must be an integer >= 1, got {self.threads!r}")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"suite {self.name!r} repeats a task name: {names}")
        for method in self.methods.values():
            undefined = [t for t in method.trainings if t not in self.trainings]
            if undefined:
                raise ConfigError(f"method {method.name!r} uses undefined trainings {undefined}; "
                                  f"defined: {sorted(self.trainings)}")
        for task in self.tasks:
            missing = [m for m in task.methods if m not in self.methods]
            if missing:
                raise ConfigError(f"task {task.name!r} uses undefined methods {missing}; defined: {sorted(self.methods)}")
            for method in task.methods:
                if self.methods[method].trainings and not task.references:
                    raise ConfigError(f"task {task.name!r}: method {method!r} trains on the task's references, "
                                      "but the task has none")

    @property
    def cells(self) -> list[Cell]:
        """Every (task, method) pair, in a stable order (sorted by cell id)."""
        cells = [Cell(task, self.methods[name]) for task in self.tasks for name in task.methods]
        return sorted(cells, key=lambda cell: cell.id)


def available_suites() -> list[str]:
    return sorted(path.stem for path in BUILTIN_SUITES_DIR.glob("*.toml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name (``available_suites()``: ``quick``, ``standard``, ``new-subject``) or a TOML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BUILTIN_SUITES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown suite {name_or_path!r}; built-in: {', '.join(available_suites())}, or a .toml path")
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"suite {path} is not valid TOML: {error}") from None
    builtin = path.resolve().parent == BUILTIN_SUITES_DIR.resolve()
    return suite_from_dict(data, base=path.parent, source=f"built-in:{path.stem}" if builtin else str(path))


def suite_from_dict(data: dict[str, Any], base: Path, source: str = "") -> Suite:
    """The suite ``data`` (a parsed TOML) describes; every problem found (``bench.suite_schema``) is
    raised at once as one ``SuiteError``, a line each naming ``source``, the task and the key."""
    where = source or "suite"
    raise_problems(where, schema_problems(data))
    problems: list[Problem] = []

    def built(label: str, key: str, make: Any) -> Any:
        try:
            return make()
        except ConfigError as error:
            problems.append(Problem(label, key, str(error)))
            return None

    methods = {
        name: built(f"method {name!r}", "prompt", lambda name=name, spec=spec: MethodSpec(
            name=name, uses=tuple(spec.get("uses", ())), prompt=spec.get("prompt", PROMPT_PLACEHOLDER)))
        for name, spec in data.get("methods", {}).items()
    }
    trainings = {
        name: built(f"training {name!r}", "kind", lambda name=name, spec=spec: TrainingSpec(
            name=name, kind=spec.get("kind", ""), options={k: v for k, v in spec.items() if k != "kind"}))
        for name, spec in data.get("training", {}).items()
    }
    tasks = tuple(built(f"task {task['name']!r}", "name", lambda task=task: _task(task, base, problems))
                  for task in data.get("tasks", ()))
    raise_problems(where, problems)
    known = {"name", "steps", "guidance", "methods", "tasks", "training", "tuning", "threads"}
    suite = built("suite", "tasks", lambda: Suite(
        name=data.get("name", Path(source).stem or "suite"),
        tasks=tasks,
        methods=methods,
        steps=int(data.get("steps", DEFAULT_STEPS)),
        guidance=float(data.get("guidance", 4.0)),
        source=source,
        options={k: v for k, v in data.items() if k not in known},
        trainings=trainings,
        tuning=dict(data.get("tuning", {})),
        threads=data.get("threads", 1),
    ))
    raise_problems(where, problems)
    return suite


def _task(task: dict[str, Any], base: Path, problems: list[Any]) -> Task:
    """A task of the suite's data; a reference file that is missing is added to ``problems``."""
    references = []
    for ref in task.get("references", ()):
        try:
            references.append(str(_resolve(base, ref)))
        except ConfigError as error:
            problems.append(Problem(f"task {task['name']!r}", "references", str(error)))
    return Task(
        name=task["name"],
        kind=task["kind"],
        prompts=tuple(task["prompts"]),
        seeds=tuple(task["seeds"]),
        methods=tuple(task["methods"]),
        references=tuple(references),
        description=task.get("description", ""),
        subject=task.get("subject", ""),
        reference_prompt=task.get("reference_prompt", ""),
        family=task.get("family", ""),
    )


def _resolve(base: Path, reference: str) -> Path:
    path = Path(reference)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"reference image not found: {path}")
    return path.resolve()
