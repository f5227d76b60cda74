"""ControlNet preprocessors: invariants of canny, silhouette and scribble, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _finetune_data import COLOURS, shape_image
from consistent_diffusion.cli.main import main
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods import controls


def _mask(image: Image.Image) -> np.ndarray:
    return controls.image_to_mask(image)


def _true_square(size: int = 48) -> np.ndarray:
    truth = np.zeros((size, size), bool)
    lo, hi = size // 5, size - size // 5
    truth[lo : hi + 1, lo : hi + 1] = True
    return truth


@pytest.mark.parametrize("name", controls.CONDITIONS)
def test_outputs_are_binary_rgb_same_size_and_pure(name):
    source = shape_image("circle", COLOURS["blue"]).resize((50, 38))
    before = np.asarray(source).copy()
    out = controls.PREPROCESSORS[name](source)
    assert out.mode == "RGB" and out.size == source.size
    values = np.unique(np.asarray(out))
    assert set(values.tolist()) <= {0, 255}
    assert np.array_equal(np.asarray(source), before), "preprocessors must not modify their input"
    again = controls.PREPROCESSORS[name](source)
    assert np.array_equal(np.asarray(out), np.asarray(again)), "deterministic"


@pytest.mark.parametrize("name", controls.CONDITIONS)
def test_uniform_image_has_no_structure(name):
    blank = Image.new("RGB", (32, 32), (200, 180, 90))
    assert not _mask(controls.PREPROCESSORS[name](blank)).any()


def test_canny_finds_the_square_outline_only():
    edges = _mask(controls.canny(shape_image("square", COLOURS["red"])))
    truth = _true_square()
    outline = truth ^ np.pad(truth[1:-1, 1:-1] & truth[2:, 1:-1] & truth[:-2, 1:-1] & truth[1:-1, 2:] & truth[1:-1, :-2], 1)
    near = np.zeros_like(truth)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= np.roll(np.roll(outline, dy, 0), dx, 1)
    assert edges.any()
    assert (edges & near).sum() / edges.sum() > 0.95, "edges lie on the outline"
    assert not edges[20:28, 20:28].any(), "no edges inside the flat square"


def test_silhouette_matches_shape_from_colour_and_alpha():
    square = shape_image("square", COLOURS["green"])
    truth = _true_square()
    from_colour = _mask(controls.silhouette(square))
    assert (from_colour & truth).sum() / (from_colour | truth).sum() > 0.95
    # same shape with transparency instead of a white background: alpha decides
    rgba = Image.new("RGBA", square.size, (255, 255, 255, 0))
    rgba.paste(square, mask=Image.fromarray((truth * 255).astype(np.uint8)))
    assert np.array_equal(_mask(controls.silhouette(rgba)), truth)
    # invariant to the background colour
    on_grey = Image.new("RGB", square.size, (120, 120, 120))
    on_grey.paste(square, mask=Image.fromarray((truth * 255).astype(np.uint8)))
    assert np.array_equal(_mask(controls.silhouette(on_grey)), from_colour)


def test_silhouette_fills_holes():
    ring = shape_image("circle", COLOURS["red"])
    draw_hole = np.asarray(ring).copy()
    draw_hole[22:26, 22:26] = 255  # a white "eye" inside the shape
    holed = Image.fromarray(draw_hole)
    assert _mask(controls.silhouette(holed))[23, 23]
    assert not _mask(controls.silhouette(holed, fill_holes=False))[23, 23]


def test_scribble_is_coarser_than_canny_and_reads_drawings():
    image = shape_image("triangle", COLOURS["blue"])
    assert _mask(controls.scribble(image)).sum() > _mask(controls.canny(image)).sum()
    drawing = Image.new("L", (32, 32), 255)
    drawing.paste(0, (10, 5, 12, 27))  # one dark stroke on white paper
    strokes = _mask(controls.scribble(drawing, from_drawing=True))
    assert strokes[10, 11] and strokes.sum() == 2 * 22


def test_bad_options_and_conditions_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        controls.canny(Image.new("RGB", (8, 8)), low=0.5, high=0.1)
    with pytest.raises(ConfigError):
        controls.make_control("depth", Image.new("RGB", (8, 8)))


def test_make_control_keeps_alpha_from_files_and_resizes(tmp_path):
    truth = _true_square()
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (48, 48), (0, 0, 0, 255)), mask=Image.fromarray((truth * 255).astype(np.uint8)))
    path = tmp_path / "black_square.png"
    rgba.save(path)
    out = controls.make_control("silhouette", path, size=24)
    assert out.size == (24, 24)
    assert _mask(out)[12, 12] and not _mask(out)[1, 1]


def test_cli_control_writes_png(tmp_path, capsys):
    source = tmp_path / "in.png"
    shape_image("circle", COLOURS["red"]).save(source)
    out = tmp_path / "edges.png"
    assert main(["control", "canny", str(source), "--out", str(out)]) == 0
    assert Image.open(out).size == (48, 48)
    assert main(["control", "silhouette", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
