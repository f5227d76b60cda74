#!/usr/bin/env python
"""Every method and fine-tune on the real SD 1.5, SD 2.1 and SDXL architectures (random weights).

Each architecture is built from its published configuration, written below (UNet, VAE, text
encoder(s), scheduler: the values of the published ``config.json`` files; nothing is downloaded),
with random weights, and every method runs through the public registry (``get_method``) for 2
steps at a reduced size: plain; img2img; DDPM inversion + edit (with the reconstruction error);
StyleAligned with a generated and a real reference; consistent subject in both modes (subject
mode with feature injection); ControlNet (a random ControlNet of the same architecture); LoRA;
textual inversion; the bench's three combinations; and one optimiser step of DreamBooth, LoRA,
textual inversion and ControlNet training (gradient checkpointing on) through the project's
training code. For each row: whether it ran (or its error), the peak resident memory above the
loaded pipeline during the row (sampled, ``bench_methods.PeakMemory``), CPU seconds of the calling
thread and their ratio to the plain row of the same run; StyleAligned and consistent subject
also at 2, 4 and 8 images. The tokenizer is the project's offline byte-level ``CLIPTokenizer``
(77 tokens; the weights are random, so the vocabulary only has to tokenize).

Usage (SDXL needs about 10 GB in float32; run one architecture at a time):
    python scripts/real_architectures.py --arch sd15 [--size 256]
        [--rows training-free|all] [--batches 2 4 8] [--out table.md]
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import PeakMemory  # noqa: E402

from consistent_diffusion.testing_architectures import (  # noqa: E402  (published configs, one place)
    CLIP_L,
    OPEN_CLIP_BIG_G,
    SCALED_LINEAR_DDIM,
    SD_VAE,
    SDXL_UNET,
    SDXL_VAE,
)

SCALED_LINEAR = SCALED_LINEAR_DDIM  # the published betas; prediction_type set per architecture
OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
               "projection_dim": 512, "hidden_act": "gelu"}  # SD 2.x: OpenCLIP ViT-H, penultimate layer
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Architecture:
    """A published architecture: component configs (diffusers / transformers names) and how it is run here."""

    label: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # the second one (SDXL) is a CLIPTextModelWithProjection
    scheduler: dict[str, Any]
    native: int  # published resolution (px)
    size: int  # the reduced size run here (px)
    dtype: torch.dtype = torch.float32
    xl: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES = {
    "sd15": Architecture(  # runwayml/stable-diffusion-v1-5
        label="SD 1.5", native=512, size=256,
        unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "block_out_channels": (320, 640, 1280, 1280), "down_block_types": SD_DOWN, "up_block_types": SD_UP,
              "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32},
        vae={**SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        text_encoders=(CLIP_L,), scheduler={**SCALED_LINEAR, "prediction_type": "epsilon"}),
    "sd21": Architecture(  # stabilityai/stable-diffusion-2-1 (768-v)
        label="SD 2.1", native=768, size=256,
        unet={"sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "block_out_channels": (320, 640, 1280, 1280), "down_block_types": SD_DOWN, "up_block_types": SD_UP,
              "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True,
              "upcast_attention": True, "norm_num_groups": 32},
        vae={**SD_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        text_encoders=(OPEN_CLIP_H,), scheduler={**SCALED_LINEAR, "prediction_type": "v_prediction"}),
    "sdxl": Architecture(  # stabilityai/stable-diffusion-xl-base-1.0
        label="SDXL", native=1024, size=512, dtype=torch.bfloat16, xl=True,
        unet=SDXL_UNET,
        vae=SDXL_VAE,
        text_encoders=(CLIP_L, OPEN_CLIP_BIG_G), scheduler={**SCALED_LINEAR, "prediction_type": "epsilon"}),
}


def build_pipeline(arch: Architecture, seed: int = 0) -> Any:
    """A random-init pipeline of ``arch`` (CPU, ``arch.dtype``), offline; DDIM with the published betas."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from consistent_diffusion.testing import tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet).to(arch.dtype)
    vae = AutoencoderKL(**arch.vae).to(arch.dtype)
    texts = [CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, **config) for config in arch.text_encoders]
    scheduler = DDIMScheduler(**arch.scheduler)
    common = {"unet": unet, "vae": vae, "scheduler": scheduler, "tokenizer": tiny_clip_tokenizer(77)}
    if arch.xl:
        pipe = StableDiffusionXLPipeline(text_encoder=CLIPTextModel(texts[0]).to(arch.dtype),
                                         text_encoder_2=CLIPTextModelWithProjection(texts[1]).to(arch.dtype),
                                         tokenizer_2=tiny_clip_tokenizer(77), **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=CLIPTextModel(texts[0]).to(arch.dtype), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(pipe: Any) -> dict[str, float]:
    """Millions of parameters per component."""
    return {name: sum(p.numel() for p in module.parameters()) / 1e6 for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}


# -- inputs every method needs, random and built in code --------------------------------------


def make_inputs(pipe: Any, size: int, folder: Path) -> dict[str, Any]:
    """A real-looking image, a control image, a random LoRA file, random embeddings, a ControlNet."""
    from safetensors.torch import save_file

    from consistent_diffusion.training.controlnet import controlnet_from_unet
    from consistent_diffusion.training.lora import DEFAULT_TARGETS, add_lora, lora_state_dict

    controlnet = controlnet_from_unet(pipe).to(pipe.unet.dtype)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.integers(0, 55, (size, size, 3)))
                            .astype(np.uint8))
    control = Image.new("RGB", (size, size), "white")
    control.paste((0, 0, 0), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        add_lora(pipe.unet, 4, 4.0, DEFAULT_TARGETS)
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        state = lora_state_dict(pipe.unet)
    pipe.unet.unload_lora()  # the UNet as built again (no PEFT wrappers left)
    (folder / "lora").mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder / "lora", unet_lora_layers=state, weight_name="pytorch_lora_weights.safetensors")
    (folder / "ti").mkdir(exist_ok=True)
    widths = [encoder.config.hidden_size for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
              if encoder is not None]
    for index, width in enumerate(widths):
        name = "learned_embeds.safetensors" if index == 0 else "learned_embeds_2.safetensors"
        save_file({"<tok>": torch.randn(2, width) * 0.01}, str(folder / "ti" / name))
    image.save(folder / "image.png")
    return {"image": str(folder / "image.png"), "control": control, "lora": str(folder / "lora"),
            "ti": str(folder / "ti"), "controlnet": controlnet}


