"""Images that carry their recipe: A1111 parameters other tools read, ours that re-creates the pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from consistent_diffusion.cli.main import main
from consistent_diffusion.core import recipe
from consistent_diffusion.core.errors import ConfigError

# A1111's own infotext, written by its create_infotext (values with ',' or ':' JSON-quoted)
A1111_SAMPLE = (
    "masterpiece, a red fox in snow\n"
    "Negative prompt: blurry, lowres\n"
    'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, '
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "fox: 1a2b3c4d5e6f", Version: v1.10.1'
)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_a1111_infotext_parses_with_quotes_negative_prompt_and_size():
    parsed = recipe.parse_parameters(A1111_SAMPLE)
    assert parsed["Prompt"] == "masterpiece, a red fox in snow"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Seed"] == "1234" and parsed["CFG scale"] == "7"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert parsed["Lora hashes"] == "fox: 1a2b3c4d5e6f"


def test_our_infotext_round_trips_through_the_a1111_parser():
    fields = {"Steps": 30, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 3, "Size": "64x64", "Model hash": None,
              "Methods": "style_aligned, lora", "Note": 'a "quoted": value'}
    text = recipe.format_parameters("grinning face, twitter style", "", fields)
    assert "Negative prompt" not in text and "Model hash" not in text  # empty and None are left out
    parsed = recipe.parse_parameters(text)
    assert parsed["Prompt"] == "grinning face, twitter style"
    assert parsed["Methods"] == "style_aligned, lora" and parsed["Note"] == 'a "quoted": value'
    assert parsed["Steps"] == "30" and parsed["CFG scale"] == "7.5"
    with_negative = recipe.parse_parameters(recipe.format_parameters("cat", "dog\nbird", fields))
    assert with_negative["Prompt"] == "cat" and with_negative["Negative prompt"] == "dog\nbird"


def test_a_prompt_only_text_is_all_prompt():
    assert recipe.parse_parameters("just a prompt: with a colon")["Prompt"] == "just a prompt: with a colon"


def _generate(folder, out, *extra):
    assert main(["generate", "--model", str(folder), "--prompt", "a red cat, big", "--prompt", "a blue dog",
                 "--seeds", "0", "7", "--steps", "3", "--quiet", "--negative-prompt", "blurry", *extra,
                 "--out", str(out)]) == 0


def test_series_pngs_carry_both_chunks_and_inspect_prints_them(tiny_sd_folder, tmp_path, capsys):
    _generate(tiny_sd_folder, tmp_path / "s")
    image = tmp_path / "s" / "p01_s0007.png"
    text = recipe.read_png_text(image)
    parsed = recipe.parse_parameters(text[recipe.PARAMETERS_KEY])
    assert parsed["Prompt"] == "a blue dog" and parsed["Negative prompt"] == "blurry"
    assert parsed["Seed"] == "7" and parsed["Steps"] == "3" and parsed["Sampler"] == "DDIM"
    assert parsed["Size"] == "32x32" and parsed["Model"] == tiny_sd_folder.name and len(parsed["Model hash"]) == 10
    found = recipe.read_recipe(image)
    assert found["image"] == {"file": "p01_s0007.png", "prompt_index": 1, "prompt": "a blue dog", "seed": 7}
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert found["request"]["config"] == manifest["config"] and "images" not in found["request"]
    capsys.readouterr()
    assert main(["inspect", str(image)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a blue dog\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM")
    assert "prompt 1, seed 7" in out and "--from-image" in out
    assert main(["inspect", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"]["image"]["seed"] == 7


def test_from_image_recreates_identical_pixels_with_a_batch_coupled_method(tiny_sd_folder, tmp_path, capsys):
    # StyleAligned over two batches: the second batch's images depend on the series' first image,
    # so re-creating p01_s0007 alone must rebuild that coupling.
    _generate(tiny_sd_folder, tmp_path / "s", "--style-aligned", "--batch-size", "2")
    source = tmp_path / "s" / "p01_s0007.png"
    capsys.readouterr()
    assert main(["generate", "--from-image", str(source), "--quiet", "--out", str(tmp_path / "again.png")]) == 0
    assert "pixels identical" in capsys.readouterr().out
    assert np.array_equal(_pixels(source), _pixels(tmp_path / "again.png"))
    assert recipe.read_recipe(tmp_path / "again.png")["image"]["seed"] == 7  # the copy carries its recipe too
    # into a folder: the original file name; an existing file is kept unless --overwrite
    assert main(["generate", "--from-image", str(source), "--quiet", "--out", str(tmp_path / "dir")]) == 0
    assert np.array_equal(_pixels(source), _pixels(tmp_path / "dir" / "p01_s0007.png"))
    assert main(["generate", "--from-image", str(source), "--quiet", "--out", str(tmp_path / "again.png")]) == 2


def test_unsharing_the_batch_would_change_the_pixels(tiny_sd_folder, tmp_path):
    # The check above can fail: generating the image in a batch of its own gives other pixels.
    _generate(tiny_sd_folder, tmp_path / "s", "--style-aligned", "--batch-size", "2")
    from consistent_diffusion.series import SeriesConfig, generate_series, series_request
    from consistent_diffusion.testing import load_pipeline_or_tiny

    request = series_request(recipe.read_recipe(tmp_path / "s" / "p01_s0007.png")["request"], "test")
    pipe = load_pipeline_or_tiny(request.model)
    alone = SeriesConfig(prompts=("a blue dog",), seeds=(7,), steps=3, negative_prompt="blurry")
    image = generate_series(pipe, alone, request.methods, progress=False).images[0]
    assert not np.array_equal(np.asarray(image), _pixels(tmp_path / "s" / "p01_s0007.png"))


def test_images_without_a_recipe_get_clear_answers(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["inspect", str(plain)]) == 1
    assert "carries no generation parameters" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="carries no consistent-diffusion recipe"):
        recipe.read_recipe(plain)
    a1111 = tmp_path / "a1111.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", A1111_SAMPLE)
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    assert main(["inspect", str(a1111)]) == 0
    assert capsys.readouterr().out.startswith("masterpiece, a red fox in snow")
    assert main(["generate", "--from-image", str(a1111), "--out", str(tmp_path / "x.png")]) == 2
    assert "A1111 parameters" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["inspect", str(corrupt)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.png")]) == 2


def test_edits_carry_their_recipe(tiny_sd_folder, tmp_path):
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / "in.png")
    common = ["--model", str(tiny_sd_folder), "--device", "cpu"]
    assert main(["invert", str(tmp_path / "in.png"), "--prompt", "a cat", "--steps", "3", "--seed", "1",
                 "--out", str(tmp_path / "inv"), *common]) == 0
    assert main(["edit", str(tmp_path / "inv"), "--prompt", "a dog, small", "--skip", "1",
                 "--out", str(tmp_path / "edit"), *common]) == 0
    image = tmp_path / "edit" / "edit_p00.png"
    parsed = recipe.parse_parameters(recipe.read_png_text(image)[recipe.PARAMETERS_KEY])
    assert parsed["Prompt"] == "a dog, small" and parsed["Steps"] == "3" and parsed["Seed"] == "1"
    assert parsed["Skip"] == "1" and parsed["Methods"] == "ddpm_edit"
    found = recipe.read_recipe(image)
    assert found["kind"] == "ddpm-edit" and found["request"]["skip"] == 1


def test_zero_valued_fields_are_written_not_dropped():
    """``Seed: 0``, ``CFG scale: 0`` and ``Skip: 0`` are values, not absences: only None is left out."""
    from types import SimpleNamespace

    from consistent_diffusion.methods.inversion.folders import edit_recipe_text
    from consistent_diffusion.series import image_recipe_text

    text = recipe.format_parameters("cat", "", {"Steps": 0, "CFG scale": 0.0, "Seed": 0, "Skip": 0, "Model hash": None})
    parsed = recipe.parse_parameters(text)
    assert (parsed["Steps"], parsed["CFG scale"], parsed["Seed"], parsed["Skip"]) == ("0", "0.0", "0", "0")
    assert "Model hash" not in parsed
    model = {"spec": "embedded", "fingerprint": "0123456789abcdef"}
    manifest = {"config": {"steps": 20, "guidance_scale": 0.0}, "runtime": {"scheduler_class": "DDIMScheduler"},
                "model": model, "methods": []}
    series = recipe.parse_parameters(image_recipe_text(manifest, 0, "cat", 0, (64, 64))[recipe.PARAMETERS_KEY])
    assert series["Seed"] == "0" and series["CFG scale"] == "0.0"
    inversion = SimpleNamespace(steps=10, config={"seed": 0})
    edit = edit_recipe_text({"cfg": 0.0, "skip": 0, "model": model}, "edit_p00.png", "dog", inversion, (64, 64))
    edited = recipe.parse_parameters(edit[recipe.PARAMETERS_KEY])
    assert (edited["Seed"], edited["CFG scale"], edited["Skip"]) == ("0", "0.0", "0")
