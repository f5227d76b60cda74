"""Edit-friendly DDPM inversion and editing (Huberman-Spiegelglas, Kulikov, Michaeli, CVPR 2024).

The DDPM sampler is ``x_{t-1} = mu_t(x_t) + sigma_t z_t``. Edit-friendly inversion
draws every ``x_t`` *independently* from the clean latent ``x_0`` (eq. 6,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t``) and extracts the noise maps that make the
sampler pass through exactly those points (eq. 5, ``z_t = (x_{t-1} - mu_t(x_t)) / sigma_t``).
Re-running the sampler from ``x_T`` with the same prompt, guidance and those ``z_t`` therefore
gives back ``x_0`` (to float rounding), for any number of steps; re-running it with another
prompt, from step ``skip``, edits the image while keeping its structure (section 5).

How it plugs into diffusers: all scheduler arithmetic is DDIMScheduler's own ``step`` with
``eta`` and ``variance_noise=`` (``eta=1`` is DDPM sampling). The denoising loop is the
pipeline's own: a ``NoiseMapScheduler`` (a DDIMScheduler) is swapped in for one call and either
*records* noise maps (inversion: it returns the independently drawn ``x_{t-1}`` and stores
``z_t``) or *replays* them (reconstruction/editing). So the UNet is called once per step with
the conditional and unconditional halves batched, SD and SDXL conditioning (pooled embeddings,
time ids) come from the pipeline itself, and the reconstruction evaluates exactly the same
network inputs as the inversion.

Spaces: ``x0``/``xs`` are VAE latents scaled by ``vae.config.scaling_factor`` (what the UNet
sees), shape (1, C, H/f, W/f); images are pixels in [-1, 1] (see ``images.pil_to_tensor``).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import load_image, pil_to_tensor
from consistent_diffusion.core.outputs import atomic_path
from consistent_diffusion.methods.base import GenerationContext, Method, register
from consistent_diffusion.methods.common import batch_size, default_size, restoring, swapped_scheduler

INVERSION_TENSORS = "inversion.safetensors"
INVERSION_META = "inversion.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The sampler math: short plain functions over a DDIMScheduler (k-diffusion style).
# --------------------------------------------------------------------------------------------


def ddpm_mean(scheduler: DDIMScheduler, eps: torch.Tensor, t: Any, x_t: torch.Tensor, eta: float) -> torch.Tensor:
    """mu_t(x_t): the DDPM/DDIM(eta) posterior mean of the DDPM sampler, via the scheduler's own step."""
    zeros = torch.zeros_like(x_t)
    return DDIMScheduler.step(scheduler, eps, t, x_t, eta=eta, variance_noise=zeros).prev_sample


def ddpm_std(scheduler: DDIMScheduler, t: Any, eta: float, like: torch.Tensor) -> torch.Tensor:
    """sigma_t of the DDIM(eta) step at ``t`` (a 0-d tensor), via the scheduler's own step.

    With a zero sample and zero model output every prediction type gives a zero mean, so the
    step returns exactly ``0 + sigma_t * 1``.
    """
    zero = torch.zeros_like(like[:1, :1, :1, :1])
    return DDIMScheduler.step(scheduler, zero, t, zero, eta=eta, variance_noise=torch.ones_like(zero)).prev_sample[
        0, 0, 0, 0
    ]


def ddpm_step(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: Any, x_t: torch.Tensor, z: torch.Tensor, eta: float
) -> torch.Tensor:
    """One DDPM sampling step with a given noise map: x_{t-1} = mu_t(x_t) + sigma_t z."""
    return DDIMScheduler.step(scheduler, eps, t, x_t, eta=eta, variance_noise=z.expand_as(x_t)).prev_sample


