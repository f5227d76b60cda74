"""Fast tests of the base-model recipe, the embedded loader and the probes on a tiny synthetic dataset."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.data.emoji import write_dataset
from consistent_diffusion.metrics.extractors.probes import load_probe, predict
from consistent_diffusion.models.embedded import load_embedded_pipeline
from consistent_diffusion.training.checkpoints import list_checkpoints, load_checkpoint
from consistent_diffusion.training.loop import lr_factor
from consistent_diffusion.training.recipes.embedded import (
    TrainingStopped,
    UNetConfig,
    VAEConfig,
    export_embedded,
    preset,
    run_recipe,
    stage_dir,
    train_base,
)
from consistent_diffusion.training.recipes.probes import ProbeTrainConfig, save_probe, train_probe


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


def stage_log(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (stage_dir(out, stage) / "log.jsonl").read_text().splitlines()]


def last_state(out: Path, stage: str) -> dict:
    """The newest checkpoint of one stage: step, trainable weights, optimizer, EMA (UNet)."""
    return load_checkpoint(list_checkpoints(stage_dir(out, stage))[-1][1])


def test_full_recipe_exports_a_working_pipeline(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    collections = []  # a full gc.collect per stage (Accelerator.free_memory) cost ~0.25 s each and freed nothing
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or 0)
    pipeline = train_base(tiny(tiny_data, tmp_path / "run"))
    monkeypatch.undo()
    assert not collections
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != pytest.approx(0.18215)
    logs = {stage: stage_log(tmp_path / "run", stage) for stage in ("vae", "unet", "decoder")}
    assert all(logs.values()) and all(any("val" in r for r in log) for log in logs.values())
    summary = json.loads((pipeline / "training.json").read_text())["log_summary"]
    assert summary["vae"]["steps"] == 4 and summary["unet"]["steps"] == 4 and "psnr_db" in summary["vae"]["val"]
    train_base(tiny(tiny_data, tmp_path / "run", resume=True))  # a finished run resumed: nothing is undone
    assert json.loads((pipeline / "vae" / "config.json").read_text())["scaling_factor"] == vae_config["scaling_factor"]
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
    first = last_state(tmp_path / "resumed", "unet")
    assert first["step"] == 2 and not (stage_dir(tmp_path / "resumed", "unet") / "unet").exists()  # not done
    train_base(tiny(tiny_data, tmp_path / "resumed", resume=True))
    for stage in ("vae", "unet", "decoder"):
        resumed, straight = last_state(tmp_path / "resumed", stage), last_state(tmp_path / "straight", stage)
        assert resumed["step"] == straight["step"] == (2 if stage == "decoder" else 4)
        for part in ("trainable", "ema") if stage == "unet" else ("trainable",):
            for module, weights in straight[part].items():
                for key, value in weights.items():
                    torch.testing.assert_close(resumed[part][module][key], value, rtol=1e-4, atol=1e-5)
    name = next(iter(first["trainable"]["unet"]))
    final = last_state(tmp_path / "resumed", "unet")["trainable"]["unet"]
    assert not torch.equal(final[name], first["trainable"]["unet"][name])


def test_a_unet_stage_moves_to_another_machine_through_a_handoff(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """Session 1 trains the VAE and pauses the UNet, writing a hand-off; session 2, with only the committed
    VAE folder and hand-off (no checkpoints), continues the step count and finishes."""
    from consistent_diffusion.cli.main import main

    first, second = tmp_path / "machine-1", tmp_path / "machine-2"
    base = ["train", "base", "--data", str(tiny_data), "--preset", "tiny"]
    assert main([*base, "--out", str(first), "--stage", "vae"]) == 0
    handoff = tmp_path / "commit" / "unet.handoff.pt"
    snapshot = tmp_path / "snapshot"
    code = main([*base, "--out", str(first), "--stage", "unet", "--pause-after-minutes", "1e-9", "--handoff", str(handoff),
                 "--export", str(snapshot)])
    assert code == 3 and "paused" in capsys.readouterr().out  # a planned pause: status 3, checkpoint and hand-off
    assert torch.load(handoff, weights_only=True)["step"] == 1
    # --export on a pause: the EMA weights so far, a loadable model that says which step it is
    assert json.loads((snapshot / "training.json").read_text())["paused_at_step"] == 1
    ema = torch.load(handoff, weights_only=True)["ema"]["unet"]
    paused = load_embedded_pipeline(folder=snapshot)
    name = next(iter(ema))
    torch.testing.assert_close(dict(paused.unet.named_parameters())[name].detach().float(), ema[name].float(), atol=0, rtol=0)
    assert paused(["thing 1"], num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    committed_vae = tmp_path / "commit" / "vae"
    shutil.copytree(stage_dir(first, "vae") / "vae", committed_vae)
    assert main([*base, "--out", str(second), "--stage", "unet", "--vae-from", str(committed_vae),
                 "--warm-start", str(handoff)]) == 0
    assert not (stage_dir(second, "vae")).exists()  # the VAE was not trained again
    log = stage_log(second, "unet")
    assert [r["step"] for r in log if "loss" in r][0] == 2  # continued after the hand-off's step 1
    recipe = json.loads((second / "pipeline" / "training.json").read_text())
    assert recipe["warm_start"] == str(handoff) and (second / "pipeline" / "unet" / "config.json").is_file()
    exported = run_recipe(second / "pipeline")
    assert exported["stages"]["unet"]["warm_start"] == "unet.handoff.pt" and exported["stages"]["unet"]["pretrained_vae"] == "vae"
    with pytest.raises(ConfigError, match="vae-from"):
        tiny(tiny_data, tmp_path / "x", stage="vae", pretrained_vae=committed_vae)
    # ship a committed stage that is not the run's last: a fresh folder, only the VAE and the hand-off
    shipped, third = tmp_path / "shipped", tmp_path / "machine-3"
    export = [*base, "--out", str(third), "--vae-from", str(committed_vae), "--export-handoff", str(handoff)]
    capsys.readouterr()
    assert main(export) != 0 and "give --export DIR" in capsys.readouterr().err
    assert main([*export, "--export", str(shipped)]) == 0
    assert not list_checkpoints(stage_dir(third, "unet"))  # nothing trained
    assert json.loads((shipped / "training.json").read_text())["paused_at_step"] == 1
    unet = dict(load_embedded_pipeline(folder=shipped).unet.named_parameters())
    torch.testing.assert_close(unet[name].detach().float(), ema[name].float(), atol=0, rtol=0)
    assert main([*export, "--export", str(tmp_path / "other"), "--unet-channels", "32,32"]) != 0
    assert "do not match the UNet options" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_configs_validate() -> None:
    with pytest.raises(ConfigError):
        VAEConfig(channels=(32, 64))
    with pytest.raises(ConfigError):
        UNetConfig(channels=(30, 64))
    with pytest.raises(ConfigError):
        preset("huge", Path("d"), Path("o"))
    with pytest.raises(ConfigError):
        tiny(Path("d"), Path("o"), stage="both")
    assert lr_factor("cosine", 0, 0.0, warmup=10) == pytest.approx(0.1)  # warm-up: 1/10 of the peak
    assert lr_factor("cosine", 100, 1.0, warmup=10) == pytest.approx(0.1)  # end of the cosine: 10% of the peak
    assert lr_factor("cosine", 100, 0.5, warmup=10) == pytest.approx(0.55)  # half way: 0.1 + 0.45
    assert lr_factor("constant", 4, 0.9, warmup=10) == pytest.approx(0.5)


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


def test_a_held_out_style_is_never_a_probe_class(tiny_data: Path, tmp_path: Path) -> None:
    from consistent_diffusion.data.emoji import load_emoji_dataset

    dataset = load_emoji_dataset(tiny_data)
    line = [dict(r, style="line", caption=f"{r['name']}, line style", style_split="heldout") for r in dataset.records[:12]]
    meta = dict(dataset.meta, styles=["google", "line", "twitter"], heldout_styles=["line"])
    data = tmp_path / "with-line"
    write_dataset(data, np.concatenate([dataset.images, 255 - dataset.images[:12]]), dataset.records + line, meta,
                  overwrite=False)
    _, style_meta = train_probe(ProbeTrainConfig("style", epochs=1, batch=8, width=8, embed_dim=8), data, progress=False)
    assert style_meta["labels"] == ["google", "twitter"] and style_meta["val"]["images"] == 2  # val: 1 identity x 2 trained styles


def test_frechet_distance_by_hand() -> None:
    from consistent_diffusion.metrics.frechet import frechet_distance

    a, b = torch.tensor([[0.0], [2.0]]), torch.tensor([[3.0], [7.0]])  # means 1, 5; variances 2, 8 (unbiased)
    assert frechet_distance(a, b) == pytest.approx(16 + 2 + 8 - 2 * (2 * 8) ** 0.5)  # (mu_a - mu_b)^2 + ...
    two_d_a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])  # diagonal covariance (4/3, 16/3)
    two_d_b = two_d_a * torch.tensor([2.0, 1.0]) + 1.0  # means (1, 2) -> (3, 3); x-variance x4
    mean_gap = (3.0 - 1.0) ** 2 + (3.0 - 2.0) ** 2
    trace_term = (4 / 3 + 16 / 3) + (16 / 3 + 16 / 3) - 2 * ((4 / 3 * 16 / 3) ** 0.5 + 16 / 3)
    assert frechet_distance(two_d_a, two_d_b) == pytest.approx(mean_gap + trace_term, rel=1e-9)
    assert frechet_distance(two_d_a, two_d_a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError):
        frechet_distance(a, two_d_a)
