"""The power arithmetic and time estimate behind the standard suite's size (docs/bench.md: power).

From a bench report (default: the committed quick report, docs/bench-quick), per family and method:
the task means of the paired gain over plain on the family's own metric, their SD (*between*),
the per-image SD of the paired difference (*within*, averaged over tasks), the between-task SD of
the true task means ``tau = sqrt(between^2 - within^2 / n)``, the report's own pooled half-width,
and the half-width a suite of T tasks and ``--images`` images per task reaches,
``1.96 * sqrt(tau^2 / T + within^2 / (T * images))`` (T: the tasks per family of ``--suite``).
Then the suite's run time on ``--workers`` processes, from the report's per-cell costs: each cell's
``seconds_per_image`` as the mean of the report's cells of the same family and method, times its
images, plus each training's mean ``train_seconds``, summed and divided by the workers (no
calibration: compare the same sum for the report's own suite with its measured wall time).

    python scripts/bench_power.py --suite standard
    python scripts/bench_power.py --report runs/bench/report.json --suite standard --images 16
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from consistent_diffusion.bench import stats
from consistent_diffusion.bench.records import Report, load_report
from consistent_diffusion.bench.suite import Suite, load_suite

REFERENCE_REPORT = Path(__file__).resolve().parents[1] / "docs" / "bench-quick" / "report.json"
TARGET = {"style-unnamed": "reference_style", "style-unseen": "reference_style", "object": "object",
          "concept-exemplar": "concept", "concept-text": "concept", "shape": "shape"}
Z95 = 1.96


def power_rows(report: Report, tasks_per_family: dict[str, int], images: int) -> list[dict]:
    """One row per (family, method) with at least two tasks: the variance split and half-widths."""
    groups: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    for cell in report.cells:
        if cell.family in TARGET and not cell.is_plain:
            samples = stats.paired_cell_samples(report, cell, TARGET[cell.family])
            if samples:
                groups[(cell.family, cell.method)].append(samples)
    rows = []
    for (family, method), tasks in sorted(groups.items()):
        if len(tasks) < 2:
            continue
        means = [statistics.mean(task) for task in tasks]
        per_task = statistics.mean(len(task) for task in tasks)
        between = statistics.stdev(means)
        within_var = statistics.mean(statistics.variance(task) for task in tasks)
        tau_var = max(between**2 - within_var / per_task, 0.0)
        pooled = stats.bootstrap_interval(tasks)
        new = tasks_per_family.get(family, len(tasks))
        rows.append({"family": family, "method": method, "task_means": means, "between": between,
                     "within": math.sqrt(within_var), "within_se": math.sqrt(within_var / per_task),
                     "tau": math.sqrt(tau_var), "half_width": (pooled.high - pooled.low) / 2, "tasks": new,
                     "new_half_width": Z95 * math.sqrt(tau_var / new + within_var / (new * images))})
    return rows


def estimated_seconds(report: Report, suite: Suite) -> tuple[float, float, int]:
    """(generation and scoring seconds, training seconds, trainings) of ``suite`` on one core."""
    per_image: dict[tuple[str, str], list[float]] = defaultdict(list)
    trained: dict[str, list[float]] = defaultdict(list)
    for cell in report.cells:
        per_image[(cell.family, cell.method)].append(cell.cost.seconds_per_image)
        for training in cell.trainings:
            trained[training.training].append(training.train_seconds)
    generation, trainings = 0.0, set()
    for cell in suite.cells:
        key = (cell.task.family, cell.method.name)
        if key not in per_image:
            raise SystemExit(f"the report has no cell of family {key[0]!r} and method {key[1]!r} to cost it by")
        generation += statistics.mean(per_image[key]) * len(cell.task.prompts) * len(cell.task.seeds)
        trainings |= {(cell.task.name, name) for name in cell.method.trainings}
    training_seconds = sum(statistics.mean(trained[name]) for _, name in trainings)
    return generation, training_seconds, len(trainings)


def task_means_text(means: list[float]) -> str:
    """The task means themselves for a small suite; their count and range for a large one."""
    if len(means) <= 4:
        return ", ".join(f"{m:+.3f}" for m in means)
    return f"{len(means)} tasks, {min(means):+.3f} to {max(means):+.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default=str(REFERENCE_REPORT), help="a bench report.json or folder")
    parser.add_argument("--suite", default="standard", help="the suite to size (built-in name or .toml)")
    parser.add_argument("--images", type=int, default=16, help="images per task in the sized suite")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    report, suite = load_report(args.report), load_suite(args.suite)
    counts = Counter(task.family for task in suite.tasks)
    print(f"{suite.name}: tasks per family {dict(counts)}")
    print("| family | method | task means | between | within (SE) | tau | half-width now | "
          f"{suite.name} (T, {args.images} images) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in power_rows(report, dict(counts), args.images):
        means = task_means_text(row["task_means"])
        print(f"| {row['family']} | {row['method']} | {means} | {row['between']:.3f} | {row['within']:.3f} "
              f"({row['within_se']:.3f}) | {row['tau']:.3f} | {row['half_width']:.3f} | "
              f"{row['new_half_width']:.3f} ({row['tasks']}) |")
    targets = [suite] if report.suite.name == suite.name else [load_suite(report.suite.name), suite]
    for target in targets:
        generation, training, count = estimated_seconds(report, target)
        print(f"{target.name}: {len(target.cells)} cells, generation and scoring {generation / 60:.1f} min, "
              f"{count} trainings {training / 60:.1f} min; {(generation + training) / 60:.1f} min on one core, "
              f"{(generation + training) / 60 / args.workers:.1f} min on {args.workers} workers")


if __name__ == "__main__":
    main()
