"""``bench --workers N``: the bench on N local processes without a launcher.

The main process starts N copies of the same ``bench`` command, each with ``--worker i/N``: worker
i trains its share of the trainings, waits at a file barrier for the others (``file_barrier``),
then runs its share of the cells (``runner.run_bench``). The main process shows one progress bar
over every cell, stops all workers when one fails (its log's tail in the error), and merges the
report when all are done. Each worker's torch runs at the suite's thread count (one by default),
so N workers use N cores and the numbers are those of a one-process run.

    OUT/.workers/worker<i>.log      what each worker printed (kept after a failure)
    OUT/.workers/ready.<i>          worker i finished its trainings (the barrier)
    OUT/.workers/progress.<i>.json  worker i's prepare stage (``bench.progress``), shown by the main process
    OUT/.workers/abort              written by the main process when a worker failed
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consistent_diffusion.core.errors import ConsistentDiffusionError

WORKERS_DIR = ".workers"
POLL_SECONDS = 0.5


def parse_worker(text: str) -> tuple[int, int]:
    """``"i/n"`` as (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConsistentDiffusionError(f"--worker takes I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise ConsistentDiffusionError(f"--worker {text}: I must be in 0..N-1")
    return index, count


def file_barrier(folder: Path, index: int, count: int, poll: float = POLL_SECONDS) -> Callable[[], None]:
    """A barrier over ``count`` processes sharing ``folder``: each call marks ``index`` ready and
    returns once all are; raises when the main process wrote ``abort`` (another worker failed)."""

    def wait() -> None:
        (folder / f"ready.{index}").touch()
        while not all((folder / f"ready.{i}").exists() for i in range(count)):
            if (folder / "abort").exists():
                raise ConsistentDiffusionError("another bench worker failed; stopping")
            time.sleep(poll)

    return wait


PARENT_ENV = "CONSISTENT_DIFFUSION_BENCH_PARENT"  # the main process's pid, given to each worker


def die_with_parent() -> None:
    """In a worker (Linux): receive SIGTERM when the main process dies, even by kill -9, so a
    re-run never races an orphaned worker for the same cell. Set by the worker itself (no
    ``preexec_fn``, which is unsafe in a threaded parent such as the app); a worker whose parent
    is already gone stops at once."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise SystemExit("the bench's main process is gone; stopping")


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _all_exited(processes: list[tuple[subprocess.Popen, Any]], folder: Path) -> bool:
    """True when every worker exited cleanly; raises (after writing ``abort``) when one failed."""
    codes = [process.poll() for process, _ in processes]
    failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
        (folder / "abort").touch()
        log = folder / f"worker{failed[0]}.log"
        raise ConsistentDiffusionError(
            f"bench worker {failed[0]} failed (exit {codes[failed[0]]}); its log {log} ends:\n"
            f"{_log_tail(log)}\nre-run the same command to resume")
    return all(code == 0 for code in codes)


def _show_prepare(processes: list[tuple[subprocess.Popen, Any]], folder: Path, count: int, progress: bool,
                  on_prepare: Callable[[str], None] | None) -> None:
    """The workers' prepare stage (``bench.progress``): one bar over every worker's trainings whose
    text says what each trains, its step and time left; returns when all have finished theirs."""
    from tqdm.auto import tqdm

    from consistent_diffusion.bench.progress import all_finished, read_progress, status_line

    bar, last = None, ""
    try:
        while True:
            events = read_progress(folder, count)
            if all_finished(events) or _all_exited(processes, folder):
                return
            total = sum(event.total for event in events if event is not None)
            if bar is None and total:
                bar = tqdm(total=total, desc=f"prepare ({count} workers)", unit="training", disable=not progress)
            line = status_line(events)
            if bar is not None:
                bar.total = max(bar.total, total)
                bar.update(sum(event.done for event in events if event is not None) - bar.n)
                bar.set_postfix_str(line.split(" | ", 1)[1] if " | " in line else "")
            if line != last and on_prepare is not None:
                on_prepare(line)
            last = line
            time.sleep(POLL_SECONDS)
    finally:
        if bar is not None:
            bar.close()


def run_workers(argv: Sequence[str], out: Path, count: int, threads: int, done_cells: Callable[[], int],
                total_cells: int, progress: bool = True, on_progress: Callable[[int], None] | None = None,
                on_prepare: Callable[[str], None] | None = None) -> None:
    """Run ``consistent-diffusion <argv> --worker i/count`` for every i and wait for all of them.

    argv: the bench command's own arguments (its ``--workers`` is overridden). done_cells: how
    many cells are finished now (for the progress bar, and ``on_progress(done)`` whenever it
    grows). Before the cells, the workers' trainings: a bar with what each trains
    (``_show_prepare``), and ``on_prepare(line)`` whenever that line changes. Raises ConsistentDiffusionError, after stopping the others, when a worker fails; a
    KeyboardInterrupt stops every worker too."""
    from tqdm.auto import tqdm

    folder = out / WORKERS_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    processes = []
    for index in range(count):
        log = (folder / f"worker{index}.log").open("w", encoding="utf-8")
        command = [sys.executable, "-m", "consistent_diffusion", *argv, "--workers", "1", "--quiet",
                   "--worker", f"{index}/{count}"]
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env={**env, "RANK": str(index), PARENT_ENV: str(os.getpid())}), log))
    try:
        _show_prepare(processes, folder, count, progress, on_prepare)
        with tqdm(total=total_cells, initial=done_cells(), desc=f"bench ({count} workers)", unit="cell",
                  disable=not progress) as bar:
            while True:
                done = done_cells()
                if done != bar.n and on_progress is not None:
                    on_progress(done)
                bar.update(done - bar.n)
                if _all_exited(processes, folder):
                    return
                time.sleep(POLL_SECONDS)
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            log.close()
