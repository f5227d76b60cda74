"""The embedded recipe's stage 3: the UNet on the cached latents and text states, and publishing its
EMA weights into pipeline/ (at the end, from a paused stage's checkpoint, or from a hand-off)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_output_dir
from consistent_diffusion.training.diffusion import min_snr_mse, noise_and_target
from consistent_diffusion.training.loop import Task
from consistent_diffusion.training.recipes.embedded.config import (
    SCHEDULER_CONFIG,
    BaseTrainConfig,
    UNetConfig,
)
from consistent_diffusion.training.recipes.embedded.stages import (
    atomic_save_pretrained,
    build_scheduler,
    build_unet,
    evaluating,
    stage_dir,
    stage_kind,
    summarise_log,
    train_stage,
)
from consistent_diffusion.training.recipes.embedded.vae import build_caches, publish_vae


def drop_captions(ids: torch.Tensor, generator: torch.Generator, probability: float, empty_id: int) -> torch.Tensor:
    """Caption ids (B,) with each replaced by ``empty_id`` with ``probability`` (one U[0, 1) draw per row):
    the unconditional examples classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2)."""
    ids = ids.clone()
    ids[torch.rand(len(ids), generator=generator) < probability] = empty_id
    return ids


# ----------------------------------------------------------------------------- stage 3: UNet


class UNetTask(Task):
    """UNet on cached latents and text states: min-SNR epsilon MSE, caption dropout; EMA weights exported."""

    result_name = "unet"
    seed_stream = 2

    def __init__(self, config: BaseTrainConfig, cache: Path) -> None:
        super().__init__()
        self.config, self.c = config, config.unet
        latent_cache = torch.load(cache / "latents.pt", weights_only=False)
        text_cache = torch.load(cache / "text.pt", weights_only=False)
        self.latents = latent_cache["latents"] * latent_cache["scaling_factor"]
        self.states = text_cache["states"].float()
        self.empty_id = int(text_cache["empty_id"])
        self.caption_ids = latent_cache["caption_ids"]
        self.train_rows = torch.nonzero(~latent_cache["val_mask"]).flatten()
        self.val_rows = torch.nonzero(latent_cache["val_mask"]).flatten()[:64]
        self.scheduler = build_scheduler()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.modules["unet"] = build_unet(self.c, self.latents.shape[1], self.states.shape[-1], self.latents.shape[-1])

    def _loss(self, unet: Any, rows: torch.Tensor, generator: torch.Generator, dropout: float,
              device: torch.device | str) -> torch.Tensor:
        """Min-SNR-weighted epsilon MSE of ``rows`` (latents (B, 4, h, w), text states (B, L, 384)).
        Draws noise and timesteps (``noise_and_target``), then the caption dropout."""
        noisy, timesteps, target = noise_and_target(self.scheduler, self.latents[rows], generator)
        ids = drop_captions(self.caption_ids[rows], generator, dropout, self.empty_id)
        pred = unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=self.states[ids].to(device)).sample
        return min_snr_mse(pred, target.to(device), self.scheduler, timesteps, self.c.min_snr_gamma)

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        rows = self.train_rows[torch.randint(0, len(self.train_rows), (self.c.batch,), generator=generator)]
        return self._loss(self.forward_module("unet"), rows, generator, self.c.caption_dropout, device), {}

    def validate(self, step: int, folder: Path) -> dict[str, float] | None:
        if len(self.val_rows) == 0:
            return None
        with evaluating(self.modules["unet"]) as unet:
            device = next(unet.parameters()).device
            loss = self._loss(unet, self.val_rows, torch.Generator().manual_seed(1234), 0.0, device).item()
        return {"loss": round(loss, 5)}

    def export(self, folder: Path) -> None:
        self.modules["unet"].save_pretrained(folder)


def train_unet(config: BaseTrainConfig) -> Path:
    """Stage 3 (builds the caches first); returns pipeline/unet (EMA weights)."""
    cache = build_caches(config)
    result = train_stage(UNetTask(config, cache), config, "unet")
    publish_unet(config, result)
    return config.out / "pipeline" / "unet"


def publish_unet(config: BaseTrainConfig, result: Path, paused_at: int | None = None) -> None:
    """pipeline/unet, the inference scheduler and the run's recipe (pipeline/training.json);
    ``paused_at``: the step of a paused stage's snapshot (``publish_paused_unet``)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from consistent_diffusion.core.outputs import write_json_atomic

    pipeline = config.out / "pipeline"
    atomic_save_pretrained(UNet2DConditionModel.from_pretrained(result), pipeline / "unet")
    atomic_save_pretrained(DDIMScheduler(**SCHEDULER_CONFIG), pipeline / "scheduler")
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    recipe["log_summary"] = summarise_log(config.out)
    if paused_at is not None:
        recipe["paused_at_step"] = paused_at
    write_json_atomic(recipe, pipeline / "training.json")


