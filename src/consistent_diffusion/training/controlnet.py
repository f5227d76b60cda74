"""Train a ControlNet (Zhang, Rao, Agrawala, ICCV 2023) for a model that has none.

The ControlNet starts as a copy of the model's UNet encoder (``ControlNetModel.from_unet``) with
zero-initialised output convolutions, so training starts exactly at the base model. A small
conditioning embedding maps the control image (pixel space, [0, 1], white structure on black) to
the latent grid: it downsamples by 2 per block after the first, so it needs log2(VAE factor) + 1
blocks (factor 8 for SD: the published (16, 32, 96, 256); 4 for the embedded model: (16, 32, 96);
2 for the tiny test models: (16, 32)). The UNet stays frozen; the loss is the usual denoising loss
with the ControlNet's residuals added to the UNet's skip connections. Captions are dropped
(replaced by the empty prompt) with probability ``caption_dropout``, which teaches the ControlNet
to carry the shape on its own, as in the paper.

Training pairs come from any captioned image set (``finetune_data.load_captioned_images``: an
emoji dataset folder or an image folder with captions); the control image of each is computed
by the ``controls`` preprocessor for ``condition``. The result ``out/controlnet`` is a diffusers
``ControlNetModel`` folder plus ``control.json`` (condition, base model), loadable by
``methods.controlnet`` or stock ``ControlNetModel.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.outputs import write_json_atomic
from consistent_diffusion.methods.controls import CONDITIONS, make_control
from consistent_diffusion.training.data import load_captioned_images
from consistent_diffusion.training.diffusion import (
    added_cond_kwargs,
    encode_images,
    encode_text,
    model_size,
    noise_and_target,
    per_example_mse,
    training_scheduler,
)
from consistent_diffusion.training.loop import Task, TrainResult, check_out_folder, run_training
from consistent_diffusion.training.loop_config import LoopConfig

SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # ControlNet paper / diffusers default, for VAE factor 8
CONTROL_META = "control.json"


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Conditioning-embedding widths whose downsampling equals the VAE factor (a power of two)."""
    factor = int(vae_scale_factor)
    blocks = int(round(math.log2(factor))) + 1 if factor >= 1 else 0
    if factor < 1 or 2 ** (blocks - 1) != factor:
        raise ConfigError(f"VAE factor {vae_scale_factor} is not a power of two; cannot build a conditioning embedding")
    channels = list(SD_EMBEDDING_CHANNELS[:blocks])
    while len(channels) < blocks:
        channels.append(SD_EMBEDDING_CHANNELS[-1])
    return tuple(channels)


def controlnet_from_unet(pipe: Any, channels: tuple[int, ...] | None = None) -> Any:
    """A new ControlNet for ``pipe``: the UNet's encoder copied, zero convolutions, and a
    conditioning embedding matched to the pipeline's VAE factor."""
    from diffusers import ControlNetModel

    channels = channels or embedding_channels(int(pipe.vae_scale_factor))
    if 2 ** (len(channels) - 1) != int(pipe.vae_scale_factor):
        raise ConfigError(f"conditioning embedding {channels} downsamples by {2 ** (len(channels) - 1)}, "
                          f"but this model's VAE factor is {pipe.vae_scale_factor}")
    return ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=tuple(channels))


@dataclass(kw_only=True)
class ControlNetTrainConfig(LoopConfig):
    """A ControlNet training run; the ControlNet lands in ``out/controlnet``."""

    data: Path  # emoji dataset folder, or image folder with metadata.jsonl / NAME.txt captions
    condition: str = "canny"  # control preprocessor: canny | silhouette | scribble
    split: str | None = "train"  # emoji datasets: rows of this split (None: all)
    default_caption: str = ""  # caption of images that have none
    caption_dropout: float = 0.1  # probability of training a row with the empty prompt
    max_images: int | None = None  # use at most this many images (None: all)
    validation_count: int = 4  # dataset rows whose control images are used for validation images
    init_controlnet: Path | None = None  # start from this ControlNet folder (e.g. an earlier stage) instead of the UNet
    learning_rate: float = 1e-4
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = Path(self.data)
        if self.init_controlnet is not None:
            self.init_controlnet = Path(self.init_controlnet)
            if not (self.init_controlnet / "config.json").is_file():
                raise ConfigError(f"init_controlnet {self.init_controlnet} is not a ControlNet folder (no config.json)")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"unknown condition {self.condition!r}; accepted: {', '.join(CONDITIONS)}")
        if not 0 <= self.caption_dropout <= 1:
            raise ConfigError(f"caption_dropout must be in [0, 1], got {self.caption_dropout!r}")
        if self.max_images is not None and (isinstance(self.max_images, bool) or not isinstance(self.max_images, int)
                                            or self.max_images < 1):
            raise ConfigError(f"max_images must be a positive integer or unset, got {self.max_images!r}")
        if isinstance(self.validation_count, bool) or not isinstance(self.validation_count, int) or self.validation_count < 0:
            raise ConfigError(f"validation_count must be an integer >= 0, got {self.validation_count!r}")


