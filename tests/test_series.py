import json

import numpy as np
import pytest

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import Method
from consistent_diffusion.series import SeriesConfig, generate_series, image_filename, load_series_request


def _array(image):
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_image_is_the_same_alone_or_in_a_batch(request, fixture):
    pipe = request.getfixturevalue(fixture)
    batch = generate_series(pipe, SeriesConfig(prompts=("a cat", "a dog"), seeds=(0, 1, 2), steps=2, batch_size=6),
                            progress=False)
    alone = generate_series(pipe, SeriesConfig(prompts=("a dog",), seeds=(1,), steps=2, batch_size=1), progress=False)
    # item order is prompt-major: ("a dog", seed 1) is the 5th image
    assert np.abs(_array(batch.images[4]) - _array(alone.images[0])).max() <= 2.0
    # and it differs from its neighbours, so the comparison means something
    assert np.abs(_array(batch.images[3]) - _array(batch.images[4])).max() > 2.0


def test_series_folder_contents_and_manifest(tiny_sd, tmp_path):
    config = SeriesConfig(prompts=("a cat", "a dog"), seeds=(3, 5), steps=2)
    result = generate_series(tiny_sd, config, out_dir=tmp_path / "out", progress=False)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    expected = sorted([image_filename(i, s) for i in (0, 1) for s in (3, 5)] + ["contact_sheet.png", "manifest.json"])
    assert files == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["seeds"] == [3, 5]
    assert manifest["config"]["prompts"] == ["a cat", "a dog"]
    assert {"torch", "diffusers", "python"} <= set(manifest["versions"])
    assert [entry["file"] for entry in manifest["images"]] == [image_filename(i, s) for i in (0, 1) for s in (3, 5)]
    assert result.images[0].size == (32, 32)


def test_manifest_recreates_identical_images_through_the_cli(tiny_sd_folder, tmp_path):
    from consistent_diffusion.cli.main import main

    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a red cat", "--prompt", "a blue dog",
                 "--seeds", "0", "7", "--steps", "3", "--quiet", "--out", str(first)]) == 0
    request = load_series_request(first / "manifest.json")
    assert request.config.steps == 3 and request.model == str(tiny_sd_folder.resolve())
    assert main(["generate", "--from-manifest", str(first / "manifest.json"), "--quiet", "--out", str(second)]) == 0
    for name in (image_filename(i, s) for i in (0, 1) for s in (0, 7)):
        from PIL import Image

        assert np.array_equal(_array(Image.open(first / name)), _array(Image.open(second / name)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": ()}, "prompts is empty"),
        ({"steps": -3}, "steps must be a positive integer, got -3"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"scheduler": "warp"}, "unknown scheduler 'warp'; accepted: ddim"),
        ({"seeds": ()}, "seeds is empty"),
        ({"seeds": (1, 1)}, "repeat"),
        ({"seeds": (-1,)}, "seed -1"),
        ({"height": 4}, "height must be an integer >= 8"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_config_values_are_one_line_errors(kwargs, message):
    base = {"prompts": ("a cat",)}
    base.update(kwargs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        SeriesConfig(**base)
    assert "\n" not in str(raised.value)


def test_size_not_divisible_by_vae_factor(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="height 36 is not divisible by 8"):
        generate_series(tiny_sd, SeriesConfig(prompts=("a",), height=36, steps=2), out_dir=tmp_path / "out", progress=False)
    assert not any(tmp_path.iterdir())


class _FailOnSecondBatch(Method):
    name = "fail-on-second-batch"

    def __init__(self):
        self.calls = 0

    def applied(self, ctx):
        import contextlib

        @contextlib.contextmanager
        def manager():
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("simulated crash")
            yield ctx

        return manager()


def test_crash_mid_series_leaves_nothing_half_written(tiny_sd, tmp_path):
    config = SeriesConfig(prompts=("a", "b"), seeds=(0,), steps=2, batch_size=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_series(tiny_sd, config, methods=[_FailOnSecondBatch()], out_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tiny_sd, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = SeriesConfig(prompts=("a",), seeds=(0,), steps=2)
    with pytest.raises(ConfigError, match="already exists"):
        generate_series(tiny_sd, config, out_dir=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    generate_series(tiny_sd, config, out_dir=out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_manifest_from_changed_weights_warns(tiny_sd_folder, tmp_path):
    from consistent_diffusion.models.loading import load_pipeline
    from consistent_diffusion.series import fingerprint_mismatch
    from consistent_diffusion.testing import save_tiny_pipeline

    pipe = load_pipeline(str(tiny_sd_folder))
    generate_series(pipe, SeriesConfig(prompts=("a",), seeds=(0,), steps=2), out_dir=tmp_path / "s", progress=False)
    request = load_series_request(tmp_path / "s")
    assert fingerprint_mismatch(request, pipe) is None
    other = load_pipeline(str(save_tiny_pipeline(tmp_path / "other", seed=3)))
    assert "changed since the manifest" in fingerprint_mismatch(request, other)
