"""`generate --ip-adapter ...`: the flags build the ip_adapter method in its stacking place, bad
combinations are one-line errors, and a tiny end-to-end run equals the library call and re-creates
from its manifest."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from _finetune_data import one_thread
from _ip_adapter_files import adapter_weights, save_noise_image, save_random_adapter
from consistent_diffusion.cli.main import main
from consistent_diffusion.cli.options.methods import add_method_arguments, methods_from_args
from consistent_diffusion.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # the fixture, imported


@pytest.fixture
def adapter(tmp_path, tiny_sd_folder):
    from consistent_diffusion.models.loading import load_pipeline

    return save_random_adapter(tmp_path / "ip", load_pipeline(str(tiny_sd_folder)).unet)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_method_arguments(parser)
    return parser.parse_args(argv)


def test_flags_build_the_method_after_style_aligned_before_lora(adapter, tmp_path):
    image = save_noise_image(tmp_path / "a.png", 0)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    args = _parse(["--style-aligned", "--ip-adapter", str(adapter), "--ip-image", image, "--ip-scale", "0.5",
                   "--ip-preset", "style", "--lora", str(lora)])
    methods = methods_from_args(args)
    assert [m.name for m in methods] == ["style_aligned", "ip_adapter", "lora"]
    ip = methods[1]
    assert ip.adapters == (str(adapter),) and ip.images == (image,)
    assert ip.scales == (0.5,) and ip.preset == "style" and not ip.per_row


def test_per_row_and_masks_reach_the_method(adapter, tmp_path):
    images = [save_noise_image(tmp_path / f"{i}.png", i) for i in range(2)]
    args = _parse(["--ip-adapter", str(adapter), "--ip-image", images[0], "--ip-image", images[1], "--ip-per-row"])
    (method,) = methods_from_args(args)
    assert method.per_row and method.images == tuple(images)
    args = _parse(["--ip-adapter", str(adapter), "--ip-image", images[0], "--ip-image", images[1],
                   "--ip-mask", images[0], "--ip-mask", images[1]])
    (method,) = methods_from_args(args)
    assert method.masks == tuple(images) and not method.per_row


@pytest.mark.parametrize("argv, message", [
    (["--ip-image", "x.png"], "--ip-image only apply with --ip-adapter"),
    (["--ip-preset", "style", "--ip-per-row"], "--ip-preset, --ip-per-row only apply with --ip-adapter"),
])
def test_options_without_an_adapter_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        methods_from_args(_parse(argv))


def test_adapter_without_image_is_refused(adapter):
    with pytest.raises(ConfigError, match="needs at least one --ip-image"):
        methods_from_args(_parse(["--ip-adapter", str(adapter)]))


def test_no_flags_no_method():
    assert methods_from_args(_parse([])) == []


def test_missing_encoder_is_a_one_line_cli_error(adapter, tiny_sd_folder, tmp_path, capsys):
    import shutil

    shutil.rmtree(adapter / "models" / "image_encoder")
    image = save_noise_image(tmp_path / "a.png", 0)
    code = main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a cat", "--seeds", "0", "--steps", "2",
                 "--height", "32", "--width", "32", "--ip-adapter", str(adapter), "--ip-image", image,
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "image_encoder" in err
    assert not (tmp_path / "o").exists()


def test_generate_equals_the_library_and_recreates_from_its_manifest(adapter, tiny_sd_folder, tmp_path):
    from consistent_diffusion.methods.ip_adapter import IPAdapter
    from consistent_diffusion.models.loading import load_pipeline
    from consistent_diffusion.series import SeriesConfig, generate_series

    image = save_noise_image(tmp_path / "a.png", 0)
    common = ["--model", str(tiny_sd_folder), "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0", "--steps", "2",
              "--height", "32", "--width", "32", "--guidance", "5", "--quiet"]
    ip = ["--ip-adapter", str(adapter), "--ip-image", image, "--ip-scale", "0.7"]
    assert main(["generate", *common, *ip, "--out", str(tmp_path / "cli")]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "plain")]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert [m["name"] for m in manifest["methods"]] == ["ip_adapter"]

    pipe = load_pipeline(str(tiny_sd_folder))
    config = SeriesConfig(prompts=("a cat", "a dog"), seeds=(0,), steps=2, height=32, width=32, guidance_scale=5.0)
    library = generate_series(pipe, config, [IPAdapter(adapters=(str(adapter),), images=(image,), scales=(0.7,))],
                              progress=False).images
    cli = sorted((tmp_path / "cli").glob("p*_s*.png"))
    plain = sorted((tmp_path / "plain").glob("p*_s*.png"))
    assert len(cli) == len(library) == 2
    for path, expected, other in zip(cli, library, plain, strict=True):
        ours = np.asarray(Image.open(path), dtype=np.int16)
        assert np.abs(ours - np.asarray(expected, dtype=np.int16)).max() <= 1
        assert np.abs(ours - np.asarray(Image.open(other), dtype=np.int16)).max() > 8  # the adapter acted

    assert main(["generate", "--from-manifest", str(tmp_path / "cli" / "manifest.json"),
                 "--out", str(tmp_path / "again"), "--quiet"]) == 0
    for first, again in zip(cli, sorted((tmp_path / "again").glob("p*_s*.png")), strict=True):
        assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_generate_stacks_the_adapter_after_a_style_reference_row(adapter, tiny_sd_folder, tmp_path):
    """--style-reference-prompt prepends a reference row; the CLI's order gives the adapter that row too."""
    image = save_noise_image(tmp_path / "a.png", 0)
    common = ["--model", str(tiny_sd_folder), "--prompt", "a cat", "--seeds", "0", "1", "--steps", "2",
              "--height", "32", "--width", "32", "--quiet", "--style-aligned", "--style-reference-prompt", "red"]
    assert main(["generate", *common, "--ip-adapter", str(adapter), "--ip-image", image, "--out", str(tmp_path / "b")]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "s")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [m["name"] for m in manifest["methods"]] == ["style_aligned", "ip_adapter"]
    both, style = sorted((tmp_path / "b").glob("p*_s*.png")), sorted((tmp_path / "s").glob("p*_s*.png"))
    assert len(both) == len(style) == 2
    diff = max(np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)).max()
               for a, b in zip(both, style, strict=True))
    assert diff > 8  # the adapter acted under StyleAligned


def test_the_weight_file_and_its_folder_give_the_same_images(adapter, tiny_sd_folder, tmp_path):
    image = save_noise_image(tmp_path / "a.png", 0)
    common = ["--model", str(tiny_sd_folder), "--prompt", "a cat", "--seeds", "0", "--steps", "2",
              "--height", "32", "--width", "32", "--quiet", "--ip-image", image]
    weights = adapter_weights(adapter)
    assert main(["generate", *common, "--ip-adapter", str(adapter), "--out", str(tmp_path / "folder")]) == 0
    assert main(["generate", *common, "--ip-adapter", str(weights), "--out", str(tmp_path / "file")]) == 0
    (a,), (b,) = sorted((tmp_path / "folder").glob("p*.png")), sorted((tmp_path / "file").glob("p*.png"))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
