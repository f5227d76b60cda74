#!/usr/bin/env python
"""Every method and fine-tune on the real SD 1.5, SD 2.1 and SDXL architectures (random weights).

Each architecture is built from its published configuration, written in ``real_arch_configs.py`` (UNet, VAE, text
encoder(s), scheduler: the values of the published ``config.json`` files; nothing is downloaded),
with random weights, and every method runs through the public registry (``get_method``) for 2
steps at a reduced size (``real_arch_rows.py`` has the rows): plain; img2img; DDPM inversion +
edit (with the reconstruction error); StyleAligned with a generated and a real reference;
consistent subject in both modes (subject mode with feature injection); ControlNet (a random
ControlNet of the same architecture); LoRA; textual inversion; the IP-Adapter (random, released
layout); the bench's three combinations; StyleAligned and consistent subject at 2, 4 and 8 images;
and one optimiser step of DreamBooth, LoRA, textual inversion and ControlNet training (gradient
checkpointing on) through the project's training code, each in a fresh process. For each row:
whether it ran (or its error), the peak memory above the row's start, CPU seconds of the calling
thread (one torch thread) and their ratio to the plain row of the same process
(``real_arch_table.py`` writes the tables). The tokenizer is the project's offline byte-level
``CLIPTokenizer`` (77 tokens; the weights are random, so the vocabulary only has to tokenize).

``--jobs 2`` shares the rows between two processes by image count (``split_rows``), run at once at
one thread each, each with its own plain row as the denominator of its ratios: both cores, the
same one-thread CPU seconds. Allocations over 64 KiB are mapped and handed back to the system when freed (``mallopt``),
so the sampled resident memory reads each row's own live memory, not what the allocator kept.

``--device cuda`` runs at the native resolutions (512 / 768 / 1024 px) in float16 (training rows:
float32 weights, bf16 autocast), one process, after a warm-up call; its table has seconds per image
(wall) and ``torch.cuda.max_memory_allocated``, headed with the GPU's name.

Usage (SDXL needs about 10 GB while it is built; run one big architecture at a time):
    python scripts/real_architectures.py --arch sd15 [--size 256] [--jobs 2]
        [--rows training-free|all] [--batches 2 4 8] [--only LABEL ...] [--out table.md]
    python scripts/real_architectures.py --device cuda --arch sd15 sd21 sdxl --rows all --steps 20 \
        --out docs/real_architectures_gpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import PeakMemory  # noqa: E402
from real_arch_configs import ARCHITECTURES, build_pipeline, parameter_count  # noqa: E402
from real_arch_rows import (  # noqa: E402
    TRAINING_LABELS,
    generate,
    make_inputs,
    measure,
    row_plan,
    split_rows,
    training_free_rows,
    training_rows,
)
from real_arch_table import markdown  # noqa: E402

# -- running ----------------------------------------------------------------------------------

RESULT_PREFIX, BUILD_PREFIX = "ROW-RESULT ", "BUILD-RESULT "
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 64 * 1024) -> bool:
    """Serve allocations over ``threshold`` bytes by mmap and unmap them when freed (glibc), so resident
    memory follows live tensors; a fixed threshold also stops glibc raising it after large frees."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc: the sampled peak may then read low
        return False


@dataclass(frozen=True)
class Settings:
    """How one architecture is run: image size, dtype, device, steps, the growth batches, the row filter."""

    name: str
    size: int
    dtype: torch.dtype
    device: str = "cpu"
    steps: int = 2
    batches: tuple[int, ...] = (2, 4, 8)
    only: tuple[str, ...] = ()

    @classmethod
    def make(cls, name: str, size: int | None = None, device: str = "cpu", steps: int = 2,
             batches: tuple[int, ...] = (2, 4, 8), only: tuple[str, ...] = ()) -> Settings:
        """CPU: the architecture's reduced size and dtype; CUDA: its native size in float16."""
        arch = ARCHITECTURES[name]
        cuda = device.startswith("cuda")
        return cls(name, size or (arch.native if cuda else arch.size), torch.float16 if cuda else arch.dtype,
                   device, steps, tuple(batches), tuple(only))

    def argv(self) -> list[str]:
        """The command-line options that rebuild these settings in a child process."""
        return ["--arch", self.name, "--size", str(self.size), "--device", self.device, "--steps", str(self.steps),
                "--batches", *map(str, self.batches), "--only", *self.only]

    def keep(self, label: str) -> bool:
        return label == "plain" or not self.only or any(o in label for o in self.only)


def build(settings: Settings, training: bool = False) -> tuple[Any, dict[str, Any]]:
    """The pipeline (training on CUDA: float32 weights) and its build record."""
    start = time.perf_counter()
    dtype = torch.float32 if training and settings.device.startswith("cuda") else settings.dtype
    pipe = build_pipeline(ARCHITECTURES[settings.name], dtype=dtype, device=settings.device)
    record = {"build_s": time.perf_counter() - start, "rss_mb": PeakMemory._rss() / 2**20,
              "gpu_mb": torch.cuda.memory_allocated() / 2**20 if settings.device.startswith("cuda") else 0.0,
              "params": ", ".join(f"{k} {v:.0f}M" for k, v in parameter_count(pipe).items())}
    return pipe, record