class ControlNetTask(Task):
    result_name = "controlnet"

    def __init__(self, pipe: Any, config: ControlNetTrainConfig, controlnet: Any | None = None) -> None:
        super().__init__()
        self.pipe, self.config = pipe, config
        self.size = model_size(pipe, config.resolution)
        self.noise_scheduler = training_scheduler(pipe)
        data = load_captioned_images(config.data, self.size, config.default_caption, config.split, config.max_images)
        self.captions = data.captions
        controls = [np.asarray(make_control(config.condition, image)) for image in data.images]
        self.controls = torch.from_numpy(np.stack(controls)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        self.latents = encode_images(pipe, data.images)
        self.validation_controls = [make_control(config.condition, image) for image in data.images[: config.validation_count]]
        self.validation_captions = self.captions[: config.validation_count]
        for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        unique = sorted(set(self.captions) | {""})
        self.caption_index = torch.tensor([unique.index(c) for c in self.captions])
        self.empty_index = unique.index("")
        embeds, pooled = [], []
        with torch.no_grad():
            for start in range(0, len(unique), 64):
                e, p = encode_text(pipe, unique[start : start + 64])
                embeds.append(e.cpu())
                if p is not None:
                    pooled.append(p.cpu())
        self.text = torch.cat(embeds)
        self.pooled = torch.cat(pooled) if pooled else None
        self.controlnet = controlnet if controlnet is not None else controlnet_from_unet(pipe)
        self.controlnet.requires_grad_(True)
        self.controlnet.train()
        if config.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            pipe.unet.enable_gradient_checkpointing()
        self.modules["controlnet"] = self.controlnet

    def prepare(self, accelerator: Any, device: torch.device) -> None:
        self.pipe.to(device)

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        rows = torch.randint(0, self.controls.shape[0], (self.config.batch_size,), generator=generator)
        latents = self.latents.sample(rows, generator)
        captions = self.caption_index[rows]
        drop = torch.rand(len(rows), generator=generator) < self.config.caption_dropout
        captions = torch.where(drop, torch.full_like(captions, self.empty_index), captions)
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, latents, generator)
        embeds = self.text[captions].to(device)
        pooled = None if self.pooled is None else self.pooled[captions].to(device)
        extra = added_cond_kwargs(self.pipe, pooled, self.size)
        control = self.controls[rows].to(device).float() / 255.0
        noisy, timesteps = noisy.to(device), timesteps.to(device)
        down, mid = self.forward_module("controlnet")(
            noisy, timesteps, encoder_hidden_states=embeds, controlnet_cond=control,
            added_cond_kwargs=extra, return_dict=False,
        )
        prediction = self.pipe.unet(
            noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=extra,
            down_block_additional_residuals=list(down), mid_block_additional_residual=mid, return_dict=False,
        )[0]
        loss = per_example_mse(prediction, target.to(device)).mean()
        return loss, {"dropped_captions": float(drop.float().mean())}

    def validate(self, step: int, folder: Path) -> None:
        """Validation row i (its control image and caption) with seed i, through ``methods.run``
        with the ControlNet method on the ControlNet being trained."""
        from consistent_diffusion.core.images import contact_sheet, save_png_atomic

        if not self.validation_controls:
            return
        self.controlnet.eval()
        try:
            images = []
            for index, (control, caption) in enumerate(zip(self.validation_controls, self.validation_captions, strict=True)):
                images += _generate(self.pipe, caption, index, self.size, control=control, controlnet=self.controlnet,
                                    num_inference_steps=self.config.validation_steps)
        finally:
            self.controlnet.train()
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            save_png_atomic(image, folder / f"{index:02d}.png")
        sheet = contact_sheet(self.validation_controls + images, columns=len(images))
        save_png_atomic(sheet, folder / "contact_sheet.png")

    def export(self, folder: Path) -> None:
        self.controlnet.save_pretrained(folder, safe_serialization=True)
        from consistent_diffusion.models.loading import model_identity

        write_json_atomic({
            "format": "consistent-diffusion/controlnet/v1",
            "condition": self.config.condition,
            "base_model": model_identity(self.pipe).to_dict(),
            "resolution": self.size,
            "vae_scale_factor": int(self.pipe.vae_scale_factor),
            "conditioning_embedding_out_channels": list(self.controlnet.config.conditioning_embedding_out_channels),
            "training_images": int(self.controls.shape[0]),
        }, folder / CONTROL_META)

    def identity(self) -> dict[str, Any]:
        from consistent_diffusion.models.loading import model_identity

        return {**model_identity(self.pipe).to_dict(), "training_images": int(self.controls.shape[0])}


