#!/usr/bin/env python
"""Cost of LoRA DreamBooth vs full DreamBooth, measured side by side in one run.

For each method a fresh child process (so peak memory is its own) loads the model, trains
``--warmup + --steps`` steps through the real training loop (``training.loop.run_training``) and
reports: median step time after warm-up, peak memory (CPU: peak resident set size of the process
and its growth during training; GPU: ``torch.cuda.max_memory_allocated``), trainable parameters,
and the size of what the run ships (LoRA: the adapter file; DreamBooth: the UNet weights, and the
whole diffusers folder). Writes ``OUT/bench_finetune.json`` and ``OUT/bench_finetune.md`` (a
markdown table for docs/finetuning.md).

    python scripts/bench_finetune.py --model tiny --out runs/bench_finetune
    python scripts/bench_finetune.py --model embedded --steps 20 --out runs/bench_finetune_embedded
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lora", "dreambooth")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _instance_images(folder: Path, size: int) -> Path:
    """Five synthetic subject images (a red circle at several offsets) when none are given."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(5):
        image = Image.new("RGB", (size, size), "white")
        lo, hi = size // 5 + index, size - size // 5 + index
        ImageDraw.Draw(image).ellipse((lo, lo, hi, hi), fill=(220, 30, 30))
        image.save(folder / f"subject_{index}.png")
    return folder


def child(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from consistent_diffusion.models.vae import native_size
    from consistent_diffusion.testing import load_pipeline_or_tiny
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
    from consistent_diffusion.training.loop import run_training
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, LoraDreamBoothTask

    pipe = load_pipeline_or_tiny(args.model)  # on the CPU in float32; training moves it to --device
    device = args.device
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-", dir=args.work))
    size = native_size(pipe)[0]
    instance = Path(args.instance_dir) if args.instance_dir else _instance_images(work / "instance", size)
    common = dict(out=work / "run", instance_dir=instance, instance_prompt=args.prompt, steps=args.warmup + args.steps,
                  checkpoint_every=10**6, batch_size=args.batch_size, progress=False, device=device, seed=0)
    if args.child == "lora":
        config = LoraDreamBoothConfig(**common, rank=args.rank)
        task = LoraDreamBoothTask(pipe, config)
    else:
        config = DreamBoothConfig(**common)
        task = DreamBoothTask(pipe, config)
    trainable = sum(p.numel() for p in task.trainable_parameters())
    unet_params = sum(p.numel() for name, p in pipe.unet.named_parameters() if "lora_" not in name)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    stamps: list[float] = []
    began = time.perf_counter()
    stamps.append(began)
    result = run_training(task, config, args.child, on_step_end=lambda step, loss: stamps.append(time.perf_counter()))
    durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
    if args.child == "lora":
        shipped = (result.result / "pytorch_lora_weights.safetensors").stat().st_size / 2**20
    else:
        shipped = sum(p.stat().st_size for p in (result.result / "unet").glob("*.safetensors")) / 2**20
    record = {
        "method": args.child,
        "step_seconds_median": statistics.median(durations),
        "step_seconds_all": durations,
        "trainable_parameters": trainable,
        "unet_parameters": unet_params,
        "shipped_file_mb": shipped,
        "result_folder_mb": _folder_mb(result.result),
        "checkpoint_mb": _folder_mb(result.out / "checkpoints"),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "final_loss": result.losses[-1],
    }
    if device != "cpu" and torch.cuda.is_available():
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def table(records: list[dict], meta: dict) -> str:
    cuda = any("cuda_peak_mb" in r for r in records)
    head = ("| method | step time (s, median) | trainable params | share of UNet | peak memory (MB) "
            "| memory growth in training (MB) | shipped weights (MB) | checkpoint (MB) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        peak = r["cuda_peak_mb"] if cuda else r["peak_rss_mb"]
        growth = "" if cuda else f"{r['peak_rss_mb'] - r['rss_before_training_mb']:.0f}"
        name = {"lora": f"LoRA DreamBooth (rank {meta['rank']})", "dreambooth": "full DreamBooth (UNet)"}[r["method"]]
        lines.append(
            f"| {name} | {r['step_seconds_median']:.3f} | {r['trainable_parameters']:,} | "
            f"{r['trainable_parameters'] / r['unet_parameters']:.2%} | {peak:.0f} | {growth} | "
            f"{r['shipped_file_mb']:.2f} | {r['checkpoint_mb']:.2f} |"
        )
    memory = "GPU peak allocated" if cuda else "peak RSS of the process (model included)"
    lines.append("")
    lines.append(f"Model `{meta['model']}`, batch {meta['batch_size']}, {meta['steps']} measured steps after "
                 f"{meta['warmup']} warm-up, {meta['threads'] or 'default'} torch threads, device {meta['device']} "
                 f"({meta['machine']}); memory: {memory}. Shipped weights: LoRA = the adapter file, "
                 "DreamBooth = the UNet weights (the whole model folder is larger).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (in-code test model), 'embedded', or a diffusers folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_finetune"))
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--instance-dir", default=None, help="subject images (default: synthetic circles)")
    parser.add_argument("--prompt", default="a photo of sks emoji")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from consistent_diffusion.core.outputs import write_json_atomic, write_text_atomic

    if args.child:
        write_json_atomic(child(args), args.json_out)
        return 0
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as work:
        for method in METHODS:
            result = Path(work) / f"{method}.json"
            command = [sys.executable, os.path.abspath(__file__), "--child", method, "--json-out", str(result),
                       "--work", work, "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--device", args.device,
                       "--prompt", args.prompt]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.instance_dir:
                command += ["--instance-dir", args.instance_dir]
            subprocess.run(command, check=True)
            records.append(json.loads(result.read_text(encoding="utf-8")))
    meta = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
            "rank": args.rank, "threads": args.threads, "device": args.device,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    write_json_atomic({"meta": meta, "results": records}, args.out / "bench_finetune.json")
    markdown = table(records, meta)
    write_text_atomic(markdown, args.out / "bench_finetune.md")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
