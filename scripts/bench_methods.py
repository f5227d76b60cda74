#!/usr/bin/env python
"""Benchmark the training-free methods side by side, in one run, and print a markdown table.

For each model (tiny SD, tiny SDXL, a random-init pipeline of the embedded model's shape, and the
embedded model itself when its weights are installed) it times, on the same prompts and seeds:

- plain text-to-image generation of a batch (the baseline),
- img2img (strength 0.6: it runs ``int(steps * 0.6)`` UNet steps),
- StyleAligned (defaults; the reference is the first image of the batch), and without
  group-norm sharing,
- consistent subject (ConsiStory's masked sharing, 2 anchors; at the batch and at twice the batch,
  to show the cost per image stays flat: linear in the batch) and its StoryDiffusion mode,
- edit-friendly DDPM inversion of one image vs plain CFG sampling of one image with the same
  number of steps, and an edit (skip 0) of the inversion,

and reports seconds per image (on CPU: CPU seconds of the calling thread, which is the compute
with one torch thread and is not inflated by other processes; best and median of ``--repeats``,
variants interleaved), the ratio to the plain baseline, the median wall time, the peak extra resident memory
during the call (sampled from /proc/self/statm; CUDA: max_memory_allocated) and the inversion's
reconstruction max abs error in latent space.

Usage: python scripts/bench_methods.py [--steps 20] [--batch 4] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image


class PeakMemory:
    """Peak resident memory above the starting point while the block runs (MB)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as stream:
                return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the process-lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._rss()
        self._peak = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mb = (self._peak - self._start) / 2**20


