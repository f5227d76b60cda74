"""One training loop on ``accelerate`` for DreamBooth, LoRA DreamBooth and ControlNet.

The same code runs on this CPU (``Accelerator(cpu=True)``), on one GPU, and under
``accelerate launch --multi_gpu`` / ``torchrun`` on several GPUs or machines: modules and the
optimizer go through ``accelerator.prepare``, the loss through ``accelerator.backward``, and only
the main process writes files.

Determinism and resume. Everything random in step ``s`` (which images, timesteps, noise, latent
samples, caption dropout) comes from a generator seeded with ``(seed, s, process index)``, so a
step's result depends only on the weights and optimizer state before it. A checkpoint
(``checkpoints/step_NNNNNN.pt``, written to a temporary file and renamed) holds the trainable
weights, optimizer and learning-rate scheduler state, the global RNG states and the step;
resuming from it after a kill continues at the next step and ends with the same weights as an
uninterrupted run (bit-for-bit on CPU). SIGINT/SIGTERM finish the current step, write a checkpoint
and stop cleanly.

Run folder (``out``)::

    train_config.json   the config, base model identity, library versions (checked on resume)
    log.jsonl           one record per logged step: step, loss, lr, seconds
    checkpoints/        step_NNNNNN.pt (the last ``keep_checkpoints``)
    validation/         step_NNNNNN/ images generated at each checkpoint
    class_images/       prior-preservation images (DreamBooth), reused on resume
    <result>/           the final model: model/ (DreamBooth), lora/ (LoRA), controlnet/ (ControlNet)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_torch_save, library_versions, utc_now, write_json_atomic

MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_PATTERN = "step_{:06d}.pt"
# Fields that may change when resuming a run (everything else must match the first run).
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "progress", "resume", "validation_prompts",
                     "validation_steps", "validation_count", "log_every", "threads"}


@dataclass(kw_only=True)
class LoopConfig:
    """Options every fine-tuning run shares. Subclasses add their own fields (keyword-only)."""

    out: Path  # run folder (created; see the module docstring for its layout)
    steps: int = 400  # optimisation steps in total (a resumed run continues up to this)
    batch_size: int = 1  # examples per step and process
    learning_rate: float = 5e-6
    lr_warmup_steps: int = 0  # linear warm-up, then constant
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    checkpoint_every: int = 100  # steps between checkpoints (and validation images)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # makes the run reproducible on CPU
    device: str = "cpu"  # "cpu" forces the CPU; anything else lets accelerate choose its GPU
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU); weights are stored in float32
    gradient_checkpointing: bool = False  # trade compute for memory on large models
    threads: int | None = None  # torch CPU threads during the run (None: torch's default)
    resolution: int | None = None  # training image side in pixels; None = the model's native size
    validation_prompts: tuple[str, ...] = ()  # generated at each checkpoint (empty: none)
    validation_steps: int = 25  # denoising steps for validation images
    log_every: int = 1  # steps between log.jsonl records
    resume: bool = False  # continue the run in ``out`` from its newest checkpoint
    progress: bool = True  # tqdm progress bar with the loss

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.validation_prompts = tuple(self.validation_prompts)
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "validation_steps", "log_every"):
            _check_int(self, name, minimum=1)
        _check_int(self, "lr_warmup_steps", minimum=0)
        _check_int(self, "seed", minimum=0)
        for name in ("learning_rate", "adam_weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.resolution is not None:
            _check_int(self, "resolution", minimum=8)
        if self.threads is not None:
            _check_int(self, "threads", minimum=1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data


def _check_int(config: Any, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------- randomness


def step_generator(seed: int, step: int, process: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for everything random in one step of one process."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 1_009 + process)


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------- diffusion helpers


def encode_text(
    pipe: Any, prompts: Sequence[str], encoders: Sequence[Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings exactly as the pipeline's ``encode_prompt`` makes them (no guidance,
    no clip skip), but through ``encoders`` (default: the pipeline's text encoders, possibly
    wrapped by accelerate) so that gradients flow when a text encoder is trained.

    Returns (embeddings (B, tokens, dim), pooled (B, dim) for SDXL-shaped pipelines else None).
    """
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) is not None else [])
    if encoders is None:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(tokenizers) == 2 else [])
    device = next(_unwrap(encoders[-1]).parameters()).device
    if len(tokenizers) == 1:
        tokens = tokenizers[0](list(prompts), padding="max_length", max_length=tokenizers[0].model_max_length,
                               truncation=True, return_tensors="pt")
        config = _unwrap(encoders[0]).config
        mask = tokens.attention_mask.to(device) if getattr(config, "use_attention_mask", False) else None
        return encoders[0](tokens.input_ids.to(device), attention_mask=mask)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
        if output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(pipe: Any, size: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """SDXL ``time_ids`` (original size, crop top-left, target size) for square ``size`` images;
    None for pipelines without ``text_time`` conditioning."""
    if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        return None
    ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


def added_cond_kwargs(pipe: Any, pooled: torch.Tensor | None, size: int) -> dict[str, Any] | None:
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": sdxl_time_ids(pipe, size, pooled.shape[0], pooled.device, pooled.dtype)}


@dataclass
class LatentCache:
    """VAE posterior of each training image: mean and std (N, C, h, w); sampled per step."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[rows], self.std[rows]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


@torch.no_grad()
def encode_images(pipe: Any, images: Sequence[Any], batch: int = 16) -> LatentCache:
    """Encode RGB PIL images (all the same size) with the pipeline's VAE, once."""
    from consistent_diffusion.core.images import pil_to_tensor

    vae = pipe.vae
    device, dtype = vae.device, vae.dtype
    means, stds = [], []
    for start in range(0, len(images), batch):
        pixels = torch.cat([pil_to_tensor(image) for image in images[start : start + batch]])
        posterior = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))