def train_controlnet(config: ControlNetTrainConfig, pipe: Any, on_step_end: Any = None) -> TrainResult:
    """Train a ControlNet for ``pipe`` (frozen); the result is written to ``out/controlnet``.
    With ``config.init_controlnet`` training continues from that ControlNet (a new stage, e.g.
    at another learning rate) instead of starting from the UNet."""
    check_out_folder(config)
    task = ControlNetTask(pipe, config, initial_controlnet(config, pipe))
    return run_training(task, config, "controlnet", on_step_end=on_step_end)


def initial_controlnet(config: ControlNetTrainConfig, pipe: Any) -> Any | None:
    """The ControlNet named by ``config.init_controlnet`` in float32 on the UNet's device (None:
    start from the UNet)."""
    if config.init_controlnet is None:
        return None
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(config.init_controlnet, torch_dtype=torch.float32).to(pipe.unet.device)


# ----------------------------------------------------------------------------- measure and ship


def _generate(pipe: Any, caption: str, seed: int, size: int, control: Any = None, controlnet: Any = None,
              scale: float = 1.0, **call_kwargs: Any) -> list[Any]:
    """One ``size`` x ``size`` image of ``caption`` with seed ``seed`` through ``methods.run``:
    plain, or steered by ``controlnet`` (an in-memory ControlNetModel) on ``control`` at ``scale``;
    with the model's guidance rescale (as a series samples it) unless ``call_kwargs`` sets one."""
    from consistent_diffusion.methods.base import GenerationContext, default_guidance_rescale, run
    from consistent_diffusion.methods.controlnet import ControlNet

    rescale = default_guidance_rescale(pipe)
    defaults = {} if rescale is None else {"guidance_rescale": rescale}
    ctx = GenerationContext(pipe=pipe, prompts=[caption], negative_prompts=None,
                            generators=[torch.Generator("cpu").manual_seed(seed)],
                            call_kwargs={**defaults, **call_kwargs, "height": size, "width": size})
    methods = () if controlnet is None else (ControlNet(controlnets=(controlnet,), images=(control,), scales=(scale,)),)
    return run(ctx, methods)


def shape_scores(outputs: list[Any], controls: list[Any], condition: str) -> list[float]:
    """Per image: how well an output follows its control image (``metrics.shape_consistency`` on the
    control *maps*): canny/scribble -> plain edge F1 (2-pixel tolerance, the measure the shipped
    ControlNet's 1.61x was reported in), silhouette -> IoU."""
    from consistent_diffusion.metrics.consistency import shape_consistency

    mode = "silhouette" if condition == "silhouette" else "edges-f1"
    resized = [output.resize(control.size) for output, control in zip(outputs, controls, strict=True)]
    res = shape_consistency(resized, controls, mode=mode, control_kind="map", diversity_with=None)
    return [float(v) for v in res.per_image]