# -- the rows ---------------------------------------------------------------------------------

PROMPTS = ["a photo of a cat in a garden", "a cat reading a book", "a cat on a red sofa", "a cat at the beach",
           "a cat in the snow", "a cat with a hat", "a cat on a boat", "a cat under a tree"]


def generate(pipe: Any, methods: list[Any], n: int, size: int, steps: int = 2, prompt_prefix: str = "") -> list:
    from consistent_diffusion.methods.base import GenerationContext, run

    ctx = GenerationContext(pipe=pipe, prompts=[prompt_prefix + p for p in PROMPTS[:n]], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in range(n)],
                            call_kwargs={"num_inference_steps": steps, "guidance_scale": 5.0, "height": size,
                                         "width": size})
    return run(ctx, methods, output_type="np")


def training_free_rows(pipe: Any, inputs: dict[str, Any], size: int, batches: tuple[int, ...]) -> list[tuple]:
    """(label, batch, callable returning a note) for every training-free row, plain first."""
    from consistent_diffusion.methods.base import get_method
    from consistent_diffusion.methods.inversion import edit, invert

    def methods(*names_options: tuple[str, dict]) -> Callable[[], list]:
        return lambda: [get_method(name, **options) for name, options in names_options]

    sa, cn = ("style_aligned", {}), ("controlnet", {"controlnets": inputs["controlnet"], "images": inputs["control"]})
    lora = ("lora", {"weights": inputs["lora"]})
    cases: list[tuple[str, Callable[[], list], str]] = [
        ("plain", methods(), ""),
        ("img2img (strength 0.6)", methods(("img2img", {"image": inputs["image"], "strength": 0.6})), ""),
        ("StyleAligned, generated reference", methods(sa), ""),
        ("StyleAligned, real reference (inverted)", methods(("style_aligned", {
            "reference_image": inputs["image"], "reference_image_prompt": "a photo"})), ""),
        ("consistent subject, subject mode + feature injection", methods(("consistent_subject", {
            "subject": "cat", "feature_injection": True})), ""),
        ("consistent subject, story mode", methods(("consistent_subject", {"subject": "cat", "mode": "story"})), ""),
        ("ControlNet (random, same architecture)", methods(cn), ""),
        ("LoRA (rank 4, attention projections)", methods(lora), ""),
        ("textual inversion (2 vectors)", methods(("textual_inversion", {"embeddings": inputs["ti"]})), "<tok> "),
        ("StyleAligned + ControlNet", methods(sa, cn), ""),
        ("LoRA + ControlNet", methods(lora, cn), ""),
        ("LoRA + StyleAligned", methods(lora, sa), ""),
    ]
    rows = [(label, 2, (lambda build=build, prefix=prefix: (generate(pipe, build(), 2, size, prompt_prefix=prefix),
                                                              "")[1]))
            for label, build, prefix in cases]

    def inversion_and_edit() -> str:
        inverted = invert(pipe, inputs["image"], "a photo", steps=2, cfg=5.0, size=(size, size),
                          generator=torch.Generator().manual_seed(0))
        from consistent_diffusion.methods.inversion import reconstruct

        error = (reconstruct(pipe, inverted).float() - inverted.x0.float()).abs().max().item()
        edit(pipe, inverted, ["a photo of a dog"], cfg_tar=5.0)
        return f"reconstruction max abs error (latent) {error:.1e}"

    rows.insert(2, ("DDPM inversion + edit (1 image)", 1, inversion_and_edit))
    for n in batches:
        rows.append((f"StyleAligned, batch {n}", n, lambda n=n: (generate(pipe, [get_method("style_aligned")], n, size),
                                                               "")[1]))
        rows.append((f"consistent subject (subject mode), batch {n}", n,
                     lambda n=n: (generate(pipe, [get_method("consistent_subject", subject="cat")], n, size), "")[1]))
    return rows


