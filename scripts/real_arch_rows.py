"""The rows of ``real_architectures.py``: the inputs every method needs (random, built in code), the
training-free rows, the training rows, and how one row is measured.

A row is a :class:`Row`: its label, its number of images, a call returning a note, and whether it
is a batch-growth row (StyleAligned / consistent subject at 2, 4, 8 images). ``split_rows`` shares
the rows between two processes by image count (``--jobs 2``).
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import PeakMemory  # noqa: E402

PROMPTS = ["a photo of a cat in a garden", "a cat reading a book", "a cat on a red sofa", "a cat at the beach",
           "a cat in the snow", "a cat with a hat", "a cat on a boat", "a cat under a tree"]
TRAINING_LABELS = ("train ControlNet, 1 step", "train textual inversion, 1 step", "train LoRA, 1 step",
                   "train DreamBooth (full UNet), 1 step")
GROWTH_METHODS = {"StyleAligned": ("style_aligned", {}),
                  "consistent subject (subject mode)": ("consistent_subject", {"subject": "cat"})}


@dataclass(frozen=True)
class Row:
    """One measured row: ``call()`` runs it and returns a note ('' or e.g. the reconstruction error)."""

    label: str
    batch: int
    call: Callable[[], str]
    growth: bool = False


INPUT_KEYS = ("image", "control", "controlnet", "lora", "ti", "ip_adapter")  # what make_inputs(full=True) gives


def row_plan(batches: tuple[int, ...]) -> list[Row]:
    """Every training-free row in table order, built lazily on nothing (for labels and batches only)."""
    return training_free_rows(None, dict.fromkeys(INPUT_KEYS), 0, batches)


def split_rows(rows: list[Row], parts: int) -> list[list[str]]:
    """Labels per process: plain in every one, the other rows spread so each process has about the
    same number of images (largest batches first, each to the least loaded process; ties to the first)."""
    loads, shares = [0] * parts, [["plain"] for _ in range(parts)]
    for row in sorted((r for r in rows if r.label != "plain"), key=lambda r: -r.batch):  # stable: table order
        part = loads.index(min(loads))
        loads[part] += row.batch
        shares[part].append(row.label)
    return shares


def growth_label(method: str, batch: int) -> str:
    """The label of a batch-growth row (the table writer parses it back with ``parse_growth_label``)."""
    return f"{method}, batch {batch}"


def parse_growth_label(label: str) -> tuple[str, int] | None:
    """(method, batch) of a growth-row label, else None."""
    method, _, batch = label.rpartition(", batch ")
    return (method, int(batch)) if method in GROWTH_METHODS and batch.isdigit() else None


# -- inputs every method needs, random and built in code --------------------------------------


def make_inputs(pipe: Any, size: int, folder: Path, full: bool = True) -> dict[str, Any]:
    """A real-looking image, a control image and, with ``full``, a random ControlNet, LoRA file,
    textual-inversion embeddings and IP-Adapter (released layout, tiny random image encoder)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.integers(0, 55, (size, size, 3)))
                            .astype(np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / "image.png")
    inputs: dict[str, Any] = {"image": str(folder / "image.png")}
    if full:
        control = Image.new("RGB", (size, size), "white")
        control.paste((0, 0, 0), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        inputs.update(control=control, lora=_random_lora(pipe, folder / "lora"), ti=_random_embeddings(pipe, folder / "ti"),
                      ip_adapter=_random_ip_adapter(pipe, folder / "ip"), controlnet=_random_controlnet(pipe))
    return inputs


def _random_controlnet(pipe: Any) -> Any:
    from consistent_diffusion.training.controlnet import controlnet_from_unet

    return controlnet_from_unet(pipe).to(pipe.unet.device, pipe.unet.dtype)


def _random_lora(pipe: Any, folder: Path) -> str:
    from consistent_diffusion.training.lora import DEFAULT_TARGETS, add_lora, lora_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        add_lora(pipe.unet, 4, 4.0, DEFAULT_TARGETS)
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        state = {key: value.cpu() for key, value in lora_state_dict(pipe.unet).items()}
    pipe.unet.unload_lora()  # the UNet as built again (no PEFT wrappers left)
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, unet_lora_layers=state, weight_name="pytorch_lora_weights.safetensors")
    return str(folder)