def training_scheduler(pipe: Any) -> Any:
    """A DDPM scheduler with the pipeline's noise schedule (for ``add_noise`` and velocity targets)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def noise_and_target(
    scheduler: Any, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps (B,), target) for the scheduler's prediction type (DDPM training)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    timesteps = torch.randint(0, int(scheduler.config.num_train_timesteps), (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ConsistentDiffusionError(f"unsupported prediction_type {kind!r}")
    return noisy, timesteps, target


def per_example_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example (B,), in float32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def model_size(pipe: Any, resolution: int | None) -> int:
    """Training image side: ``resolution`` or the model's native size, checked against the VAE factor."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    size = resolution or int(pipe.unet.config.sample_size) * factor
    if size % factor:
        raise ConfigError(f"resolution {size} is not divisible by this model's VAE factor {factor}")
    return size


# ----------------------------------------------------------------------------- the task interface


class Task:
    """What the loop trains. Subclasses fill ``modules`` (name -> module with trainable
    parameters; the loop prepares them with accelerate and hands the prepared versions back in
    ``run``) and implement ``loss``, ``validate`` and ``export``."""

    result_name = "model"  # folder of the final result inside ``out``

    def __init__(self) -> None:
        self.modules: dict[str, torch.nn.Module] = {}
        self.run: dict[str, Any] = {}  # prepared (possibly DDP-wrapped) modules, for forward passes

    def forward_module(self, name: str) -> Any:
        """The module to run forward passes through: prepared by accelerate if training, else raw."""
        return self.run.get(name, self.modules[name])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = []
        for module in self.modules.values():
            params.extend(p for p in module.parameters() if p.requires_grad)
        return params

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trainable parameters per module, detached on the CPU (what checkpoints store)."""
        return {
            name: {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}
            for name, module in self.modules.items()
        }

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module in self.modules.items():
            params = dict(module.named_parameters())
            saved = state.get(name, {})
            expected = {k for k, p in params.items() if p.requires_grad}
            if set(saved) != expected:
                raise ConsistentDiffusionError(f"checkpoint does not match module {name!r} (different model or options)")
            with torch.no_grad():
                for key, value in saved.items():
                    params[key].copy_(value.to(params[key].device, params[key].dtype))

    def prepare(self, accelerator: Any, step_device: torch.device) -> None:  # noqa: B027 - optional hook
        """Called once the accelerator knows its device (move frozen parts there)."""

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self, step: int, folder: Path) -> None:  # noqa: B027 - optional hook
        """Write validation images for the current weights into ``folder`` (nothing if there is nothing to show)."""

    def export(self, folder: Path) -> None:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("step_*.pt"):
        with contextlib.suppress(ValueError):
            found.append((int(path.stem.split("_")[1]), path))
    return sorted(found)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read one of our checkpoints (a trusted file we wrote: it holds RNG states, hence not weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - report any unreadable checkpoint by name
        raise ConsistentDiffusionError(f"checkpoint {path} is unreadable ({error}); delete it to resume from an older one") from error


# ----------------------------------------------------------------------------- stop signals


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self.requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.requested = True

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    result: Path | None  # the exported model (None if the run stopped early)
    step: int  # steps completed
    losses: list[float]  # loss of each step run in this process (this session)
    stopped: bool = False  # stopped by a signal before ``steps``
    trainable_parameters: int = 0  # number of values the optimiser updated


def check_out_folder(config: LoopConfig) -> None:
    """Fail fast (before loading data or generating class images) when ``out`` holds a run and
    ``resume`` was not asked for."""
    if not config.resume and list_checkpoints(config.out):
        raise ConfigError(f"{config.out} already holds a training run; pass --resume to continue it or choose another --out")


def _check_run_folder(config: LoopConfig, record: dict[str, Any]) -> None:
    check_out_folder(config)
    path = config.out / "train_config.json"
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    if config.resume:
        old, new = previous.get("config", {}), record["config"]
        changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if changed or previous.get("kind") != record["kind"]:
            raise ConfigError(f"--resume with different options than the run in {config.out}: {', '.join(changed) or 'kind'}; "
                              "use the same options (only steps/checkpoint/validation options may change)")


def run_training(
    task: Task,
    config: LoopConfig,
    kind: str,
    on_step_end: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.steps`` steps (resuming if asked), then export its result.

    on_step_end(step, loss): called after each completed step (tests use it to simulate a kill).
    """
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_training(task, config, kind, on_step_end)
    finally:
        torch.set_num_threads(previous_threads)


