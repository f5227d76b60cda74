"""The embedded base model's own recipe: VAE, then cached latents/text states, then UNet, then
optionally a decoder-only fine-tune. Each training stage is a ``Task`` of ``training.loop``.

Layout is a standard diffusers Stable Diffusion one, so every method runs on it unchanged:

- ``AutoencoderKL`` with three blocks (factor 4): pixels (B, 3, 64, 64) in [-1, 1] ->
  latents (B, 4, 16, 16); ``scaling_factor`` = 1 / std of the training latents (posterior means).
- a frozen, pretrained text encoder: all-MiniLM-L6-v2 (``BertModel``), token states
  (B, max_length, 384) computed exactly as ``StableDiffusionPipeline.encode_prompt`` does
  (padding to max length, no attention mask), cached once.
- ``UNet2DConditionModel`` on (B, 4, 16, 16) with ``cross_attention_dim`` 384, v-prediction on
  the SD noise schedule (scaled_linear 0.00085-0.012, 1000 steps) rescaled to zero terminal SNR,
  sampled with trailing timestep spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed", sec. 3.1-3.3: otherwise 6.8% of the image survives at t = T and the
  starting noise, not the prompt, picks the colours), min-SNR-5 loss weights, EMA weights, caption
  dropout for classifier-free guidance. Sample with ``guidance_rescale`` about 0.7 (sec. 3.4).

Every stage is bounded by steps *and* wall time (``LoopConfig.max_minutes``), uses a warm-up then
cosine learning rate driven by the larger of the two shares, checkpoints atomically every few
minutes and on SIGTERM/SIGINT, and resumes exactly (batches and noise come from the loop's step
generator, one stream per stage). Run folder::

    config.<stage>.json   the options of each invocation
    state/<stage>/        the loop's run folder of each stage (vae, unet, decoder): train_config.json,
                          log.jsonl, checkpoints/, and the stage's result (vae/ or unet/)
    cache/                latents.pt and text.pt (stage 2)
    pipeline/             the assembled diffusers folders vae/ (decoder fine-tune if run, with the
                          scaling factor), unet/ (EMA), scheduler/ and training.json

``export_embedded`` copies ``pipeline/`` into the package (fp16 where harmless). The VAE and decoder
stages call the VAE's encode/decode directly, so they run in one process (CPU or one GPU).

Modules: ``config`` (options and presets), ``stages`` (what the stages share), ``vae`` (stages 1, 2
and 4), ``unet`` (stage 3); this one runs them and exports the result. Every public name is
importable from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from consistent_diffusion.training.recipes.embedded.config import (
    DECODER_WARMUP,
    SCHEDULER_CONFIG,
    STAGES,
    VAE_WARMUP,
    BaseTrainConfig,
    UNetConfig,
    VAEConfig,
    preset,
)
from consistent_diffusion.training.recipes.embedded.stages import (
    StageConfig,
    TrainingStopped,
    atomic_save_pretrained,
    build_scheduler,
    build_unet,
    build_vae,
    encode_texts,
    load_train_val,
    stage_config,
    stage_dir,
    stage_kind,
    summarise_log,
    train_stage,
    write_unet_handoff,
)
from consistent_diffusion.training.recipes.embedded.unet import (
    UNetTask,
    drop_captions,
    publish_handoff_unet,
    publish_paused_unet,
    publish_unet,
    train_unet,
)
from consistent_diffusion.training.recipes.embedded.vae import (
    DecoderTask,
    VAETask,
    build_caches,
    publish_vae,
    random_crop,
    train_decoder,
    train_vae,
    vae_loss,
    vae_psnr,
    vae_result,
)

__all__ = ["BaseTrainConfig", "DECODER_WARMUP", "DecoderTask", "SCHEDULER_CONFIG", "STAGES", "StageConfig", "TrainingStopped", "UNetConfig", "UNetTask", "VAEConfig", "VAETask", "VAE_WARMUP", "atomic_save_pretrained", "build_caches", "build_scheduler", "build_unet", "build_vae", "drop_captions", "encode_texts", "export_embedded", "load_train_val", "preset", "publish_handoff_unet", "publish_paused_unet", "publish_unet", "publish_vae", "random_crop", "run_recipe", "stage_config", "stage_dir", "stage_kind", "summarise_log", "train_base", "train_decoder", "train_stage", "train_unet", "train_vae", "vae_loss", "vae_psnr", "vae_result", "write_unet_handoff"]


# ----------------------------------------------------------------------------- entry points


def train_base(config: BaseTrainConfig) -> Path:
    """Run the chosen stage(s); returns the run's pipeline/ folder."""
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / f"config.{config.stage}.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    if config.stage == "vae" or (config.stage == "all" and config.pretrained_vae is None):
        train_vae(config)
    if config.stage in ("unet", "all"):
        vae_result(config)
        train_unet(config)
    if config.stage == "decoder" or (config.stage == "all" and config.vae.decoder_minutes > 0):
        train_decoder(config)
    return config.out / "pipeline"


def export_embedded(pipeline_dir: Path, dest: Path, fp16: bool = True) -> Path:
    """Copy vae/, unet/, scheduler/ (safetensors; fp16 when asked) and training.json into ``dest``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    dest.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    atomic_save_pretrained(vae.to(dtype), dest / "vae", safe_serialization=True)
    atomic_save_pretrained(unet.to(dtype), dest / "unet", safe_serialization=True)
    atomic_save_pretrained(DDIMScheduler.from_pretrained(pipeline_dir / "scheduler"), dest / "scheduler")
    for name in ("vae", "unet"):  # diffusers records where a model was loaded from: no machine paths
        config_path = dest / name / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("_name_or_path", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (dest / "training.json").write_text(json.dumps(run_recipe(pipeline_dir), indent=1))
    return dest


def run_recipe(pipeline_dir: Path) -> dict:
    """The recipe as run: pipeline/training.json, each stage's config.<stage>.json and the log summary."""
    path = pipeline_dir / "training.json"
    recipe = json.loads(path.read_text()) if path.is_file() else {}
    run = pipeline_dir.parent
    for stage_file in sorted(run.glob("config.*.json")):
        recipe.setdefault("stages", {})[stage_file.name.split(".")[1]] = json.loads(stage_file.read_text())
    recipe["log_summary"] = summarise_log(run)
    return _without_local_paths(recipe)


PATH_FIELDS = ("data", "out", "text_encoder_path", "warm_start", "pretrained_vae")


def _without_local_paths(value):
    """Keep only the last component of path-valued fields (data, out, text_encoder_path, warm_start,
    pretrained_vae): no machine paths."""
    if isinstance(value, dict):
        return {k: (Path(v).name if k in PATH_FIELDS and isinstance(v, str)
                    else _without_local_paths(v)) for k, v in value.items()}
    return value