def training_rows(pipe: Any, size: int, folder: Path) -> list[tuple]:
    """One optimiser step of each fine-tune, gradient checkpointing on (the project's training code)."""
    from consistent_diffusion.training.controlnet import ControlNetTrainConfig, train_controlnet
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora
    from consistent_diffusion.training.textual_inversion import (
        TextualInversionConfig,
        train_textual_inversion,
    )

    images = folder / "instance"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text("a photo of a cat", encoding="utf-8")
    common = {"steps": 1, "checkpoint_every": 1000, "progress": False, "gradient_checkpointing": True,
              "resolution": size, "threads": 1, "keep_checkpoints": 1}
    subject = {"instance_dir": images, "instance_prompt": "a photo of sks cat"}
    return [
        ("train ControlNet, 1 step", 1, lambda: _note(train_controlnet(ControlNetTrainConfig(
            out=folder / "t-cn", data=images, condition="canny", batch_size=1, validation_count=0, **common), pipe))),
        ("train textual inversion, 1 step", 1, lambda: _note(train_textual_inversion(TextualInversionConfig(
            out=folder / "t-ti", instance_dir=images, placeholder_token="<new>", initializer_token="cat",
            **common), pipe))),
        ("train LoRA, 1 step", 1, lambda: _note(train_lora(LoraDreamBoothConfig(
            out=folder / "t-lora", **subject, **common), pipe))),
        ("train DreamBooth (full UNet), 1 step", 1, lambda: _note(train_dreambooth(DreamBoothConfig(
            out=folder / "t-db", **subject, **common), pipe))),
    ]


def _note(result: Any) -> str:
    loss = getattr(result, "losses", None) or [getattr(result, "loss", float("nan"))]
    return f"loss {float(loss[-1]):.3f}"


def measure(rows: list[tuple]) -> list[dict[str, Any]]:
    """Run each row once: CPU seconds of this thread, peak extra RSS, ran / error."""
    results = []
    for label, batch, call in rows:
        gc.collect()
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        note, error = "", None
        try:
            with PeakMemory("cpu") as peak:
                note = call() or ""
        except Exception as caught:  # a row that fails is reported, not fatal
            error = f"{type(caught).__name__}: {str(caught).splitlines()[0][:160]}"
            traceback.print_exc()
            peak = None
        results.append({"row": label, "batch": batch, "cpu_s": time.thread_time() - start_cpu,
                        "wall_s": time.perf_counter() - start_wall, "peak_mb": peak.peak_mb if peak else None,
                        "error": error, "note": note})
        print(f"{label}: {results[-1]['cpu_s']:.1f} s, {results[-1]['peak_mb'] or 0:.0f} MB {error or ''}", flush=True)
    return results


