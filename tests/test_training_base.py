"""Fast tests of the base-model recipe, the embedded loader and the probes on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.data.emoji import write_dataset
from consistent_diffusion.metrics.probes import ProbeTrainConfig, load_probe, predict, save_probe, train_probe
from consistent_diffusion.models.embedded import load_embedded_pipeline
from consistent_diffusion.training.recipes.embedded import (
    TrainingStopped,
    UNetConfig,
    VAEConfig,
    export_embedded,
    lr_at,
    preset,
    train_base,
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities x 2 styles of 64x64 blobs: 'google' ones are shaded, 'twitter' ones flat."""
    rng = np.random.default_rng(0)
    images, records = [], []
    yy, xx = np.mgrid[:64, :64]
    for style in ("google", "twitter"):
        for k in range(12):
            colour = rng.integers(0, 200, 3)
            disc = (yy - 32) ** 2 + (xx - 32) ** 2 < (10 + k) ** 2
            shade = (yy / 64.0)[..., None] * 80 if style == "google" else 0
            image = np.where(disc[..., None], np.clip(colour + shade, 0, 255), 255).astype(np.uint8)
            split = "holdout" if k == 11 else "val" if k == 10 else "train"
            category = ["Smileys & Emotion", "Objects"][k % 2]
            records.append({"style": style, "identity": f"id{k}", "name": f"thing {k}", "category": category,
                            "subcategory": "x", "caption": f"thing {k}, {style} style", "split": split})
            images.append(image)
    meta = {"image_size": 64, "styles": ["google", "twitter"], "categories": ["Objects", "Smileys & Emotion"],
            "sources": []}
    out = tmp_path_factory.mktemp("data") / "emoji"
    write_dataset(out, np.stack(images), records, meta, overwrite=False)
    return out


def tiny(data: Path, out: Path, **overrides):
    return preset("tiny", data, out, **overrides)


def test_full_recipe_exports_a_working_pipeline(tiny_data: Path, tmp_path: Path) -> None:
    pipeline = train_base(tiny(tiny_data, tmp_path / "run"))
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != pytest.approx(0.18215)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vae", "unet", "decoder"} and any("val" in r for r in log)
    dest = export_embedded(pipeline, tmp_path / "embedded")
    assert json.loads((dest / "training.json").read_text())["max_length"] == 8
    pipe = load_embedded_pipeline(folder=dest)
    assert pipe.tokenizer.model_max_length == 8
    images = pipe(["thing 1, google style"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_killed_run_resumes_exactly(tiny_data: Path, tmp_path: Path) -> None:
    train_base(tiny(tiny_data, tmp_path / "straight"))
    with pytest.raises(TrainingStopped):  # "killed" after 2 VAE steps
        train_base(tiny(tiny_data, tmp_path / "resumed", stop_after_steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        train_base(tiny(tiny_data, tmp_path / "resumed"))
    with pytest.raises(TrainingStopped):  # VAE 2 -> 4 (its end), then UNet 0 -> 2
        train_base(tiny(tiny_data, tmp_path / "resumed", resume=True, stop_after_steps=2))
    first = torch.load(tmp_path / "resumed" / "state" / "unet.pt", weights_only=False)
    assert first["loop"]["step"] == 2 and not first["loop"]["done"]
    train_base(tiny(tiny_data, tmp_path / "resumed", resume=True))
    for stage in ("vae", "unet"):
        resumed = torch.load(tmp_path / "resumed" / "state" / f"{stage}.pt", weights_only=False)
        straight = torch.load(tmp_path / "straight" / "state" / f"{stage}.pt", weights_only=False)
        assert resumed["loop"]["step"] == straight["loop"]["step"] == 4
        for key, value in straight["model"].items():
            torch.testing.assert_close(resumed["model"][key], value, rtol=1e-4, atol=1e-5)
    name = next(iter(first["model"]))
    assert not torch.equal(resumed["model"][name], first["model"][name])


def test_configs_validate() -> None:
    with pytest.raises(ConfigError):
        VAEConfig(channels=(32, 64))
    with pytest.raises(ConfigError):
        UNetConfig(channels=(30, 64))
    with pytest.raises(ConfigError):
        preset("huge", Path("d"), Path("o"))
    with pytest.raises(ConfigError):
        tiny(Path("d"), Path("o"), stage="both")
    assert lr_at(0, 0.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(100, 1.0, 1.0, warmup=10) == pytest.approx(0.1)


def test_missing_embedded_weights_say_how_to_train(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="train base"):
        load_embedded_pipeline(folder=tmp_path / "nothing")


def test_probe_trains_saves_and_loads(tiny_data: Path, tmp_path: Path) -> None:
    model, meta = train_probe(ProbeTrainConfig("style", epochs=2, batch=8, width=8, embed_dim=8), tiny_data,
                              progress=False)
    assert meta["labels"] == ["google", "twitter"] and 0.0 <= meta["val"]["accuracy"] <= 1.0
    save_probe(model, meta, tmp_path)
    loaded, loaded_meta = load_probe("style", tmp_path)
    probs = predict(loaded, torch.zeros(3, 3, 32, 32))
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3))
    with pytest.raises(ModelNotFoundError):
        load_probe("content", tmp_path)
