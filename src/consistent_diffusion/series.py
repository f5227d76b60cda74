"""A series is prompts x seeds: the unit every method, metric and benchmark consumes.

Image (prompt p, seed s) gets its own CPU ``torch.Generator`` seeded with s, so it is the same
whether generated alone or inside a larger batch (up to float tolerance of batched kernels).
Output folder (written atomically):

    p00_s0000.png ...      one PNG per image, ``p{prompt index}_s{seed}``, carrying its recipe
                           (A1111 ``parameters`` + ours, ``core.recipe``; ``recreate_image``)
    contact_sheet.png      rows = prompts, columns = seeds
    manifest.json          config, methods, seeds, model identity, library versions, time
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from consistent_diffusion.core import recipe
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import contact_sheet, save_png_atomic
from consistent_diffusion.core.outputs import atomic_output_dir, library_versions, utc_now, write_json_atomic
from consistent_diffusion.methods.base import (
    GenerationContext,
    Method,
    default_guidance_rescale,
    get_method,
    run,
)
from consistent_diffusion.models.loading import SCHEDULERS, model_identity, set_scheduler
from consistent_diffusion.models.sampling import DEFAULT_STEPS
from consistent_diffusion.models.vae import native_size, vae_factor

MANIFEST_FORMAT = "consistent-diffusion/series/v1"
MAX_SEED = 2**63 - 1
DIFFUSERS_SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class SeriesConfig:
    """What to generate. Validated on creation; every field is recorded in the manifest."""

    prompts: tuple[str, ...]  # one row of the series per prompt
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # one column per seed; each image's own generator
    negative_prompt: str = ""  # shared by every image ("" = none)
    steps: int = DEFAULT_STEPS  # denoising steps (models.sampling)
    guidance_scale: float = 7.5  # classifier-free guidance; <= 1 disables it
    height: int | None = None  # pixels; None = the model's native size
    width: int | None = None
    scheduler: str | None = None  # None keeps the model's scheduler; else a name in models.SCHEDULERS
    batch_size: int = 8  # images per pipeline call (does not change the images)
    # Rescales the guided prediction toward the conditional one's std (Lin et al. 2024, eq. 16),
    # in [0, 1]. None: the model's default (``methods.base.default_guidance_rescale``: 0.7 for a
    # zero-terminal-SNR model, else not passed), and not written to the manifest. Pipelines without
    # the argument (diffusers' SD img2img and ControlNet) ignore it with a warning (``methods.run``).
    guidance_rescale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.prompts:
            raise ConfigError("prompts is empty; give at least one prompt (--prompt TEXT)")
        for prompt in self.prompts:
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {prompt!r} is not text")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one seed (--seeds 0 1 2)")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise ConfigError(f"seed {seed!r} is not an integer in [0, 2**63-1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds {list(self.seeds)} repeat a value; each seed names one image column")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not 0 <= self.guidance_scale <= 100:
            raise ConfigError(f"guidance_scale must be a number in [0, 100], got {self.guidance_scale!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
                raise ConfigError(f"{name} must be an integer >= 8 (pixels) or unset, got {value!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; accepted: {', '.join(SCHEDULERS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        rescale = self.guidance_rescale
        if rescale is not None and (isinstance(rescale, bool) or not isinstance(rescale, (int, float))
                                    or not 0 <= rescale <= 1):
            raise ConfigError(f"guidance_rescale must be a number in [0, 1] or unset, got {rescale!r}")

    @property
    def items(self) -> list[tuple[int, str, int]]:
        """(prompt index, prompt, seed) in output order: prompt-major."""
        return [(index, prompt, seed) for index, prompt in enumerate(self.prompts) for seed in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompts"], data["seeds"] = list(self.prompts), list(self.seeds)
        if data["guidance_rescale"] is None:  # unset: manifests stay as they were before the field
            del data["guidance_rescale"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown series config keys {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**data)


def image_filename(prompt_index: int, seed: int) -> str:
    """Predictable file name of image (prompt index, seed)."""
    return f"p{prompt_index:02d}_s{seed:04d}.png"


@dataclass
class SeriesResult:
    """Images in ``config.items`` order, with their manifest (and folder, if written)."""

    config: SeriesConfig
    images: list[Image.Image]
    manifest: dict[str, Any]
    out_dir: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def resolve_size(pipe: Any, config: SeriesConfig) -> tuple[int, int]:
    """(height, width) for this pipeline, checked against the VAE factor diffusers needs."""
    default_width, default_height = native_size(pipe)
    height, width = config.height or default_height, config.width or default_width
    multiple = max(DIFFUSERS_SIZE_MULTIPLE, vae_factor(pipe))
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ConfigError(
                f"{name} {value} is not divisible by {multiple} (this model's VAE factor / diffusers' minimum); "
                f"try {max(multiple, value // multiple * multiple)} or {value // multiple * multiple + multiple}"
            )
    return height, width


def _batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def generate_batch(
    pipe: Any,
    config: SeriesConfig,
    items: Sequence[tuple[int, str, int]],
    methods: Sequence[Method] = (),
) -> list[Image.Image]:
    """Generate one batch of (prompt index, prompt, seed) items with the methods stacked in order."""
    height, width = resolve_size(pipe, config)
    ctx = GenerationContext(
        pipe=pipe,
        prompts=[prompt for _, prompt, _ in items],
        negative_prompts=[config.negative_prompt] * len(items) if config.negative_prompt else None,
        generators=[torch.Generator("cpu").manual_seed(seed) for _, _, seed in items],
        call_kwargs={
            "num_inference_steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "height": height,
            "width": width,
        },
    )
    rescale = effective_guidance_rescale(pipe, config)
    if rescale is not None:
        ctx.call_kwargs["guidance_rescale"] = float(rescale)
    return run(ctx, methods)


def effective_guidance_rescale(pipe: Any, config: SeriesConfig) -> float | None:
    """The guidance rescale the calls use: the config's, else the model's default (None: not passed)."""
    rescale = config.guidance_rescale if config.guidance_rescale is not None else default_guidance_rescale(pipe)
    return None if rescale is None else float(rescale)


def build_manifest(
    pipe: Any, config: SeriesConfig, methods: Sequence[Method], device: str, dtype: str
) -> dict[str, Any]:
    """Everything needed to re-create the series (see ``load_series_request``)."""
    return {
        "format": MANIFEST_FORMAT,
        "created": utc_now(),
        "config": config.to_dict(),
        "methods": [method.describe() for method in methods],
        "model": model_identity(pipe).to_dict(),
        "runtime": {"device": device, "dtype": dtype, "scheduler_class": type(pipe.scheduler).__name__,
                    "guidance_rescale": effective_guidance_rescale(pipe, config)},
        "versions": library_versions(),
        "images": [
            {"file": image_filename(index, seed), "prompt_index": index, "prompt": prompt, "seed": seed}
            for index, prompt, seed in config.items
        ],
    }


def generate_series(
    pipe: Any,
    config: SeriesConfig,
    methods: Sequence[Method] = (),
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> SeriesResult:
    """Generate ``config.prompts`` x ``config.seeds`` with ``methods`` stacked; write ``out_dir`` if given.

    The folder appears only when complete (written to a temporary sibling, then renamed).
    """
    if config.scheduler is not None:
        set_scheduler(pipe, config.scheduler)
    resolve_size(pipe, config)  # fail before any work
    items = config.items
    running = [method.for_series(items, config.batch_size) for method in methods]  # rules that span batches
    images: list[Image.Image] = []
    with tqdm(total=len(items), desc="generating", unit="img", disable=not progress) as bar:
        for batch in _batches(items, config.batch_size):
            images.extend(generate_batch(pipe, config, batch, running))
            bar.update(len(batch))
    device = str(getattr(pipe, "_execution_device", None) or getattr(pipe, "device", "cpu"))  # offload: where it ran
    dtype = str(getattr(pipe.unet, "dtype", "")).replace("torch.", "")
    manifest = build_manifest(pipe, config, methods, device, dtype)
    result = SeriesResult(config=config, images=images, manifest=manifest)
    if out_dir is not None:
        result.out_dir = write_series(result, out_dir, overwrite=overwrite)
    return result


def write_series(result: SeriesResult, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write PNGs, contact sheet and manifest atomically; returns the final folder."""
    config = result.config
    with atomic_output_dir(out_dir, overwrite=overwrite) as temp:
        for (index, prompt, seed), image in zip(config.items, result.images, strict=True):
            text = image_recipe_text(result.manifest, index, prompt, seed, image.size)
            save_png_atomic(image, temp / image_filename(index, seed), text=text)
        labels = [f"s{seed}" for _, _, seed in config.items]
        sheet = contact_sheet(result.images, columns=len(config.seeds), labels=labels)
        save_png_atomic(sheet, temp / "contact_sheet.png")
        write_json_atomic(result.manifest, temp / "manifest.json")
    return Path(out_dir)


