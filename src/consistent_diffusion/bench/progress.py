"""Progress of the bench's prepare stage (the fine-tunings before the cells).

``runner.prepare_shard`` calls ``on_prepare(PrepareProgress)`` when a process's share of the
trainings starts, after every training step and when each training ends. Listeners:

- ``PrepareBars``: one tqdm bar per training (``train 2/13 object-red / subject_lora``, its
  steps, tqdm's time left), for a bench on one process;
- ``ProgressFile``: the latest event as JSON in a file, for ``bench --workers N``: each worker writes
  ``OUT/.workers/progress.<i>.json`` and the main process reads them (``read_progress``) into one
  line (``status_line``) until every worker has finished its trainings; then the cell bar starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from consistent_diffusion.core.outputs import write_json_atomic


@dataclass(frozen=True)
class PrepareProgress:
    """Where one process's prepare stage stands.

    done/total: trainings of this process finished (cached ones included) / to do; task, training:
    the one running now ("" when none); step/steps: its completed steps / planned steps;
    seconds_left: its estimated remaining time (None before a step was timed); finished: the
    stage is over (the cells come next)."""

    done: int
    total: int
    task: str = ""
    training: str = ""
    step: int = 0
    steps: int = 0
    seconds_left: float | None = None
    finished: bool = False

    @property
    def running(self) -> bool:
        return bool(self.training) and not self.finished

    def line(self) -> str:
        """e.g. ``training 2/13 object-red / subject_lora: step 40/200, 2:10 left``."""
        if not self.running:
            return f"trainings {self.done}/{self.total} done"
        left = f", {format_seconds(self.seconds_left)} left" if self.seconds_left is not None else ""
        return f"training {self.done + 1}/{self.total} {self.task} / {self.training}: step {self.step}/{self.steps}{left}"


PrepareListener = Callable[[PrepareProgress], None]


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepTimer:
    """Seconds left of a training from the pace of the steps seen so far in this session (a resumed
    training starts at its checkpoint's step; loading and class images are not steps)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.first: tuple[int, float] | None = None  # (step, time) when the timing started

    def start(self, step: int = 0) -> None:
        self.first = (step, time.monotonic())

    def seconds_left(self, step: int) -> float | None:
        if self.first is None or step <= self.first[0]:
            return None
        pace = (time.monotonic() - self.first[1]) / (step - self.first[0])
        return max(0.0, pace * (self.steps - step))


class PrepareBars:
    """A tqdm bar per training of a one-process bench (closed when the training ends)."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar: Any = None
        self.key: tuple[int, str, str] | None = None

    def __call__(self, event: PrepareProgress) -> None:
        from tqdm.auto import tqdm

        key = (event.done, event.task, event.training)
        if key != self.key:
            self.close()
            if event.running:
                self.bar = tqdm(total=event.steps, initial=event.step, unit="step", disable=self.disable,
                                desc=f"train {event.done + 1}/{event.total} {event.task} / {event.training}")
            self.key = key
        if self.bar is not None and event.running:
            self.bar.update(event.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressFile:
    """Writes each event to ``path`` (atomically; at most every ``interval`` seconds unless a
    training starts or ends), for a main process to read."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path = Path(path)
        self.interval = interval
        self.written = (-1.0, None)  # (time, (done, training, finished))

    def __call__(self, event: PrepareProgress) -> None:
        now, state = time.monotonic(), (event.done, event.training, event.finished)
        if state == self.written[1] and now - self.written[0] < self.interval:
            return
        write_json_atomic(asdict(event), self.path)
        self.written = (now, state)


def progress_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"progress.{index}.json"


def read_progress(folder: Path, count: int) -> list[PrepareProgress | None]:
    """The latest event of each of ``count`` workers (None: none written yet, or being replaced)."""
    events: list[PrepareProgress | None] = []
    for index in range(count):
        try:
            events.append(PrepareProgress(**json.loads(progress_path(folder, index).read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            events.append(None)
    return events


def status_line(events: Sequence[PrepareProgress | None]) -> str:
    """One line for every worker's prepare stage: trainings done of all, then what each trains."""
    known = [event for event in events if event is not None]
    done, total = sum(e.done for e in known), sum(e.total for e in known)
    running = [f"w{index}: {event.line()}" for index, event in enumerate(events) if event is not None and event.running]
    return " | ".join([f"trainings {done}/{total}", *running])


def all_finished(events: Sequence[PrepareProgress | None]) -> bool:
    return all(event is not None and event.finished for event in events)
