"""Single-file (original LDM layout) export: round trip through diffusers' own from_single_file, offline."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from consistent_diffusion.models.export import UnsupportedExportError, save_single_file
from consistent_diffusion.testing import tiny_sdxl_pipeline

SD_PARTS = ("unet", "vae", "text_encoder")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


def _assert_same_weights(original, loaded, parts):
    for part in parts:
        want, got = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert set(want) == set(got), part
        for key, tensor in want.items():
            assert not got[key].is_meta, f"{part}.{key} was not in the file"
            assert torch.equal(tensor, got[key]), f"{part}.{key} differs"


def _images(pipe, prompt="a red circle"):
    generator = torch.Generator("cpu").manual_seed(7)
    return pipe(
        prompt, num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt"
    ).images


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    from consistent_diffusion.testing import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("export-sd")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "folder")
    path = save_single_file(pipe, root / "tiny.safetensors")
    return pipe, root / "folder", path


def test_sd_file_has_the_original_layout(sd_export):
    _, _, path = sd_export
    state = load_file(path)
    assert all(key.startswith(PREFIXES) for key in state)
    # spot checks against the original SD 1.x names
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "model.diffusion_model.time_embed.0.weight" in state
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in state  # downsampler
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in state  # upsampler after attention
    assert "model.diffusion_model.out.2.weight" in state
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in state
    # the original decoder counts its levels from the bottom: diffusers up_blocks.0 is up.1 here
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in state
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    # VAE mid attention: 1x1 convs in the original, linears in diffusers
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert state[f"first_stage_model.{part}.mid.attn_1.{name}.weight"].ndim == 4
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["format"] == "pt"


def test_sd_round_trip_through_from_single_file_offline(sd_export):
    from diffusers import StableDiffusionPipeline

    pipe, folder, path = sd_export
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    _assert_same_weights(pipe, loaded, SD_PARTS)
    assert torch.equal(_images(pipe), _images(loaded))


def test_dtype_casts_floating_tensors(sd_export, tmp_path):
    pipe, _, _ = sd_export
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    state = load_file(path)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    assert pipe.unet.dtype == torch.float32  # the pipeline itself is untouched


def test_write_is_atomic(sd_export, tmp_path, monkeypatch):
    import safetensors.torch

    pipe, _, _ = sd_export
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(pipe, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]

    monkeypatch.undo()
    assert save_single_file(pipe, target) == target
    assert len(load_file(target)) > 100
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_sd2_open_clip_layout_round_trips(sd_export, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, folder, _ = sd_export
    path = save_single_file(pipe, tmp_path / "sd2.safetensors", text_layout="sd2")
    state = load_file(path)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert not any(key.startswith("cond_stage_model.transformer.") for key in state)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    _assert_same_weights(pipe, loaded, SD_PARTS)



def test_sdxl_round_trip_through_from_single_file_offline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "folder")
    path = save_single_file(pipe, tmp_path / "xl.safetensors")
    state = load_file(path)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in state
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in state
    assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 48)  # (width, projection)
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tmp_path / "folder"), local_files_only=True
    )
    loaded.set_progress_bar_config(disable=True)
    _assert_same_weights(pipe, loaded, (*SD_PARTS, "text_encoder_2"))
    assert torch.equal(_images(pipe), _images(loaded))


def test_unfused_lora_is_refused_with_a_fix(tmp_path):
    from peft import LoraConfig

    from consistent_diffusion.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(UnsupportedExportError, match="fuse_lora"):
        save_single_file(pipe, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
    assert issubclass(UnsupportedExportError, NotImplementedError)


def test_only_safetensors_is_written(sd_export, tmp_path):
    pipe, _, _ = sd_export
    with pytest.raises(UnsupportedExportError, match="safetensors"):
        save_single_file(pipe, tmp_path / "x.ckpt")


def test_export_command(sd_export, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from consistent_diffusion.cli.commands import export as command
    from consistent_diffusion.core.errors import ConfigError

    pipe, folder, _ = sd_export
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(["export", "--model", str(folder), "--out", str(out)])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    _assert_same_weights(pipe, loaded, SD_PARTS)

    again = parser.parse_args(["export", "--model", str(folder), "--out", str(out)])
    with pytest.raises(ConfigError, match="--overwrite"):
        again.func(again)
    bad = parser.parse_args(["export", "--model", str(folder), "--out", str(tmp_path / "x.ckpt")])
    with pytest.raises(ConfigError, match="safetensors"):
        bad.func(bad)