def measure_shape_control(
    pipe: Any,
    controlnet: Any,
    controls: list[Any],
    captions: list[str],
    condition: str,
    steps: int = 30,
    guidance_scale: float = 4.0,
    seeds: tuple[int, ...] = (0, 1),
    scale: float = 1.0,
    text_extractor: str | None = None,
) -> dict[str, Any]:
    """Shape adherence with and without ``controlnet``: mean canny F1 (or silhouette IoU) of the
    outputs against their control images, same prompts and seeds. Returns
    ``{"with": mean, "without": mean, "ratio": with / without, "per_image": {...}, "n": count}``.

    text_extractor (e.g. ``emoji-text``): also the text alignment (``metrics.text_alignment``) of
    both sets of outputs to their captions, as ``text_with``, ``text_without`` and ``text_ratio``
    (what the ControlNet costs in prompt following; per image under ``per_image``)."""
    size = model_size(pipe, None)
    results: dict[str, list[float]] = {"with": [], "without": []}
    outputs: dict[str, list[Any]] = {"with": [], "without": []}
    prompts: list[str] = []
    for control, caption in zip(controls, captions, strict=True):
        control = control.resize((size, size))
        for seed in seeds:
            common = dict(num_inference_steps=steps, guidance_scale=guidance_scale)
            plain = _generate(pipe, caption, seed, size, **common)
            steered = _generate(pipe, caption, seed, size, control=control, controlnet=controlnet, scale=scale, **common)
            results["without"] += shape_scores(plain, [control], condition)
            results["with"] += shape_scores(steered, [control], condition)
            outputs["without"] += plain
            outputs["with"] += steered
            prompts.append(caption)
    with_mean = float(np.mean(results["with"]))
    without_mean = float(np.mean(results["without"]))
    report = {"condition": condition, "with": with_mean, "without": without_mean,
              "ratio": with_mean / max(without_mean, 1e-9), "n": len(results["with"]), "per_image": results}
    if text_extractor is not None:
        from consistent_diffusion.metrics.consistency import text_alignment

        for side in ("with", "without"):
            values = text_alignment(outputs[side], prompts, text_extractor).per_image
            results[f"text_{side}"] = [float(v) for v in values]
            report[f"text_{side}"] = float(np.mean(results[f"text_{side}"]))
        report["text_extractor"] = text_extractor
        report["text_ratio"] = report["text_with"] / report["text_without"] if report["text_without"] > 0 else None
    return report


def ship_controlnet(folder: str | Path, condition: str, dest_root: str | Path | None = None, fp16: bool = True) -> Path:
    """Copy a trained ControlNet (``OUT/controlnet``) to where ``embedded-<condition>`` finds it
    (``assets/controlnet/embedded-<condition>``), as fp16 safetensors by default."""
    from diffusers import ControlNetModel

    from consistent_diffusion.core.outputs import atomic_output_dir
    from consistent_diffusion.methods.controlnet import SHIPPED_PREFIX, SHIPPED_ROOT

    if condition not in CONDITIONS:
        raise ConfigError(f"unknown condition {condition!r}; accepted: {', '.join(CONDITIONS)}")
    folder = Path(folder)
    dest = Path(dest_root or SHIPPED_ROOT) / f"{SHIPPED_PREFIX}{condition}"
    model = ControlNetModel.from_pretrained(folder)
    model.register_to_config(_name_or_path=dest.name)  # not the local training folder
    with atomic_output_dir(dest, overwrite=True) as temp:
        (model.half() if fp16 else model).save_pretrained(temp, safe_serialization=True)
        if (folder / CONTROL_META).is_file():  # its base model's spec and path: last part only
            meta = json.loads((folder / CONTROL_META).read_text(encoding="utf-8"))
            write_json_atomic(_without_local_paths(meta), temp / CONTROL_META)
        stages = training_stages(folder)
        if stages:
            write_json_atomic({"stages": stages}, temp / "training.json")
    return dest


def training_stages(folder: str | Path) -> list[dict[str, Any]]:
    """The training records of ``folder`` and of the ControlNets it started from
    (``init_controlnet``), first stage first, with absolute paths cut to their last part so a
    shipped record names no local folder."""
    stages: list[dict[str, Any]] = []
    path: Path | None = Path(folder)
    while path is not None and (path / "training.json").is_file() and len(stages) < 100:
        record = json.loads((path / "training.json").read_text(encoding="utf-8"))
        init = (record.get("config") or {}).get("init_controlnet")
        stages.insert(0, _without_local_paths(record))
        path = Path(init) if init else None
    return stages


def _without_local_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value