def kept_rows(settings: Settings) -> list[Any]:
    """The training-free rows ``settings`` keeps, in table order (built lazily: labels and batches)."""
    return [r for r in row_plan(settings.batches) if settings.keep(r.label)]


def run_rows(settings: Settings, part: int | None = None, parts: int = 2, report: Any = None) -> tuple[list, dict]:
    """Build the pipeline and measure its training-free rows in this process: all of them, or share
    ``part`` of ``parts`` (``split_rows``: each share has its own plain row)."""
    torch.set_num_threads(1)
    labels = set(split_rows(kept_rows(settings), parts)[part]) if part is not None else \
        {r.label for r in kept_rows(settings)}
    pipe, record = build(settings)
    with tempfile.TemporaryDirectory(prefix="cd-real-arch-") as scratch:
        full = any(r.label in labels and r.label != "plain" and not r.growth for r in row_plan(settings.batches))
        inputs = make_inputs(pipe, settings.size, Path(scratch), full=full)
        rows = [r for r in training_free_rows(pipe, inputs, settings.size, settings.batches, settings.steps)
                if r.label in labels]
        warm_up(pipe, settings)
        results = measure(rows, settings.device, report)
    return results, record


def warm_up(pipe: Any, settings: Settings) -> None:
    """One unmeasured call before the first row: lazy initialisation, kernels loaded. On CUDA it has
    the plain row's shape and steps, so kernel selection and the clocks' ramp-up stay out of the
    plain row, the ratios' denominator (one 1-step image left plain 2-4x slow per image on an H200)."""
    cuda = settings.device.startswith("cuda")
    generate(pipe, [], 2 if cuda else 1, settings.size, steps=settings.steps if cuda else 1)


def run_architecture(name: str, size: int | None = None, rows: str = "training-free",
                     batches: tuple[int, ...] = (2, 4, 8), only: tuple[str, ...] = (), jobs: int = 1,
                     device: str = "cpu", steps: int = 2, report: Any = None) -> tuple[str, list]:
    """Run ``name``'s rows, return (markdown table, results); ``report(result)`` after each row.
    ``only``: row labels to keep (substring match; plain is always run). ``jobs=2``: method and growth
    rows in two processes at once. Training rows (``rows="all"``) run afterwards on a pipeline of their
    own (they change it): on the CPU each in a fresh process, so resident memory cannot hide the next
    row's; on CUDA in this process (``max_memory_allocated`` is exact, and a process start costs more
    than the row)."""
    settings = Settings.make(name, size, device, steps, batches, only)
    if jobs > 1:
        results, record = run_groups_in_parallel(settings)
        for result in results if report else ():
            report(result)
    else:
        results, record = run_rows(settings, report=report)
    gc.collect()
    if rows == "all":
        for label in (label for label in TRAINING_LABELS if settings.keep(label)):
            result = row_in_fresh_pipeline(settings, label) if settings.device.startswith("cuda") else \
                row_in_subprocess(settings, label)
            results.append(result)
            if report:
                report(result)
    arch = ARCHITECTURES[name]
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    table = markdown(arch.label, settings.size, arch.native, str(settings.dtype).replace("torch.", ""), steps,
                     results, record, device, device_name)
    return table, results


def _child(settings: Settings, extra: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), *settings.argv(), *extra]
    with open(log, "w", encoding="utf-8") as stream:
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)