def _run_training(task: Task, config: LoopConfig, kind: str, on_step_end: Callable[[int, float], None] | None) -> TrainResult:
    from accelerate import Accelerator

    config.out.mkdir(parents=True, exist_ok=True)
    record = {"format": f"consistent-diffusion/train/{kind}/v1", "kind": kind, "created": utc_now(),
              "config": config.to_dict(), "model": task.identity(), "versions": library_versions()}
    _check_run_folder(config, record)
    accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision)
    device = accelerator.device
    task.prepare(accelerator, device)
    params = task.trainable_parameters()
    if not params:
        raise ConsistentDiffusionError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    warmup = config.lr_warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    names = list(task.modules)
    prepared = accelerator.prepare(*task.modules.values(), optimizer, lr_schedule)
    task.run = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer, lr_schedule = prepared[len(names)], prepared[len(names) + 1]

    start = 0
    checkpoints = list_checkpoints(config.out)
    if config.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1][1])
        task.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        set_rng_states(state["rng"])
        start = int(state["step"])
        accelerator.print(f"resuming {config.out} at step {start}")
    if accelerator.is_main_process:
        write_json_atomic(record, config.out / "train_config.json")

    def save_checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            state = {"step": step, "trainable": task.trainable_state(), "optimizer": optimizer.state_dict(),
                     "lr_schedule": lr_schedule.state_dict(), "rng": rng_states(), "kind": kind}
            atomic_torch_save(state, checkpoint_dir(config.out) / CHECKPOINT_PATTERN.format(step))
            for _, old in list_checkpoints(config.out)[: -config.keep_checkpoints]:
                old.unlink(missing_ok=True)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                task.validate(step, config.out / "validation" / f"step_{step:06d}")
        accelerator.wait_for_everyone()

    for module in task.run.values():
        module.train()
    losses: list[float] = []
    stopped = False
    step = start
    log_path = config.out / "log.jsonl"
    with _StopFlag().installed() as flag, tqdm(
        total=config.steps, initial=start, desc=f"train {kind}", unit="step",
        disable=not config.progress or not accelerator.is_main_process,
    ) as bar:
        while step < config.steps:
            began = time.perf_counter()
            generator = step_generator(config.seed, step, accelerator.process_index)
            with accelerator.autocast():
                loss, logs = task.loss(step, generator, device)
            accelerator.backward(loss)
            if config.max_grad_norm > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = float(accelerator.gather(loss.detach().float().reshape(1)).mean())
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if accelerator.is_main_process and (step % config.log_every == 0 or step == config.steps):
                entry = {"step": step, "loss": value, "lr": lr_schedule.get_last_lr()[0],
                         "seconds": round(time.perf_counter() - began, 4), **logs}
                with open(log_path, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(entry) + "\n")
            if on_step_end is not None:
                on_step_end(step, value)
            if step % config.checkpoint_every == 0 or step == config.steps or flag.requested:
                save_checkpoint(step)
            if flag.requested and step < config.steps:
                stopped = True
                accelerator.print(f"stopped at step {step}; continue with --resume")
                break

    result = None
    if not stopped and accelerator.is_main_process:
        from consistent_diffusion.core.outputs import atomic_output_dir

        for module in task.run.values():
            module.eval()
        result = config.out / task.result_name
        with atomic_output_dir(result, overwrite=True) as temp:
            task.export(temp)
            write_json_atomic({**record, "steps_done": step, "finished": utc_now()}, temp / "training.json")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return TrainResult(out=config.out, result=result, step=step, losses=losses, stopped=stopped,
                       trainable_parameters=sum(p.numel() for p in params))


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)


def write_validation_images(images: Sequence[Any], prompts: Sequence[str], folder: Path) -> None:
    """Save validation images and a contact sheet (one column per prompt)."""
    from consistent_diffusion.core.images import contact_sheet, save_png_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        save_png_atomic(image, folder / f"{index:02d}.png")
    if images:
        save_png_atomic(contact_sheet(list(images), columns=len(images), labels=[p[:20] for p in prompts]),
                        folder / "contact_sheet.png")
