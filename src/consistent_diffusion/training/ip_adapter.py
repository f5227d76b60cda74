"""Train an IP-Adapter (Ye et al. 2023) for the embedded model on paired emoji: one recipe, two adapters.

``pairing`` picks the data (``ip_adapter_data``): ``style`` pairs teach the adapter to carry only the
prompt image's style, ``subject`` pairs only its subject. Everything else is IP-Adapter's recipe:

- the adapter is the released layout (``methods.ip_adapter.embedded``), built by diffusers' own
  ``unet._load_ip_adapter_weights`` on the frozen UNet: decoupled cross-attention
  ``Z = Attn(Q, K_t, V_t) + Attn(Q, W'_k c, W'_v c)`` (paper eq. 5), ``c`` the 4 tokens the
  projection makes from the frozen encoder's pooled features; ``W'_k``, ``W'_v`` start as copies of
  the text ``W_k``, ``W_v``; only the projection and ``W'_k``, ``W'_v`` train;
- UNet, VAE and text encoder frozen; the loss is the base model's (``training.diffusion``: v-MSE
  with min-SNR-5 weights, ``recipes.embedded.UNetConfig``);
- IP-Adapter's dropout for classifier-free guidance: per example one uniform draw u: u < p drops
  the image (zero embedding, what the pipeline gives as the unconditional one), p <= u < 2p drops
  the caption (empty prompt), 2p <= u < 3p drops both (the paper: 0.05 each).

The run goes through ``training.loop`` (checkpoints, SIGTERM pause, ``write_handoff`` /
``warm_start`` between machines, ``log.jsonl``); ``out/ip_adapter`` is the exported adapter folder.
Validation: the same loss on fixed val-identity pairs (fixed noise and timesteps) with the prompt
image and with it zeroed; ``val_gain`` (no image minus with image) is what the image contributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.ip_adapter.embedded import (
    PAIRINGS,
    image_encoder,
    initial_state_dict,
    loaded_parts,
    save_adapter,
    state_dict_of,
)
from consistent_diffusion.training.diffusion import (
    encode_text,
    min_snr_mse,
    noise_and_target,
    training_scheduler,
)
from consistent_diffusion.training.ip_adapter_data import (
    PairPools,
    fixed_pairs,
    load_or_build_cache,
    pair_pools,
)
from consistent_diffusion.training.loop import Task, TrainResult, check_out_folder, run_training
from consistent_diffusion.training.loop_config import LoopConfig

RESULT = "ip_adapter"
CACHE_FILE = "cache.pt"


@dataclass(kw_only=True)
class IPAdapterTrainConfig(LoopConfig):
    """One adapter's run; the adapter lands in ``out/ip_adapter``."""

    data: Path  # emoji dataset folder (consistent-diffusion data emoji)
    pairing: str = "style"  # style | subject (see ip_adapter_data)
    cache: Path | None = None  # latents + encoder features file (default out/cache.pt); share it between adapters
    dropout: float = 0.05  # p of each of: image dropped, caption dropped, both dropped
    min_snr_gamma: float = 5.0  # as the base model's UNet stage
    validation_pairs: int = 64  # fixed val-identity pairs measured at each checkpoint
    init_seed: int = 0  # seeds the projection's initialisation
    batch_size: int = 32
    learning_rate: float = 1e-4
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = Path(self.data)
        if self.cache is not None:
            self.cache = Path(self.cache)
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown pairing {self.pairing!r}; choose {' or '.join(PAIRINGS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout <= 1 / 3:
            raise ConfigError(f"dropout must be in [0, 1/3] (three cases of p each), got {self.dropout!r}")
        if isinstance(self.validation_pairs, bool) or not isinstance(self.validation_pairs, int) or self.validation_pairs < 0:
            raise ConfigError(f"validation_pairs must be an integer >= 0, got {self.validation_pairs!r}")

    @property
    def cache_path(self) -> Path:
        return self.cache if self.cache is not None else self.out / CACHE_FILE


class AdapterModules(torch.nn.Module):
    """The trainable parts diffusers built in the UNet: the image projection and the IP processors
    (their ``to_k_ip`` / ``to_v_ip``), registered here so the loop sees their parameters."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        projection, processors = loaded_parts(unet)
        self.image_proj = projection
        self.layers = torch.nn.ModuleList(processors)


def dropout_masks(count: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop image (count,), drop caption (count,)) from one uniform draw per example: [0, p) image,
    [p, 2p) caption, [2p, 3p) both (IP-Adapter's training script)."""
    u = torch.rand(count, generator=generator)
    return (u < p) | ((u >= 2 * p) & (u < 3 * p)), (u >= p) & (u < 3 * p)


class IPAdapterTask(Task):
    result_name = RESULT
    seed_stream = 7

    def __init__(self, pipe: Any, config: IPAdapterTrainConfig, encoder_factory: Any = image_encoder) -> None:
        from consistent_diffusion.data.emoji import load_emoji_dataset

        super().__init__()
        self.pipe, self.config = pipe, config
        if not hasattr(pipe.unet, "_load_ip_adapter_weights"):
            raise ConfigError(f"{type(pipe.unet).__name__} does not take IP-Adapters")
        self.noise_scheduler = training_scheduler(pipe)
        for name in ("vae", "text_encoder", "unet"):
            getattr(pipe, name).requires_grad_(False)
        dataset = load_emoji_dataset(config.data)
        config.out.mkdir(parents=True, exist_ok=True)
        cache = load_or_build_cache(config.cache_path, pipe, config.data, dataset, encoder_factory)
        self.position = {int(row): k for k, row in enumerate(cache["rows"].tolist())}
        self.mean, self.std, self.scaling = cache["mean"], cache["std"], float(cache["scaling_factor"])
        self.features = cache["features"].float()
        self.pools = pair_pools(dataset.records, config.pairing, "train")
        self.val_pools: PairPools | None = None
        if config.validation_pairs:
            self.val_pools = pair_pools(dataset.records, config.pairing, "val")
            self.val = fixed_pairs(self.val_pools, config.validation_pairs, config.seed + 1)
        captions = sorted(set(self.pools.captions) | set(self.val[2] if config.validation_pairs else ()) | {""})
        self.caption_index = {c: k for k, c in enumerate(captions)}
        self.text = torch.cat([encode_text(pipe, captions[s : s + 256])[0].detach().cpu()
                               for s in range(0, len(captions), 256)])
        pipe.unet._load_ip_adapter_weights([initial_state_dict(pipe.unet, self.features.shape[1], config.init_seed)])
        self.adapter = AdapterModules(pipe.unet).float()
        self.adapter.requires_grad_(True)
        self.adapter.train()
        self.modules["adapter"] = self.adapter

    def prepare(self, accelerator: Any, device: torch.device) -> None:
        self.pipe.to(device)

    def _latents(self, rows: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        index = torch.tensor([self.position[int(r)] for r in rows])
        noise = torch.randn(self.mean[index].shape, generator=generator)
        return (self.mean[index] + self.std[index] * noise) * self.scaling

    def _features(self, rows: np.ndarray) -> torch.Tensor:
        return self.features[torch.tensor([self.position[int(r)] for r in rows])]

    def _prediction_loss(self, latents: torch.Tensor, features: torch.Tensor, captions: list[str],
                         generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The base model's loss on ``latents`` (B, 4, h, w) with image embeddings ``features``
        (B, D) and ``captions``; noise and timesteps drawn from ``generator``."""
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, latents, generator)
        text = self.text[torch.tensor([self.caption_index[c] for c in captions])].to(device)
        prediction = self.pipe.unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=text,
                                    added_cond_kwargs={"image_embeds": [features[:, None, :].to(device)]},
                                    return_dict=False)[0]
        return min_snr_mse(prediction, target.to(device), self.noise_scheduler, timesteps, self.config.min_snr_gamma)

    def loss(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        targets, partners, captions = self.pools.sample(self.config.batch_size, generator)
        drop_image, drop_caption = dropout_masks(len(targets), self.config.dropout, generator)
        latents = self._latents(targets, generator)
        features = torch.where(drop_image[:, None], 0.0, self._features(partners))
        captions = ["" if dropped else caption for dropped, caption in zip(drop_caption.tolist(), captions, strict=True)]
        loss = self._prediction_loss(latents, features, captions, generator, device)
        return loss, {"dropped_images": float(drop_image.float().mean())}

    def validate(self, step: int, folder: Path) -> dict[str, float] | None:
        """Loss on the fixed val pairs with the prompt image and with it zeroed (same noise)."""
        if not self.config.validation_pairs:
            return None
        targets, partners, captions = self.val
        device = next(self.adapter.parameters()).device
        self.adapter.eval()
        try:
            values = {}
            for name, features in (("val_loss", self._features(partners)),
                                   ("val_loss_no_image", torch.zeros_like(self._features(partners)))):
                generator = torch.Generator().manual_seed(self.config.seed + 2)
                latents = self._latents(targets, generator)
                values[name] = float(self._prediction_loss(latents, features, captions, generator, device))
        finally:
            self.adapter.train()
        values["val_gain"] = values["val_loss_no_image"] - values["val_loss"]
        return values

    def export(self, folder: Path) -> None:
        from consistent_diffusion.models.loading import model_identity

        save_adapter(folder, state_dict_of(self.pipe.unet), self.meta(model_identity(self.pipe).to_dict()))

    def meta(self, base_model: dict[str, Any]) -> dict[str, Any]:
        return {"pairing": self.config.pairing, "base_model": base_model,
                "cross_attention_dim": int(self.pipe.unet.config.cross_attention_dim),
                "training_targets": int(len(self.pools.targets))}

    def identity(self) -> dict[str, Any]:
        from consistent_diffusion.models.loading import model_identity

        return {**model_identity(self.pipe).to_dict(), "pairing": self.config.pairing,
                "training_targets": int(len(self.pools.targets))}


def train_ip_adapter(config: IPAdapterTrainConfig, pipe: Any, on_step_end: Any = None,
                     encoder_factory: Any = image_encoder) -> TrainResult:
    """Train one adapter for ``pipe`` (frozen; its UNet keeps the adapter's processors afterwards,
    so give a pipeline of its own); the result is ``out/ip_adapter``."""
    check_out_folder(config)
    task = IPAdapterTask(pipe, config, encoder_factory)
    return run_training(task, config, "ip_adapter", on_step_end=on_step_end)


# ----------------------------------------------------------------------------- stages and shipping


def released_from_trainable(trainable: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``AdapterModules`` parameters (a checkpoint's or hand-off's ``trainable["adapter"]``) -> the
    released layout: ``image_proj.image_embeds.*`` -> ``proj.*``, ``layers.i.to_k_ip.0.weight`` ->
    ``{2i + 1}.to_k_ip.weight``."""
    image_proj, layers = {}, {}
    for key, value in trainable.items():
        part, _, rest = key.partition(".")
        if part == "image_proj":
            image_proj[rest.replace("image_embeds", "proj")] = value.float()
        elif part == "layers":
            index, _, name = rest.partition(".")
            layers[f"{2 * int(index) + 1}.{name.replace('_ip.0.', '_ip.')}"] = value.float()
        else:
            raise ConfigError(f"unexpected IP-Adapter parameter {key!r} in a training state")
    return {"image_proj": image_proj, "ip_adapter": layers}


def export_state(path: Path, dest: Path, meta: dict[str, Any], dtype: torch.dtype = torch.float16) -> Path:
    """An adapter folder (``save_adapter``) from a checkpoint or ``write_handoff`` file of a
    ``train ip-adapter`` run (its EMA weights when it kept them, else its weights), written atomically."""
    from consistent_diffusion.core.outputs import atomic_output_dir

    state = torch.load(path, map_location="cpu", weights_only=path.name.endswith(".handoff.pt"))
    if state.get("kind") != "ip_adapter":
        raise ConfigError(f"{path} is not from a `train ip-adapter` run (kind {state.get('kind')!r})")
    weights = (state.get("ema") or state["trainable"])["adapter"]
    with atomic_output_dir(dest, overwrite=True) as temp:
        save_adapter(temp, released_from_trainable(weights), {**meta, "steps_done": int(state["step"])}, dtype=dtype)
    return Path(dest)