def _parse(log: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    results, record = [], None
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.startswith(RESULT_PREFIX):
            results.append(json.loads(line[len(RESULT_PREFIX):]))
        elif line.startswith(BUILD_PREFIX):
            record = json.loads(line[len(BUILD_PREFIX):])
    return results, record


def run_groups_in_parallel(settings: Settings, parts: int = 2) -> tuple[list, dict[str, Any]]:
    """The rows shared between ``parts`` child processes run at once (one thread each); results in
    table order, each tagged with its ``process`` (ratios use that process's own plain row)."""
    with tempfile.TemporaryDirectory(prefix="cd-real-arch-jobs-") as folder:
        logs = [Path(folder) / f"part{part}.log" for part in range(parts)]
        children = [_child(settings, ["--group", str(part)], log) for part, log in enumerate(logs)]
        for child in children:
            child.wait()
        results, record = [], None
        for process, (child, log) in enumerate(zip(children, logs, strict=True)):
            rows, built = _parse(log)
            record = record or built
            results += [{**row, "process": process} for row in rows]
            if child.returncode and not rows:
                tail = (log.read_text(encoding="utf-8").strip().splitlines() or ["no output"])[-1][:160]
                results.append(_failed(f"rows of process {process}", 0, f"process exited {child.returncode}: {tail}"))
    return in_table_order(results, kept_rows(settings)), \
        record or {"build_s": 0.0, "rss_mb": 0.0, "gpu_mb": 0.0, "params": "not built"}


def in_table_order(results: list[dict[str, Any]], rows: list[Any]) -> list[dict[str, Any]]:
    """``results`` sorted as ``rows`` (plain rows first, by process); unknown labels last."""
    order = {row.label: index for index, row in enumerate(rows)}
    return sorted(results, key=lambda r: (order.get(r["row"], len(order)), r.get("process", 0)))


def _failed(label: str, batch: int, error: str) -> dict[str, Any]:
    return {"row": label, "batch": batch, "cpu_s": 0.0, "wall_s": 0.0, "peak_mb": None, "peak_total_mb": None,
            "note": "", "error": error}


def row_in_subprocess(settings: Settings, label: str) -> dict[str, Any]:
    """One row measured in a fresh process (``--row``); its result or the process's error."""
    command = [sys.executable, str(Path(__file__).resolve()), *settings.argv(), "--row", label]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return _failed(label, 1, f"process exited {done.returncode}: {tail}")


def row_in_fresh_pipeline(settings: Settings, label: str) -> dict[str, Any]:
    """One row on a pipeline built for it in this process, freed afterwards (CUDA)."""
    gc.collect()
    torch.cuda.empty_cache()
    return one_row(settings, label, announce=False)


def one_row(settings: Settings, label: str, announce: bool = True) -> dict[str, Any]:
    """Build the pipeline and measure the row ``label`` (a training row or a training-free one)."""
    torch.set_num_threads(1)
    training = label in TRAINING_LABELS
    pipe, _ = build(settings, training=training)
    with tempfile.TemporaryDirectory(prefix="cd-real-arch-") as scratch:
        folder = Path(scratch)
        rows = training_rows(pipe, settings.size, folder, settings.device) if training else \
            training_free_rows(pipe, make_inputs(pipe, settings.size, folder), settings.size, settings.batches,
                               settings.steps)
        [result] = measure([r for r in rows if r.label == label], settings.device)
    if announce:
        print_result(result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), nargs="+", required=True)
    parser.add_argument("--size", type=int, help="pixels (default: the reduced size on CPU, the native one on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (native size, float16)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per row (default 2)")
    parser.add_argument("--rows", choices=["training-free", "all"], default="training-free")
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--only", nargs="*", default=[], help="keep rows whose label contains one of these")
    parser.add_argument("--jobs", type=int, choices=[1, 2], default=1,
                        help="2: the rows shared between two processes at once, by image count (CPU)")
    parser.add_argument("--out", type=Path, help="also write the table(s) here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # child: measure this row, print its result as JSON
    parser.add_argument("--group", type=int, choices=[0, 1], help=argparse.SUPPRESS)  # child of --jobs 2
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.device != "cpu" and not cuda:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (the CPU table is the default)")
    if cuda and args.jobs > 1:
        parser.error("--jobs 2 is for the CPU (one GPU runs one process)")
    if (args.row or args.group is not None) and len(args.arch) > 1:
        parser.error("--row / --group take one --arch")
    if args.steps < 1 or (args.size is not None and (args.size < 64 or args.size % 64)):
        parser.error("--steps must be >= 1 and --size a multiple of 64 (>= 64)")
    return args


def footer(args: argparse.Namespace, seconds: float) -> str:
    threads = "one torch thread per process" + (", two processes at once (--jobs 2)" if args.jobs > 1 else "")
    where = (f"gpu: {torch.cuda.get_device_name()}" if args.device.startswith("cuda")
             else f"cpu: {platform.machine()}, {threads}")
    return f"\n`{where}, torch {torch.__version__}; whole run {seconds:.0f} s wall`\n"


def print_result(result: dict[str, Any]) -> None:
    """One row's result as a JSON line, so a run stopped part-way still has every finished row."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):  # the sampled resident memory is the CPU's measure
        map_large_allocations()
    if args.row or args.group is not None:
        settings = Settings.make(args.arch[0], args.size, args.device, args.steps, tuple(args.batches),
                                 tuple(args.only))
        if args.row:
            one_row(settings, args.row)
        else:
            _, record = run_rows(settings, args.group, report=print_result)
            print(BUILD_PREFIX + json.dumps(record), flush=True)
        return
    tables = []
    for name in args.arch:
        start = time.perf_counter()
        table, _ = run_architecture(name, args.size, args.rows, tuple(args.batches), tuple(args.only), args.jobs,
                                    args.device, args.steps, report=print_result)
        tables.append(table + footer(args, time.perf_counter() - start))
        print(tables[-1], flush=True)
        if args.out:  # after each architecture, so a later failure loses nothing
            from consistent_diffusion.core.outputs import atomic_path

            with atomic_path(args.out) as temporary:
                temporary.write_text("\n".join(tables), encoding="utf-8")


if __name__ == "__main__":
    main()
