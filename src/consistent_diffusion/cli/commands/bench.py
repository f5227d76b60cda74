"""`consistent-diffusion bench`: run a consistency suite, resumably, on one or many processes."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args

EXAMPLES = """examples:
  consistent-diffusion bench --out runs/bench                      # quick suite, embedded model
  consistent-diffusion bench --suite standard --out runs/standard # the committed evidence (63 min on 2 cores)
  consistent-diffusion bench --suite new-subject --out runs/new-subject   # the fine-tuning study
  consistent-diffusion bench --suite my_suite.toml --model path/to/sd15 --device cuda --out runs/bench-sd15
  accelerate launch -m consistent_diffusion bench --device cuda --out runs/bench               # multi-GPU
  consistent-diffusion bench --workers 4 --out runs/bench          # 4 CPU processes, one core each
  torchrun --nproc_per_node 2 -m consistent_diffusion bench --out runs/bench                   # the same via a launcher
A killed run continues where it stopped when re-run with the same --out.
Every cell and training runs at one torch thread (a suite's `threads` can change it), so the
numbers do not depend on the machine's cores; more cores are used through more processes
(--workers, default: the CPU cores, up to 4; 1 on a GPU). On x86-64 the CPU kernels are pinned
to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR; a value you set wins), so an AVX-512
machine gives the same numbers as an AVX2 one.
Cells that need fine-tuning (DreamBooth, LoRA DreamBooth) train first on the task's reference
images, once per task, cached under OUT/prepared; their training time and trainable parameters
are part of the cells' cost.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a consistency benchmark suite and write report.json / report.md / report.html",
        description="Run every cell (task x method) of a suite, score it with validated metrics and "
        "write a report with a method x consistency-kind table, image grids, trade-off plots and the "
        "survey's claims with measured verdicts. Finished cells are kept: re-running resumes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", default="quick",
                        help="built-in suite: quick (the claims, a smoke view: 15 min on 2 CPU cores), standard (the "
                             "committed evidence: 90 tasks, 16 images per cell, 63 min on 2 "
                             "CPU cores), full (more subjects and "
                             "seeds, for GPUs), tuning (where quick's options are chosen), new-subject (the "
                             "fine-tuning study); or a .toml file (default: quick)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (re-use it to resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes to run the cells on, each at the suite's thread count (default: the CPU "
                             "cores up to 4 on CPU, 1 on a GPU); the report is the same for any N")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # I/N: set by --workers for its processes
    parser.add_argument("--extractors", metavar="JSON",
                        help='override metric extractors, e.g. \'{"style": "palette", "text": null}\'')
    parser.add_argument("--metrics", nargs="+", default=None, metavar="SET",
                        help="extractor sets to score with: emoji (the embedded model's default), dreambooth, "
                             "consistory, csd (see `consistent-diffusion score --help`); other models get none by "
                             "default, so their style/object/text scores read 'not measured'")
    parser.add_argument("--feature-model", action="append", default=[], metavar="NAME=PATH",
                        help="local weights of an extractor, e.g. dino=DIR (nothing is downloaded)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def _shard(worker: str | None, out: Path):
    """This process's shard and barrier: from ``--worker I/N`` (a process of ``--workers``), from
    accelerate when launched with several processes, else (0, 1) without a barrier."""
    from consistent_diffusion.bench.runner import Shard
    from consistent_diffusion.bench.workers import WORKERS_DIR, file_barrier, parse_worker

    if worker is not None:
        index, count = parse_worker(worker)
        return Shard(index, count), None, file_barrier(out / WORKERS_DIR, index, count)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard(), None, None
    from accelerate import PartialState

    state = PartialState(cpu=not _has_gpu())
    return Shard(state.process_index, state.num_processes), state, state.wait_for_everyone


def _worker_progress(worker: str | None, out: Path):
    """A process of ``--workers`` writes its prepare stage's progress for the main process to show."""
    if worker is None:
        return None
    from consistent_diffusion.bench.progress import ProgressFile, progress_path
    from consistent_diffusion.bench.workers import WORKERS_DIR, parse_worker

    return ProgressFile(progress_path(out / WORKERS_DIR, parse_worker(worker)[0]))


def default_workers(device: str) -> int:
    """Bench processes by default: the CPU cores up to 4 on CPU, 1 on a GPU."""
    if not str(device).startswith("cpu"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def _workers(args: argparse.Namespace) -> int:
    """--workers, or ``default_workers``; 1 when called without a command line to start again."""
    if getattr(args, "command_argv", None) is None:
        return 1
    return args.workers if args.workers is not None else default_workers(args.device)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.core.cpu_kernels import pin_cpu_kernels

    pin_cpu_kernels()  # before any torch computation; the worker processes inherit it
    from consistent_diffusion.bench.report import write_reports
    from consistent_diffusion.bench.runner import merge_report, run_bench
    from consistent_diffusion.bench.scoring import make_scorer
    from consistent_diffusion.bench.suite import load_suite
    from consistent_diffusion.bench.suite_checks import check_suite_for_bench
    from consistent_diffusion.core.errors import ConfigError

    suite = load_suite(args.suite)
    check_suite_for_bench(suite, args.suite)  # every suite problem, one line each, before any model loads
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    try:
        extractors = json.loads(args.extractors) if args.extractors else None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--extractors is not valid JSON: {error}") from None
    out = Path(args.out)
    shard, state, barrier = _shard(args.worker, out)
    if state is not None and str(args.device) == "cuda":
        args.device = str(state.device)
    from consistent_diffusion.metrics.score import EXTRACTOR_SETS, parse_feature_models

    sets = tuple(args.metrics or ())
    unknown = [name for name in sets if name not in EXTRACTOR_SETS]
    if unknown:
        raise ConfigError(f"--metrics takes extractor sets here ({', '.join(EXTRACTOR_SETS)}), got {unknown}")
    options = {name: {"model": path} for name, path in parse_feature_models(args.feature_model).items()}
    scorer = make_scorer(extractors, device=args.device, extractor_sets=sets or None, extractor_options=options)
    workers = _workers(args) if args.worker is None and state is None else 1
    if workers > 1:
        from consistent_diffusion.bench.runner import finished_cells
        from consistent_diffusion.bench.workers import run_workers

        run_workers(args.command_argv, out, workers, suite.threads, total_cells=len(suite.cells),
                    done_cells=lambda: finished_cells(out, suite), progress=not args.quiet)
    else:
        run_bench(suite, out, load_pipe=lambda: load_model_from_args(args), scorer=scorer,
                  shard=shard, batch_size=args.batch_size, progress=not args.quiet and shard.index == 0,
                  load_train_pipe=lambda: load_model_from_args(args, dtype="float32"),  # fine-tune in full precision
                  barrier=barrier, on_prepare=_worker_progress(args.worker, out))
    if state is not None:
        state.wait_for_everyone()
    if shard.index == 0 and args.worker is None:
        report = merge_report(suite, out)
        md, page = write_reports(report, out)
        status = "complete" if report.complete else f"incomplete ({len(report.missing_cells)} cells missing)"
        print(f"report {status}: {page} (also {md.name}, report.json)")
    return 0
