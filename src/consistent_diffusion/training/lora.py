"""LoRA DreamBooth: DreamBooth with low-rank adapters (Hu et al., 2021) on the UNet's attention.

Each targeted linear layer W (default: attention projections to_q, to_k, to_v, to_out.0) gains
W + (alpha / rank) * B A with A (rank x in) and B (out x rank), B initialised to zero so training
starts exactly at the base model; only A and B are trained (PEFT ``LoraConfig`` through diffusers'
``unet.add_adapter``).

The result ``out/lora/pytorch_lora_weights.safetensors`` is written by diffusers'
``save_lora_weights`` in diffusers' format with the adapter config (rank, alpha, targets) as
safetensors metadata, so stock diffusers loads it with ``pipe.load_lora_weights(out / "lora")``
and our ``methods.lora`` stacks it with others. ``export_kohya`` writes the same adapter in the
kohya/A1111 format other tools (AUTOMATIC1111, ComfyUI) read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
from consistent_diffusion.training.loop import TrainResult, check_out_folder, run_training

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"


@dataclass(kw_only=True)
class LoraDreamBoothConfig(DreamBoothConfig):
    """A LoRA DreamBooth run; the adapter lands in ``out/lora``."""

    rank: int = 4  # inner dimension of each adapter
    alpha: float | None = None  # scale numerator (effective scale alpha / rank); None = rank (scale 1)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # module names (suffixes) in the UNet to adapt
    lora_dropout: float = 0.0
    learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0):
            raise ConfigError(f"alpha must be a number > 0 (or unset = rank), got {self.alpha!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"target_modules must name at least one module, got {self.target_modules!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.train_text_encoder:
            raise ConfigError("LoRA DreamBooth adapts the UNet only; drop --train-text-encoder "
                              "(or use full DreamBooth to fine-tune the text encoder)")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def add_lora(unet: Any, rank: int, alpha: float, targets: tuple[str, ...], dropout: float = 0.0) -> None:
    """Add one trainable adapter (name ``default``) to ``unet``; its base weights stay frozen."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()} | {name for name, _ in unet.named_modules()}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in present)]
    if missing:
        raise ConfigError(f"target modules {missing} are not in this UNet; attention projections are "
                          f"{', '.join(DEFAULT_TARGETS)}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                        lora_dropout=dropout)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' format (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))


def save_lora(pipe: Any, folder: str | os.PathLike) -> Path:
    """Write the UNet adapter with diffusers' own ``save_lora_weights`` (+ its config as metadata)."""
    folder = Path(folder)
    metadata = pipe.unet.peft_config[ADAPTER_NAME].to_dict()
    type(pipe).save_lora_weights(
        folder,
        unet_lora_layers=lora_state_dict(pipe.unet),
        unet_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return folder / LORA_WEIGHT_NAME


class LoraDreamBoothTask(DreamBoothTask):
    result_name = "lora"

    def setup_trainable(self) -> None:
        config: LoraDreamBoothConfig = self.config  # type: ignore[assignment]
        if self.config.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        with torch.random.fork_rng(devices=[]):  # the adapters' random init follows the run's seed
            torch.manual_seed(config.seed)
            add_lora(self.pipe.unet, config.rank, config.lora_alpha, config.target_modules, config.lora_dropout)
        self.modules["unet"] = self.pipe.unet

    def export(self, folder: Path) -> None:
        save_lora(self.pipe, folder)
        (folder / "README.md").write_text(
            "# LoRA adapter (consistent-diffusion)\n\n"
            f"Instance prompt: `{self.config.instance_prompt}`\n\n"
            "```python\npipe.load_lora_weights(\"<this folder>\")\n```\n\n"
            "or `consistent-diffusion generate --lora <this folder>[:scale]` where the CLI offers it; "
            "`training.json` records the base model and options.\n",
            encoding="utf-8",
        )


def train_lora(config: LoraDreamBoothConfig, pipe: Any, on_step_end: Any = None) -> TrainResult:
    """Run LoRA DreamBooth on ``pipe`` (an adapter named ``default`` is added to its UNet and stays
    attached afterwards); the adapter is written to ``out/lora``."""
    check_out_folder(config)
    return run_training(LoraDreamBoothTask(pipe, config), config, "lora", on_step_end=on_step_end)


# ----------------------------------------------------------------------------- interop


def lora_file(path: str | os.PathLike) -> Path:
    """The weights file of a LoRA given as a file or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        candidate = path / LORA_WEIGHT_NAME
        if candidate.is_file():
            return candidate
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise ConsistentDiffusionError(f"{path} holds no single LoRA .safetensors file ({len(files)} found)")
    if not path.is_file():
        raise ConsistentDiffusionError(f"LoRA not found: {path}")
    return path


def export_kohya(lora: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Rewrite one of our (diffusers-format) LoRAs in the kohya/A1111 format
    (``lora_unet_..._to_q.lora_down.weight`` / ``lora_up`` / ``alpha``) for other tools."""
    import json

    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = lora_file(lora)
    with safe_open(str(source), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iteration
        metadata = handle.metadata() or {}
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if len(unet_state) != len(state):
        raise ConsistentDiffusionError("export_kohya handles UNet-only LoRAs (ours); this one has other parts")
    peft_state = convert_unet_state_dict_to_peft(unet_state)
    # diffusers stores the adapter config as JSON under "lora_adapter_metadata", keys prefixed "unet."
    config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    alpha = config.get("unet.lora_alpha", config.get("lora_alpha"))
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    for key in list(kohya):
        if key.endswith(".alpha"):
            rank = int(kohya[key])
            kohya[key] = torch.tensor(float(alpha if alpha is not None else rank))
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out_file), metadata={"format": "pt"})
    return out_file