def _random_embeddings(pipe: Any, folder: Path) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    widths = [encoder.config.hidden_size for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
              if encoder is not None]
    for index, width in enumerate(widths):
        name = "learned_embeds.safetensors" if index == 0 else "learned_embeds_2.safetensors"
        save_file({"<tok>": torch.randn(2, width) * 0.01}, str(folder / name))
    return str(folder)


def _random_ip_adapter(pipe: Any, folder: Path) -> str:
    """The tests' random IP-Adapter writer (one place): per-layer to_k_ip / to_v_ip at the UNet's real
    widths, a 4-token projection; its image encoder is tiny (the released ones are CLIP ViT-H / bigG)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _ip_adapter_files import save_random_adapter

    with torch.random.fork_rng(devices=[]):
        save_random_adapter(folder, pipe.unet, seed=2)
    return str(folder)


# -- the rows ---------------------------------------------------------------------------------


def generate(pipe: Any, methods: list[Any], n: int, size: int, steps: int = 2, prompt_prefix: str = "") -> str:
    """``n`` images of ``size`` px through ``methods`` (``steps`` DDIM steps, guidance 5); returns ''."""
    from consistent_diffusion.methods.base import GenerationContext, run

    ctx = GenerationContext(pipe=pipe, prompts=[prompt_prefix + p for p in PROMPTS[:n]], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in range(n)],
                            call_kwargs={"num_inference_steps": steps, "guidance_scale": 5.0, "height": size,
                                         "width": size})
    run(ctx, methods, output_type="np")
    return ""


def training_free_rows(pipe: Any, inputs: dict[str, Any], size: int, batches: tuple[int, ...],
                       steps: int = 2) -> list[Row]:
    """Every training-free row, plain first; the growth rows (``growth=True``) last."""
    from consistent_diffusion.methods.base import get_method

    def row(label: str, *names_options: tuple[str, dict], n: int = 2, prefix: str = "", growth: bool = False) -> Row:
        return Row(label, n, lambda: generate(pipe, [get_method(name, **options) for name, options in names_options],
                                              n, size, steps, prefix), growth)

    rows = [row("plain")]
    if "controlnet" in inputs:  # the full set of inputs: every method row
        sa = ("style_aligned", {})
        cn = ("controlnet", {"controlnets": inputs["controlnet"], "images": inputs["control"]})
        lora = ("lora", {"weights": inputs["lora"]})
        rows += [
            row("img2img (strength 0.6)", ("img2img", {"image": inputs["image"], "strength": 0.6})),
            Row("DDPM inversion + edit (1 image)", 1, lambda: inversion_and_edit(pipe, inputs["image"], size, steps)),
            row("StyleAligned, generated reference", sa),
            row("StyleAligned, real reference (inverted)", ("style_aligned", {
                "reference_image": inputs["image"], "reference_image_prompt": "a photo"})),
            row("consistent subject, subject mode + feature injection", ("consistent_subject", {
                "subject": "cat", "feature_injection": True})),
            row("consistent subject, story mode", ("consistent_subject", {"subject": "cat", "mode": "story"})),
            row("ControlNet (random, same architecture)", cn),
            row("LoRA (rank 4, attention projections)", lora),
            row("textual inversion (2 vectors)", ("textual_inversion", {"embeddings": inputs["ti"]}), prefix="<tok> "),
            row("IP-Adapter (random, released layout, 1 image prompt)", ("ip_adapter", {
                "adapters": inputs["ip_adapter"], "images": inputs["image"]})),
            row("StyleAligned + ControlNet", sa, cn),
            row("LoRA + ControlNet", lora, cn),
            row("LoRA + StyleAligned", lora, sa),
        ]
    for n in batches:
        rows += [row(growth_label(method, n), spec, n=n, growth=True) for method, spec in GROWTH_METHODS.items()]
    return rows


def inversion_and_edit(pipe: Any, image: str, size: int, steps: int) -> str:
    """DDPM inversion of ``image`` and one edit; the note is the reconstruction error."""
    from consistent_diffusion.methods.inversion import edit, invert, reconstruct

    inverted = invert(pipe, image, "a photo", steps=steps, cfg=5.0, size=(size, size),
                      generator=torch.Generator().manual_seed(0))
    error = (reconstruct(pipe, inverted).float().cpu() - inverted.x0.float()).abs().max().item()
    edit(pipe, inverted, ["a photo of a dog"], cfg_tar=5.0)
    return f"reconstruction max abs error (latent) {error:.1e}"


def training_rows(pipe: Any, size: int, folder: Path, device: str = "cpu") -> list[Row]:
    """One optimiser step of each fine-tune, gradient checkpointing on (the project's training code,
    end to end: its final checkpoint and export are in the row). On CUDA the weights stay float32
    with bf16 autocast; a bfloat16 pipeline on the CPU (SDXL) trains under bf16 autocast too."""
    from consistent_diffusion.training.controlnet import ControlNetTrainConfig, train_controlnet
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, train_lora
    from consistent_diffusion.training.textual_inversion import (
        TextualInversionConfig,
        train_textual_inversion,
    )

    images = folder / "instance"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text("a photo of a cat", encoding="utf-8")
    common: dict[str, Any] = {"steps": 1, "checkpoint_every": 1000, "progress": False, "gradient_checkpointing": True,
                              "resolution": size, "threads": 1, "keep_checkpoints": 1,
                              "validation_steps": 1}  # textual inversion always validates: one step, not 25
    if device.startswith("cuda"):
        common.update(device=device, mixed_precision="bf16")
    elif pipe.unet.dtype == torch.bfloat16:  # SDXL on the CPU: bf16 frozen weights, the step under bf16 autocast
        common.update(mixed_precision="bf16")
    subject = {"instance_dir": images, "instance_prompt": "a photo of sks cat"}
    if common.get("mixed_precision") == "bf16" and not device.startswith("cuda"):
        _text_encoders_in_float32(pipe)
    calls = {
        "train ControlNet, 1 step": lambda: train_controlnet(ControlNetTrainConfig(
            out=folder / "t-cn", data=images, condition="canny", batch_size=1, validation_count=0, **common), pipe),
        "train textual inversion, 1 step": lambda: train_textual_inversion(TextualInversionConfig(
            out=folder / "t-ti", instance_dir=images, placeholder_token="<new>", initializer_token="cat",
            **common), pipe),
        "train LoRA, 1 step": lambda: train_lora(LoraDreamBoothConfig(out=folder / "t-lora", **subject, **common), pipe),
        "train DreamBooth (full UNet), 1 step": lambda: train_dreambooth(DreamBoothConfig(
            out=folder / "t-db", **subject, **common), pipe),
    }
    return [Row(label, 1, lambda call=call: _loss_note(call())) for label, call in calls.items()]


def _text_encoders_in_float32(pipe: Any) -> None:
    """Textual inversion trains rows of the text encoders' embeddings: as diffusers' SDXL script
    does, they stay float32 while the frozen UNet and VAE are bfloat16 (torch's CPU autocast runs
    LayerNorm in float32, which a bfloat16 LayerNorm weight refuses). Each training row has a
    process of its own, so the other rows never see the change."""
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(torch.float32)


def _loss_note(result: Any) -> str:
    loss = getattr(result, "losses", None) or [getattr(result, "loss", float("nan"))]
    return f"loss {float(loss[-1]):.3f}"


# -- measuring --------------------------------------------------------------------------------


def measure(rows: list[Row], device: str = "cpu", report: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Run each row once: CPU seconds of this thread, wall seconds, peak memory above the row's start
    (resident memory sampled on CPU; ``max_memory_allocated`` on CUDA, also as a total), ran / error."""
    cuda = device.startswith("cuda")
    results = []
    for row in rows:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        note, error, peak = "", None, None
        try:
            with PeakMemory(device) as peak:
                note = row.call() or ""
        except Exception as caught:  # a row that fails is reported, not fatal
            error = f"{type(caught).__name__}: {(str(caught).splitlines() or [''])[0][:160]}"
            traceback.print_exc()
            peak = None
        result = {"row": row.label, "batch": row.batch, "cpu_s": time.thread_time() - start_cpu,
                  "wall_s": time.perf_counter() - start_wall, "peak_mb": peak.peak_mb if peak else None,
                  "peak_total_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda and peak else None,
                  "error": error, "note": note}
        results.append(result)
        print(f"{row.label}: {result['cpu_s']:.1f} s, {result['peak_mb'] or 0:.0f} MB {error or ''}", flush=True)
        if report:
            report(result)
    return results