def markdown(arch: Architecture, size: int, results: list[dict[str, Any]], build: dict[str, Any]) -> str:
    plain = next((r["cpu_s"] for r in results if r["row"] == "plain" and not r["error"]), None)
    head = (f"**{arch.label}** (random weights, published config; {build['params']}), {size} px "
            f"(native {arch.native}), {str(arch.dtype).replace('torch.', '')}, 2 steps, guidance 5; built in "
            f"{build['build_s']:.0f} s, pipeline resident {build['rss_mb']:.0f} MB.\n\n"
            "| row | images | runs | CPU s | x plain | peak extra RSS (MB) | note |\n|---|---:|---|---:|---:|---:|---|\n")
    lines = []
    for r in results:
        ratio = f"{r['cpu_s'] / plain:.2f}" if plain and not r["error"] else ""
        runs = "yes" if not r["error"] else f"**no**: {r['error']}"
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else ""
        lines.append(f"| {r['row']} | {r['batch']} | {runs} | {r['cpu_s']:.1f} | {ratio} | {peak} | {r['note']} |")
    return head + "\n".join(lines) + "\n"


TRAINING_LABELS = ("train ControlNet, 1 step", "train textual inversion, 1 step", "train LoRA, 1 step",
                   "train DreamBooth (full UNet), 1 step")


def run_architecture(name: str, size: int | None = None, rows: str = "training-free",
                     batches: tuple[int, ...] = (2, 4, 8), only: tuple[str, ...] = ()) -> tuple[str, list]:
    """Build ``name``, run its rows, return (markdown table, results). ``only``: row labels to keep
    (substring match; plain is always run). Training rows (``rows="all"``) each run in a fresh
    process (they change the pipeline, and their memory must not hide the next row's)."""
    arch = ARCHITECTURES[name]
    size = size or arch.size
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipe = build_pipeline(arch)
    build = {"build_s": time.perf_counter() - start, "rss_mb": PeakMemory._rss() / 2**20,
             "params": ", ".join(f"{k} {v:.0f}M" for k, v in parameter_count(pipe).items())}
    with tempfile.TemporaryDirectory(prefix="cd-real-arch-") as scratch:
        inputs = make_inputs(pipe, size, Path(scratch))
        selected = training_free_rows(pipe, inputs, size, batches)
        if only:
            selected = [r for r in selected if r[0] == "plain" or any(o in r[0] for o in only)]
        results = measure(selected)
    del pipe, inputs, selected
    gc.collect()
    if rows == "all":
        results += [row_in_subprocess(name, size, label) for label in TRAINING_LABELS]
    return markdown(arch, size, results, build), results


def row_in_subprocess(name: str, size: int, label: str) -> dict[str, Any]:
    """One row measured in a fresh process (``--row``); its result or the process's error."""
    import json
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--arch", name, "--size", str(size), "--row", label]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {"row": label, "batch": 1, "cpu_s": 0.0, "wall_s": 0.0, "peak_mb": None, "note": "",
            "error": f"process exited {done.returncode}: {tail}"}


RESULT_PREFIX = "ROW-RESULT "


def one_row(name: str, size: int, label: str) -> dict[str, Any]:
    """Build ``name`` and measure the row ``label`` (a training row or a training-free one)."""
    import json

    torch.set_num_threads(1)
    pipe = build_pipeline(ARCHITECTURES[name])
    with tempfile.TemporaryDirectory(prefix="cd-real-arch-") as scratch:
        folder = Path(scratch)
        rows = training_rows(pipe, size, folder) if label in TRAINING_LABELS else \
            training_free_rows(pipe, make_inputs(pipe, size, folder), size, (2, 4, 8))
        [result] = measure([r for r in rows if r[0] == label])
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--size", type=int, help="pixels (default: the architecture's reduced size)")
    parser.add_argument("--rows", choices=["training-free", "all"], default="training-free")
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--only", nargs="*", default=[], help="keep rows whose label contains one of these")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--row", help="measure only this row, in this process, and print its result as JSON")
    args = parser.parse_args()
    if args.row:
        one_row(args.arch, args.size or ARCHITECTURES[args.arch].size, args.row)
        return
    start = time.perf_counter()
    table, _ = run_architecture(args.arch, args.size, args.rows, tuple(args.batches), tuple(args.only))
    footer = (f"\n`cpu: {platform.machine()}, torch threads 1, torch {torch.__version__}; whole run "
              f"{time.perf_counter() - start:.0f} s wall`\n")
    print(table + footer)
    if args.out:
        args.out.write_text(table + footer, encoding="utf-8")


if __name__ == "__main__":
    main()