def _embedded_shape_pipeline() -> Any:
    """A random-init pipeline of the embedded model's architecture (64 px, MiniLM text encoder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from consistent_diffusion.models.embedded import load_text_encoder
    from consistent_diffusion.training.recipes.embedded import (
        UNetConfig,
        VAEConfig,
        build_scheduler,
        build_unet,
        build_vae,
    )

    torch.manual_seed(0)
    tokenizer, text_encoder = load_text_encoder(max_length=16)
    pipe = StableDiffusionPipeline(
        vae=build_vae(VAEConfig()), unet=build_unet(UNetConfig()), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(build_scheduler().config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _models(names: list[str], device: str) -> list[tuple[str, Callable[[], Any]]]:
    from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    builders: dict[str, Callable[[], Any]] = {
        "tiny-sd": tiny_sd_pipeline,
        "tiny-sdxl": tiny_sdxl_pipeline,
        "embedded-shape": _embedded_shape_pipeline,
    }

    def embedded() -> Any:
        from consistent_diffusion.models.loading import load_pipeline

        return load_pipeline("embedded", device=device)

    builders["embedded"] = embedded
    return [(name, builders[name]) for name in names]


def _generate(pipe: Any, methods: list[Any], prompts: list[str], seeds: list[int], steps: int, cfg: float,
              size: int) -> Any:
    from consistent_diffusion.methods import GenerationContext, run

    ctx = GenerationContext(pipe, list(prompts), None, [torch.Generator().manual_seed(s) for s in seeds],
                            {"num_inference_steps": steps, "guidance_scale": cfg, "height": size, "width": size})
    return run(ctx, methods, output_type="latent")


def bench_model(name: str, pipe: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from consistent_diffusion.methods.consistent_subject import ConsistentSubject
    from consistent_diffusion.methods.img2img import Img2Img
    from consistent_diffusion.methods.inversion import edit, invert
    from consistent_diffusion.methods.style_aligned import StyleAligned
    from consistent_diffusion.models.vae import native_size

    if args.device != "cpu":
        pipe = pipe.to(args.device)
    size = native_size(pipe)[0]
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
    prompts = [f"a {word}" for word in ("cat", "rocket", "heart", "tree", "car", "moon", "fish", "cake")]
    prompts = (prompts * ((args.batch + len(prompts) - 1) // len(prompts)))[: args.batch]
    seeds = list(range(args.batch))
    places = ("on grass", "in snow", "at home", "in a box", "on a boat", "in space", "at night", "in the rain")
    cats = [f"a cat {place}" for place in places] * ((2 * args.batch + len(places) - 1) // len(places))
    steps, cfg, batch = args.steps, args.cfg, args.batch
    state: dict[str, Any] = {}

    def inversion() -> None:
        state["inv"] = invert(pipe, image, "an icon", steps=steps, cfg=cfg,
                              generator=torch.Generator().manual_seed(0))

    def edit_it() -> None:
        state["latent"] = edit(pipe, state["inv"], "an icon", cfg_tar=cfg, skip=0, output_type="latent")

    variants: list[tuple[str, int, Callable[[], Any]]] = [
        ("plain", batch, lambda: _generate(pipe, [], prompts, seeds, steps, cfg, size)),
        ("img2img (strength 0.6)", batch,
         lambda: _generate(pipe, [Img2Img(image=image, strength=0.6)], prompts, seeds, steps, cfg, size)),
        ("StyleAligned", batch, lambda: _generate(pipe, [StyleAligned()], prompts, seeds, steps, cfg, size)),
        ("StyleAligned, no group-norm sharing", batch,
         lambda: _generate(pipe, [StyleAligned(share_group_norm=False)], prompts, seeds, steps, cfg, size)),
        ("consistent subject (2 anchors)", batch,
         lambda: _generate(pipe, [ConsistentSubject(subject="cat")], cats[:batch], seeds, steps, cfg, size)),
        (f"consistent subject (2 anchors), batch {2 * batch}", 2 * batch,
         lambda: _generate(pipe, [ConsistentSubject(subject="cat")], cats[: 2 * batch], list(range(2 * batch)), steps,
                           cfg, size)),
        ("consistent subject, story mode (2 anchors)", batch,
         lambda: _generate(pipe, [ConsistentSubject(mode="story")], cats[:batch], seeds, steps, cfg, size)),
        ("plain, 1 image", 1, lambda: _generate(pipe, [], prompts[:1], seeds[:1], steps, cfg, size)),
        ("DDPM inversion, 1 image", 1, inversion),
        ("DDPM edit (skip 0), 1 image", 1, edit_it),
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    walls: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    memory: dict[str, float] = {}
    for _label, _, run in variants:  # warm-up (and the inversion that the edit needs)
        run()
    for _ in range(args.repeats):
        for label, count, run in variants:
            with PeakMemory(args.device) as peak:
                start, start_cpu = time.perf_counter(), time.thread_time()
                run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                walls[label].append((time.perf_counter() - start) / count)
                # CPU time of this thread: with one torch thread it is the compute itself, and
                # other processes on a shared machine do not inflate it (wall time on GPUs).
                cpu = time.thread_time() - start_cpu
                times[label].append((cpu if args.device == "cpu" else time.perf_counter() - start) / count)
            memory[label] = max(memory.get(label, 0.0), peak.peak_mb)
    error = float((state["latent"].float().cpu() - state["inv"].x0).abs().max())
    rows = []
    for label, count, _ in variants:
        base = "plain, 1 image" if count == 1 else "plain"
        rows.append({
            "model": name, "method": label, "batch": count, "steps": steps,
            "s_per_image": min(times[label]), "median": statistics.median(times[label]),
            "wall": statistics.median(walls[label]),
            "ratio": min(times[label]) / min(times[base]), "peak_mb": memory[label],
            "recon_error": error if label.startswith("DDPM") else None,
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | batch | steps | s/image (best) | s/image (median) | x plain (best) | wall s/image (median) "
        "| peak extra RSS (MB) | recon max abs err (latent) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        err = f"{r['recon_error']:.1e}" if r["recon_error"] is not None else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} | {r['steps']} | {r['s_per_image']:.4f} | "
            f"{r['median']:.4f} | {r['ratio']:.2f} | {r['wall']:.4f} | {r['peak_mb']:.1f} | {err} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sdxl", "embedded-shape", "embedded"],
                        choices=["tiny-sd", "tiny-sdxl", "embedded-shape", "embedded"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    skipped = []
    for name, build in _models(args.models, args.device):
        try:
            pipe = build()
        except Exception as error:  # noqa: BLE001 - report and go on (e.g. embedded weights absent)
            skipped.append(f"{name}: {str(error).splitlines()[0][:160]}")
            continue
        rows.extend(bench_model(name, pipe, args))
        del pipe
    device = args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name()
    print(f"device: {device}; torch threads: {args.threads}; cpu: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__}")
    print(markdown(rows))
    for line in skipped:
        print(f"skipped {line}")


if __name__ == "__main__":
    main()