IMAGE_RECIPE_KIND = "series-image"


def image_recipe_text(
    manifest: dict[str, Any], prompt_index: int, prompt: str, seed: int, size: tuple[int, int]
) -> dict[str, str]:
    """PNG text chunks of one series image (``core.recipe``): A1111 ``parameters`` and our recipe,
    the series ``manifest`` without its image list plus which image this is. size: (width, height)."""
    config, runtime = manifest["config"], manifest.get("runtime", {})
    names = [method["name"] for method in manifest.get("methods", [])]
    fields = {
        "Steps": config["steps"],
        "Sampler": recipe.sampler_name(runtime.get("scheduler_class", "")),
        "CFG scale": config["guidance_scale"],
        "Guidance rescale": runtime.get("guidance_rescale"),
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        **recipe.model_fields(manifest["model"]),
        "Methods": ", ".join(names) or None,
        **recipe.version_field(),
    }
    parameters = recipe.format_parameters(prompt, config.get("negative_prompt", ""), fields)
    request = {key: value for key, value in manifest.items() if key != "images"}
    image = {"file": image_filename(prompt_index, seed), "prompt_index": prompt_index, "prompt": prompt, "seed": seed}
    return recipe.png_text(parameters, {"kind": IMAGE_RECIPE_KIND, "request": request, "image": image})