def publish_paused_unet(config: BaseTrainConfig) -> Path:
    """pipeline/ from a paused UNet stage's newest checkpoint, with its EMA weights (what the stage
    would ship if it ended now), so a run can be looked at, measured or exported between stages.
    The UNet's shape comes from the stage's own recorded options and the caches."""
    from consistent_diffusion.training.checkpoints import list_checkpoints, load_checkpoint

    folder = stage_dir(config.out, "unet")
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise ConsistentDiffusionError(f"{folder} has no UNet checkpoint to publish")
    state = load_checkpoint(checkpoints[-1][1])
    options = json.loads((folder / "train_config.json").read_text())["config"]["options"]
    shape = replace(config.unet, channels=tuple(options["channels"]), layers_per_block=options["layers_per_block"],
                    heads=options["heads"])
    return _publish_unet_weights(config, shape, state, f"the checkpoint in {folder}")


def publish_handoff_unet(config: BaseTrainConfig, handoff: Path) -> Path:
    """pipeline/ with a hand-off's EMA UNet (``write_unet_handoff``: a committed stage chosen to ship,
    not necessarily the run's last), the run's VAE and caches (built first when absent, so the
    VAE's scaling factor is the one the UNet was trained with). The UNet's shape is ``config.unet``'s
    (pass the stage's --unet-channels); a mismatch is an error naming the file."""
    from consistent_diffusion.training.checkpoints import load_handoff

    state = load_handoff(Path(handoff), stage_kind("unet"))
    build_caches(config)
    return _publish_unet_weights(config, config.unet, state,
                                 f"hand-off {handoff} (check --unet-channels and --unet-layers)")


def _publish_unet_weights(config: BaseTrainConfig, shape: UNetConfig, state: dict[str, Any], source: str) -> Path:
    """pipeline/ (``publish_unet`` + ``publish_vae``) with a UNet of ``shape`` holding the EMA weights
    of ``state`` (a checkpoint or hand-off: its raw weights when it has no EMA; any float dtype),
    saved as the UNet stage's snapshot of the state's step."""
    weights = (state.get("ema") or state["trainable"])["unet"]
    latents = torch.load(config.out / "cache" / "latents.pt", weights_only=False)["latents"]
    states = torch.load(config.out / "cache" / "text.pt", weights_only=False)["states"]
    unet = build_unet(shape, latents.shape[1], states.shape[-1], latents.shape[-1])
    if {k: tuple(w.shape) for k, w in weights.items()} != {k: tuple(p.shape) for k, p in unet.named_parameters()}:
        raise ConsistentDiffusionError(f"the UNet weights of {source} do not match the UNet options")
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    folder = stage_dir(config.out, "unet")
    with atomic_output_dir(folder / "snapshot", overwrite=True) as temp:
        unet.save_pretrained(temp)
    publish_unet(config, folder / "snapshot", paused_at=int(state["step"]))
    publish_vae(config)
    return config.out / "pipeline"
