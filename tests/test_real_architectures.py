"""scripts/real_architectures.py: the published architectures are written down right (parameter
counts of the published checkpoints, built on the meta device: no memory, no download), and the
SD 1.5 and SDXL training-free rows run (slow: full-size models at a small image size)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_architectures.py"
# Parameter counts of the published checkpoints (UNet, VAE, text encoder(s)), as diffusers /
# transformers count them when loading runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
# and stabilityai/stable-diffusion-xl-base-1.0.
PUBLISHED = {
    "sd15": (859_520_964, 83_653_863, (123_060_480,)),
    "sd21": (865_910_724, 83_653_863, (340_387_840,)),
    "sdxl": (2_567_463_684, 83_653_863, (123_060_480, 694_659_840)),
}


def _script():
    spec = importlib.util.spec_from_file_location("real_architectures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_have_the_published_parameter_counts(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = _script().ARCHITECTURES[name]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae)
        texts = [(CLIPTextModelWithProjection if index else CLIPTextModel)(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))
            for index, config in enumerate(arch.text_encoders)]
    assert (_count(unet), _count(vae), tuple(_count(t) for t in texts)) == PUBLISHED[name]
    assert arch.scheduler["prediction_type"] == ("v_prediction" if name == "sd21" else "epsilon")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_training_free_rows_run_on_the_real_architecture(name):
    module = _script()
    table, results = module.run_architecture(name, size=64, batches=(2,))
    failed = [(r["row"], r["error"]) for r in results if r["error"]]
    assert not failed, failed
    assert len(results) == 15 and "| plain | 2 | yes |" in table
    inversion = next(r for r in results if r["row"].startswith("DDPM inversion"))
    assert float(inversion["note"].rsplit(" ", 1)[-1]) < 1e-4  # the reconstruction is exact