def recreate_image(pipe: Any, request: SeriesRequest, prompt_index: int, seed: int, progress: bool = False) -> Image.Image:
    """Image (prompt_index, seed) of the series ``request`` describes, made again: the batch that held
    it is generated with the methods configured for the whole series (``Method.for_series``), so a
    batch-coupled method (StyleAligned's reference) sees the same neighbours and the pixels repeat."""
    config = request.config
    if config.scheduler is not None:
        set_scheduler(pipe, config.scheduler)
    items = config.items
    wanted = next((i for i, (index, _, s) in enumerate(items) if index == prompt_index and s == seed), None)
    if wanted is None:
        raise ConfigError(f"the series has no image with prompt index {prompt_index} and seed {seed}")
    running = [method.for_series(items, config.batch_size) for method in request.methods]
    start = wanted // config.batch_size * config.batch_size
    batch = items[start : start + config.batch_size]
    with tqdm(total=len(batch), desc="re-creating", unit="img", disable=not progress) as bar:
        images = generate_batch(pipe, config, batch, running)
        bar.update(len(batch))
    return images[wanted - start]


@dataclass
class SeriesRequest:
    """A series to (re-)generate: model spec, config, methods, runtime."""

    model: str
    config: SeriesConfig
    methods: list[Method]
    dtype: str = "float32"
    model_config: str | None = None  # single-file checkpoints: the architecture config folder
    fingerprint: str | None = None  # the weights' fingerprint when the series was made


def fingerprint_mismatch(request: SeriesRequest, pipe: Any) -> str | None:
    """A warning if ``pipe``'s weights differ from those the manifest recorded, else None."""
    current = model_identity(pipe).fingerprint
    if request.fingerprint and current and current != request.fingerprint:
        return (f"warning: the weights of {request.model} changed since the manifest was written "
                f"({request.fingerprint[:12]} -> {current[:12]}); images will differ")
    return None


def load_series_request(manifest_path: str | os.PathLike) -> SeriesRequest:
    """Read a manifest written by ``write_series`` back into a request that re-creates it."""
    path = Path(manifest_path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"manifest not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"manifest {path} is not valid JSON: {error}") from None
    return series_request(manifest, str(path))


def series_request(manifest: dict[str, Any], where: str) -> SeriesRequest:
    """A series manifest (or an image recipe's ``request``) as a request that re-creates it;
    ``where`` names its source in errors."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{where} is not a series manifest (format {manifest.get('format')!r}, expected {MANIFEST_FORMAT})")
    model = manifest["model"]
    methods = [get_method(m["name"], **m.get("options", {})) for m in manifest.get("methods", [])]
    return SeriesRequest(
        model=model["spec"] if model["kind"] != "folder" else model["path"],
        config=SeriesConfig.from_dict(manifest["config"]),
        methods=methods,
        dtype=manifest.get("runtime", {}).get("dtype") or "float32",
        model_config=model.get("extra", {}).get("config"),
        fingerprint=model.get("fingerprint"),
    )