def noise_map(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: Any, x_t: torch.Tensor, x_prev: torch.Tensor, eta: float
) -> torch.Tensor:
    """z_t = (x_{t-1} - mu_t(x_t)) / sigma_t (paper eq. 5): the noise that lands the step on x_{t-1}."""
    sigma = ddpm_std(scheduler, t, eta, x_t)
    if float(sigma) == 0.0:
        raise ConfigError(
            f"the scheduler has sigma_t = 0 at timestep {int(t)}: no noise map can reach x_(t-1); "
            "use eta > 0 and set_alpha_to_one=False"
        )
    return (x_prev - ddpm_mean(scheduler, eps, t, x_t, eta)) / sigma


def sample_trajectory(
    scheduler: DDIMScheduler, x0: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw x_t for every timestep independently from x0 (paper eq. 6).

    x0: (1, C, h, w) latent. Returns xs of shape (N + 1, C, h, w): ``xs[i]`` is the latent that
    enters sampling step ``i`` (at ``timesteps[i]``), ``xs[N]`` is x0 itself.
    """
    noise = torch.randn((len(timesteps), *x0.shape[1:]), generator=generator, dtype=torch.float32)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    noisy = scheduler.add_noise(x0.expand(len(timesteps), -1, -1, -1), noise, timesteps.to(x0.device))
    return torch.cat([noisy, x0], dim=0)


# --------------------------------------------------------------------------------------------
# The scheduler that plugs the math into any pipeline's own loop.
# --------------------------------------------------------------------------------------------


class NoiseMapScheduler(DDIMScheduler):
    """DDIMScheduler whose ``step`` records or replays edit-friendly noise maps.

    record mode (inversion): ``targets`` = xs drawn by eq. 6; each step stores z_t (eq. 5) and
    returns ``mu_t + sigma_t z_t``, which is the drawn x_{t-1} up to one float rounding, so the
    next UNet call sees the paper's x_{t-1} and a replay retraces the same operations exactly.
    replay mode (sampling): ``noise_maps`` = zs; each step is mu_t + sigma_t z_t with the stored z_t (eta from the
    inversion), broadcast over the batch. Without noise maps, plain DDIM (eta=0).
    ``pinned``: rows of the batch that follow a fixed trajectory (N + 1, C, h, w): after step
    ``i`` the row is set to ``trajectory[i + 1]`` (a real StyleAligned reference).
    ``skip``: the first ``skip`` timesteps are dropped from ``timesteps`` (editing from a step).

    ``step`` hides ``eta``/``generator`` from its signature so pipelines do not pass them.
    """

    def configure(
        self,
        *,
        eta: float = 1.0,
        targets: torch.Tensor | None = None,
        noise_maps: torch.Tensor | None = None,
        pinned: dict[int, torch.Tensor] | None = None,
        skip: int = 0,
    ) -> NoiseMapScheduler:
        self.nm_eta = eta
        self.nm_targets = targets
        self.nm_noise_maps = noise_maps
        self.nm_pinned = dict(pinned or {})
        self.nm_skip = skip
        self.nm_recorded: list[torch.Tensor] = []
        self.nm_landed: list[torch.Tensor] = []
        self.nm_all_timesteps: torch.Tensor | None = None
        return self

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device=device)
        self.nm_all_timesteps = self.timesteps.clone()
        self.timesteps = self.timesteps[self.nm_skip :]

    def step_index_of(self, timestep: Any) -> int:
        """Position of ``timestep`` in the full (unskipped) schedule."""
        matches = (self.nm_all_timesteps.to("cpu") == int(timestep)).nonzero()
        if len(matches) != 1:
            raise RuntimeError(f"timestep {int(timestep)} is not in the inversion schedule")
        return int(matches[0, 0])

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True, **_):
        i = self.step_index_of(timestep)
        if self.nm_targets is not None:
            x_prev = self.nm_targets[i + 1].unsqueeze(0).to(sample)
            z = noise_map(self, model_output, timestep, sample, x_prev, self.nm_eta)
            self.nm_recorded.append(z)
            # Continue from the sampler's own landing point mu + sigma * z (x_{t-1} up to one
            # rounding): replaying z then retraces this trajectory operation for operation.
            prev = ddpm_step(self, model_output, timestep, sample, z, self.nm_eta)
            self.nm_landed.append(prev)
        elif self.nm_noise_maps is not None:
            z = self.nm_noise_maps[i].unsqueeze(0).to(sample)
            prev = ddpm_step(self, model_output, timestep, sample, z, self.nm_eta)
        else:
            prev = DDIMScheduler.step(self, model_output, timestep, sample, eta=0.0).prev_sample
        for row, trajectory in self.nm_pinned.items():
            prev[row] = trajectory[i + 1].to(prev)
        return (prev, None) if not return_dict else _StepOutput(prev)


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def noise_map_scheduler(scheduler: Any) -> NoiseMapScheduler:
    """A NoiseMapScheduler over a scheduler's (or config dict's) training schedule.

    Betas, timestep spacing and prediction type are kept.
    ``set_alpha_to_one`` is forced to False: with it, sigma of the last step is 0 and no noise
    map could correct it (the reference implementation zeroes that map and loses exactness).
    """
    source = scheduler if isinstance(scheduler, dict) else dict(scheduler.config)
    config = {k: v for k, v in source.items() if not k.startswith("_")}
    config.update(set_alpha_to_one=False, thresholding=False, clip_sample=False)  # latents are not in [-1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NoiseMapScheduler.from_config(config).configure()


# --------------------------------------------------------------------------------------------
# The inversion record and its public functions.
# --------------------------------------------------------------------------------------------


@dataclass
class Inversion:
    """An edit-friendly DDPM inversion of one image.

    x0: (1, C, h, w) clean latent (VAE mean, times ``scaling_factor``), float32.
    xs: (N + 1, C, h, w) latents entering each step; ``xs[N] == x0``.
    zs: (N, C, h, w) noise maps; ``zs[i]`` is used at step ``i``.
    timesteps: (N,) int64 scheduler timesteps, descending.
    prompt / negative_prompt / cfg: the source conditioning used for the inversion.
    config: steps, eta, height, width, seed, scheduler config, model spec (JSON-serialisable).
    """

    x0: torch.Tensor
    xs: torch.Tensor
    zs: torch.Tensor
    timesteps: torch.Tensor
    prompt: str
    cfg: float
    negative_prompt: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)  # folder it was saved to / loaded from

    @property
    def steps(self) -> int:
        return int(self.zs.shape[0])

    @property
    def eta(self) -> float:
        return float(self.config.get("eta", 1.0))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.config["width"]), int(self.config["height"])

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``inversion.safetensors`` + ``inversion.json`` into ``folder`` (each atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "x0": self.x0.detach().float().cpu().contiguous(),
            "xs": self.xs.detach().float().cpu().contiguous(),
            "zs": self.zs.detach().float().cpu().contiguous(),
            "timesteps": self.timesteps.detach().long().cpu().contiguous(),
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "method": "edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024)",
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "cfg": self.cfg,
            "config": self.config,
        }
        _atomic_write(folder / INVERSION_TENSORS, lambda path: save_file(tensors, str(path)))
        _atomic_write(
            folder / INVERSION_META,
            lambda path: Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8"),
        )
        if self.path is None:
            self.path = str(folder)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Inversion:
        """Read an inversion written by ``save``; ConfigError names what is missing or wrong."""
        from safetensors.torch import load_file

        folder = Path(folder)
        tensors_path, meta_path = folder / INVERSION_TENSORS, folder / INVERSION_META
        if not tensors_path.is_file() or not meta_path.is_file():
            raise ConfigError(
                f"{folder} is not an inversion folder: it needs {INVERSION_TENSORS} and {INVERSION_META} "
                "(written by `consistent-diffusion invert`)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(tensors_path))
        except Exception as error:  # corrupt JSON or safetensors
            raise ConfigError(f"cannot read inversion in {folder}: {error}") from error
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"inversion in {folder} has format_version {meta.get('format_version')!r}; "
                f"this version reads {FORMAT_VERSION}"
            )
        missing = {"x0", "xs", "zs", "timesteps"} - set(tensors)
        if missing:
            raise ConfigError(f"inversion in {folder} lacks tensors {sorted(missing)}")
        return cls(
            x0=tensors["x0"],
            xs=tensors["xs"],
            zs=tensors["zs"],
            timesteps=tensors["timesteps"],
            prompt=meta["prompt"],
            cfg=float(meta["cfg"]),
            negative_prompt=meta.get("negative_prompt"),
            config=meta.get("config", {}),
            path=str(folder),
        )


def inversion_reference(inversion: Inversion) -> str:
    """How a manifest names an inversion: its folder (save it first to make the manifest replayable)."""
    if inversion.path is None:
        return "<unsaved inversion: call Inversion.save(folder) before generating to record it>"
    return str(Path(inversion.path).resolve())


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    with atomic_path(path) as temp:
        write(temp)




@torch.no_grad()
def encode_image(pipe: Any, image: Any, size: tuple[int, int]) -> torch.Tensor:
    """Image (path or PIL) -> (1, C, h, w) float32 latent: VAE posterior mean times ``scaling_factor``.

    The image passes ``load_image`` (mode, alpha, corrupt-file checks) and is resized +
    centre-cropped to ``size`` = (width, height).
    """
    pixels = pil_to_tensor(load_image(image, size))
    with _vae_precision(pipe.vae) as vae:
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latent = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()


@contextlib.contextmanager
def _vae_precision(vae: Any) -> Iterator[Any]:
    """The VAE in float32 when it is fp16 and its config asks for upcasting (SDXL's overflows)."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield vae
        return
    vae.to(torch.float32)
    try:
        yield vae
    finally:
        vae.to(torch.float16)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """(B, C, h, w) scaled latents -> list of RGB PIL images (inverse of ``encode_image``)."""
    from consistent_diffusion.core.images import tensor_to_pil

    with _vae_precision(pipe.vae) as vae:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        return tensor_to_pil(vae.decode(latents).sample.float().cpu())


def _validate(steps: int, cfg: float, eta: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(cfg, (int, float)) and cfg >= 0):
        raise ConfigError(f"cfg (guidance scale) must be a number >= 0, got {cfg!r}")
    if not (isinstance(eta, (int, float)) and 0 < eta <= 1):
        raise ConfigError(f"eta must be in (0, 1] (1 = DDPM, as in the paper), got {eta!r}")


@torch.no_grad()
def invert(
    pipe: Any,
    image: Any,
    prompt: str = "",
    *,
    steps: int = 50,
    cfg: float = 3.5,
    eta: float = 1.0,
    negative_prompt: str | None = None,
    generator: torch.Generator | None = None,
    size: tuple[int, int] | None = None,
    model: str | None = None,
) -> Inversion:
    """Edit-friendly DDPM inversion of ``image`` (Huberman-Spiegelglas et al. 2024, Algorithm 1).

    pipe: any SD-family text-to-image pipeline (SD 1.x/2.x, SDXL, the embedded model).
    image: path or PIL image; resized + centre-cropped to ``size`` = (width, height), default
    the pipeline's native size. prompt / cfg: the source description and guidance (the paper
    inverts with the source prompt and cfg 3.5). eta: 1 is DDPM. generator: draws the
    independent noises of eq. 6 (seed it for reproducible noise maps).
    One pipeline call with ``steps`` UNet evaluations (conditional + unconditional batched).
    """
    _validate(steps, cfg, eta)
    width, height = size or default_size(pipe)
    x0 = encode_image(pipe, image, (width, height))
    scheduler = noise_map_scheduler(pipe.scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone().long()
    xs = sample_trajectory(scheduler, x0, timesteps, generator)
    scheduler.configure(eta=eta, targets=xs)
    dtype = pipe.unet.dtype
    with swapped_scheduler(pipe, scheduler):
        pipe(
            prompt=[prompt],
            negative_prompt=None if negative_prompt is None else [negative_prompt],
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=height,
            width=width,
            latents=xs[:1].to(device=pipe.unet.device, dtype=dtype),
            output_type="latent",
        )
    if len(scheduler.nm_recorded) != steps:
        raise RuntimeError(f"the pipeline ran {len(scheduler.nm_recorded)} steps, expected {steps}")
    zs = torch.cat(scheduler.nm_recorded).float().cpu()
    # The trajectory the sampler really follows (equal to eq. 6's draws up to float rounding).
    xs = torch.cat([xs[:1], torch.cat(scheduler.nm_landed).float().cpu()])
    config = {
        "steps": steps,
        "eta": float(eta),
        "height": height,
        "width": width,
        "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "pipeline": type(pipe).__name__,
    }
    if model is not None:
        config["model"] = model
    seed = generator.initial_seed() if generator is not None else None
    config["seed"] = seed
    return Inversion(
        x0=x0.cpu(),
        xs=xs.float().cpu(),
        zs=zs,
        timesteps=timesteps.cpu(),
        prompt=prompt,
        cfg=float(cfg),
        negative_prompt=negative_prompt,
        config=config,
    )


@torch.no_grad()
def edit(
    pipe: Any,
    inversion: Inversion,
    prompt: str | list[str] | None = None,
    *,
    cfg_tar: float | None = None,
    skip: int = 0,
    negative_prompt: str | None = None,
    output_type: str = "pil",
) -> Any:
    """Re-sample an inversion with a target prompt from step ``skip`` (paper section 5).

    prompt: target prompt(s) (default: the source prompt); one output per prompt, all sharing
    the inversion's noise maps. cfg_tar: target guidance (default: the inversion's cfg).
    skip: number of leading steps skipped (0..steps-1; larger keeps more of the input).
    With the source prompt, source cfg and skip=0 this reconstructs the input exactly.
    Returns the pipeline's ``images`` (PIL list, or a latent tensor for ``output_type="latent"``).
    """
    prompts = [inversion.prompt] if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
    negative = negative_prompt if negative_prompt is not None else inversion.negative_prompt
    ctx = GenerationContext(
        pipe=pipe,
        prompts=prompts,
        negative_prompts=None if negative is None else [negative] * len(prompts),
        generators=[],
        call_kwargs={"guidance_scale": inversion.cfg if cfg_tar is None else cfg_tar},
    )
    with DdpmEdit(inversion=inversion, skip=skip).applied(ctx):
        out = ctx.pipe(
            prompt=ctx.prompts,
            negative_prompt=ctx.negative_prompts,
            output_type=output_type,
            **ctx.call_kwargs,
        )
    return out.images


def reconstruct(pipe: Any, inversion: Inversion, output_type: str = "latent") -> Any:
    """Re-sample with the source prompt and cfg from step 0: gives back ``inversion.x0``."""
    return edit(pipe, inversion, None, cfg_tar=inversion.cfg, skip=0, output_type=output_type)


def _sizes_from_ctx(ctx: GenerationContext, inversion: Inversion, name: str) -> None:
    """Set steps/height/width to the inversion's; warn when the caller asked for others."""
    width, height = inversion.size
    wanted = {"num_inference_steps": inversion.steps, "height": height, "width": width}
    for key, value in wanted.items():
        given = ctx.call_kwargs.get(key)
        if given is not None and int(given) != value:
            warnings.warn(
                f"{name}: {key}={given} replaced by the inversion's {value}", UserWarning, stacklevel=4
            )
        ctx.call_kwargs[key] = value




@register("ddpm_edit")
@dataclass(frozen=True)
class DdpmEdit(Method):
    """Edit an inverted image: every batch element re-samples the inversion with its own prompt.

    Either ``inversion`` (an ``Inversion`` or the folder it was saved in) or ``image`` (a path,
    inverted at first use with the call's steps and size, ``source_prompt``, ``source_cfg`` and
    ``seed``, then cached). The batch's guidance scale (``guidance_scale``) is the target cfg.
    """

    inversion: Any = None  # Inversion | str | os.PathLike
    skip: int = 0  # steps skipped at the start (0 = start from x_T), 0 <= skip < steps
    image: Any = None  # instead of an inversion: an image to invert (path or PIL)
    source_prompt: str = ""  # with image: its description, used to invert it
    source_cfg: float = 3.5  # with image: guidance of its inversion (the paper's 3.5)
    seed: int = 0  # with image: seed of the inversion's independent noises
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if (self.inversion is None) == (self.image is None):
            raise ConfigError("ddpm_edit needs exactly one of inversion (a folder from `invert`) or image")
        if isinstance(self.inversion, (str, os.PathLike)):
            object.__setattr__(self, "inversion", Inversion.load(self.inversion))
        if self.inversion is not None and not isinstance(self.inversion, Inversion):
            raise ConfigError(f"inversion must be an Inversion or its folder, got {type(self.inversion).__name__}")
        if not isinstance(self.skip, int) or isinstance(self.skip, bool) or self.skip < 0:
            raise ConfigError(f"skip must be an integer >= 0, got {self.skip!r}")
        if self.inversion is not None:
            _check_skip(self.skip, self.inversion.steps)
        if self.image is not None:
            load_image(self.image)  # fail early: missing, corrupt or empty image
            _validate(1, self.source_cfg, 1.0)
            if not isinstance(self.seed, int) or isinstance(self.seed, bool):
                raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def describe(self) -> dict[str, Any]:
        """Options that re-create the method (``get_method("ddpm_edit", **options)``)."""
        if self.inversion is not None:
            return {"name": self.name, "options": {"inversion": inversion_reference(self.inversion), "skip": self.skip}}
        image = os.path.abspath(os.fspath(self.image)) if isinstance(self.image, (str, os.PathLike)) else "<in-memory image>"
        return {"name": self.name, "options": {"image": image, "skip": self.skip, "source_prompt": self.source_prompt,
                                               "source_cfg": self.source_cfg, "seed": self.seed}}

    def inversion_for(self, ctx: GenerationContext) -> Inversion:
        """The inversion to edit: given, or the image inverted for this call's steps and size."""
        if self.inversion is not None:
            return self.inversion
        from consistent_diffusion.methods.common import generation_size

        steps = int(ctx.call_kwargs.get("num_inference_steps") or 50)
        size = generation_size(ctx)
        key = (id(ctx.pipe.unet), steps, size)
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = invert(ctx.pipe, self.image, self.source_prompt, steps=steps, cfg=self.source_cfg,
                                      size=size, generator=torch.Generator().manual_seed(self.seed))
        return self._cache[key]

    @contextlib.contextmanager
    def applied(self, ctx: GenerationContext) -> Iterator[GenerationContext]:
        if "latents" in ctx.call_kwargs or "image" in ctx.call_kwargs:
            raise ConfigError("ddpm_edit sets the starting latents itself: it cannot follow img2img or another "
                              "method that sets `latents`/`image`")
        inv = self.inversion_for(ctx)
        _check_skip(self.skip, inv.steps)
        with restoring(ctx):
            _sizes_from_ctx(ctx, inv, "ddpm_edit")
            unet = ctx.pipe.unet
            batch = batch_size(ctx)
            start = inv.xs[self.skip : self.skip + 1].expand(batch, -1, -1, -1)
            ctx.call_kwargs["latents"] = start.to(device=unet.device, dtype=unet.dtype).clone()
            scheduler = noise_map_scheduler(inv.config.get("scheduler") or ctx.pipe.scheduler).configure(
                eta=inv.eta, noise_maps=inv.zs, skip=self.skip
            )
            with swapped_scheduler(ctx.pipe, scheduler):
                yield ctx


def _check_skip(skip: int, steps: int) -> None:
    if not 0 <= skip < steps:
        raise ConfigError(f"skip must be an integer in [0, {steps - 1}] for a {steps}-step inversion, got {skip!r}")
