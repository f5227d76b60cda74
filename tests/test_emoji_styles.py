"""Fast tests of the seven-style emoji dataset: matching, held-out styles, rasterising (no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from _emoji_fakes import (
    CLDR,
    TODAYS_HOLDOUT,
    TODAYS_TRAIN,
    fake_table,
    make_datasource,
    make_fluent_3d,
    make_fluentui,
    make_openmoji,
    svg_disc,
)
from consistent_diffusion.data import styles
from consistent_diffusion.data.emoji import (
    EmojiDatasetConfig,
    build_emoji_dataset,
    load_emoji_dataset,
    trainable_rows,
)
from consistent_diffusion.data.raster import rasterise_svg, read_artwork

SEVEN = ("google", "twitter", "openmoji", "openmoji-line", "fluent-flat", "fluent-3d", "fluent-contrast")


@pytest.fixture()
def seven_packages(tmp_path: Path) -> list[Path]:
    table = fake_table()
    codes = [e["unified"] for e in table if e["category"] not in ("Component", "Flags")]
    root = tmp_path / "src"
    return [
        make_datasource(root, "google", table), make_datasource(root, "twitter", table),
        make_openmoji(root, codes),
        # fluent draws 7 of the 8 named ones: cat (1F408) but not cat face (1F431, short name "cat")
        make_fluentui(root, [CLDR[c] for c in TODAYS_TRAIN if c != "1F431"]),
        make_fluent_3d(root, codes[:20] + [c.replace("-FE0F", "") for c in TODAYS_TRAIN]),
    ]


def build_seven(tmp_path: Path, packages: list[Path], **kwargs) -> Path:
    kwargs.setdefault("unstyled_caption_fraction", 0.25)
    return build_emoji_dataset(EmojiDatasetConfig(out=tmp_path / "seven", sources=packages, **kwargs))


def test_seven_styles_matched_by_code_point_and_name(tmp_path: Path, seven_packages: list[Path]) -> None:
    out = build_seven(tmp_path, seven_packages)
    dataset = load_emoji_dataset(out)
    assert sorted(dataset.styles) == sorted(SEVEN)
    drawn = {s: {r["identity"] for r in dataset.records if r["style"] == s} for s in dataset.styles}
    fluent_ids = {c.lower() for c in TODAYS_TRAIN} - {"1f431"}
    # name matching: the kebab-case CLDR names of fluentui-emoji found the 7 named identities, the
    # -default skin-tone file counted once, cat.svg went to CAT (1F408), not to the earlier CAT FACE
    # (1F431) whose short name is "cat": a short name is tried only after every identity's CLDR name.
    assert drawn["fluent-flat"] == drawn["fluent-contrast"] == fluent_ids
    # code point matching across FE0F spellings: openmoji "2764", fluent-3d "2764" vs emoji.json "2764-FE0F".
    assert "2764-fe0f" in drawn["openmoji"] and "2764-fe0f" in drawn["fluent-3d"]
    assert len(drawn["openmoji"]) == 48 and len(drawn["fluent-3d"]) == 28
    matching = dataset.meta["matching"]
    assert matching["identities_by_style_count"] == {"1": 1, "2": 0, "3": 0, "4": 20, "5": 21, "6": 0, "7": 7}
    assert matching["unmatched_files"]["fluent-flat"] == 1  # no-such-emoji.svg
    assert matching["unmatched_files"]["openmoji"] == 1  # the openmoji extra E000
    card = (out / "DATASET_CARD.md").read_text()
    for word in ("CC-BY-SA-4.0", "MIT", "Apache-2.0", "Attribution-ShareAlike 4.0 International",
                 "Mohammad Abu Mattar", "| 7 | 7 |", "openmoji-line, fluent-contrast"):
        assert word in card
    first = dataset.records[0]
    assert first["caption"] in (first["name"], f"{first['name']}, {first['style']} style")


def test_captions_use_cldr_names_where_openmoji_gives_one(tmp_path: Path, seven_packages: list[Path]) -> None:
    """U+2764's Unicode name is HEAVY BLACK HEART; its CLDR name, the one people type, is red heart."""
    dataset = load_emoji_dataset(build_seven(tmp_path, seven_packages, unstyled_caption_fraction=0.0))
    heart = [r for r in dataset.records if r["identity"] == "2764-fe0f"]
    assert len(heart) == 7 and {r["name"] for r in heart} == {"red heart"}
    assert {r["unicode_name"] for r in heart} == {"heavy black heart"}
    assert {r["caption"] for r in heart} == {f"red heart, {style} style" for style in SEVEN}
    pizza = next(r for r in dataset.records if r["identity"] == "1f355")
    assert (pizza["name"], pizza["unicode_name"]) == ("pizza", "slice of pizza")
    assert dataset.meta["caption_names"] == {"cldr": 48, "unicode": 0}
    assert "`red heart`" in (tmp_path / "seven" / "DATASET_CARD.md").read_text()


def test_heldout_styles_never_trainable(tmp_path: Path, seven_packages: list[Path]) -> None:
    dataset = load_emoji_dataset(build_seven(tmp_path, seven_packages))
    assert dataset.heldout_styles == ["openmoji-line", "fluent-contrast"]
    assert sorted(dataset.trained_styles) == ["fluent-3d", "fluent-flat", "google", "openmoji", "twitter"]
    for r in dataset.records:
        assert r["style_split"] == ("heldout" if r["style"] in dataset.heldout_styles else "trained")
    rows = dataset.trainable()
    assert len(rows) and np.array_equal(rows, trainable_rows(dataset.records))
    picked = [dataset.records[i] for i in rows]
    assert all(r["split"] == "train" and r["style"] not in dataset.heldout_styles for r in picked)
    expected = [i for i, r in enumerate(dataset.records)
                if r["split"] == "train" and r["style"] not in ("openmoji-line", "fluent-contrast")]
    assert rows.tolist() == expected
    held = [r for r in dataset.records if r["style_split"] == "heldout"]
    assert held and all(r["caption"].endswith(" style") for r in held)  # never the unstyled caption
    assert all(dataset.records[i]["split"] == "val" for i in dataset.trainable("val"))


def test_training_images_from_the_dataset_leave_out_the_heldout_styles(tmp_path: Path,
                                                                       seven_packages: list[Path]) -> None:
    """ControlNet (and any image-set training) reads only trainable rows, as the base model does."""
    from consistent_diffusion.training.data import load_captioned_images

    dataset = load_emoji_dataset(build_seven(tmp_path, seven_packages))
    loaded = load_captioned_images(tmp_path / "seven", 64)
    assert loaded.captions == [dataset.records[i]["caption"] for i in dataset.trainable()]
    assert not any(style in caption for caption in loaded.captions for style in dataset.heldout_styles)
    assert len(load_captioned_images(tmp_path / "seven", 64, split=None).captions) == len(dataset.records)
    measured = load_captioned_images(tmp_path / "seven", 64, split="holdout", heldout_styles=True)
    assert measured.captions == [dataset.records[i]["caption"] for i in dataset.indices(split="holdout")]
    assert any(style in caption for caption in measured.captions for style in dataset.heldout_styles)


def test_split_is_the_same_in_the_seven_style_build(tmp_path: Path, seven_packages: list[Path]) -> None:
    dataset = load_emoji_dataset(build_seven(tmp_path, seven_packages))
    holdout = {r["identity"] for r in dataset.records if r["split"] == "holdout"}
    assert holdout == {c.lower() for c in TODAYS_HOLDOUT}
    for style in dataset.styles:
        ids = {r["identity"] for r in dataset.records if r["style"] == style}
        assert {r["identity"] for r in dataset.records if r["style"] == style and r["split"] == "holdout"} \
            == holdout & ids


def test_older_dataset_folder_loads_as_all_trained(tmp_path: Path, seven_packages: list[Path]) -> None:
    import json

    out = build_seven(tmp_path, seven_packages)
    labels = json.loads((out / "labels.json").read_text())
    labels["meta"].pop("heldout_styles")
    for r in labels["records"]:
        r.pop("style_split")
    (out / "labels.json").write_text(json.dumps(labels))
    dataset = load_emoji_dataset(out)
    assert len(dataset.trainable()) == len(dataset.indices(split="train"))


def test_keys_normalise_packages_spellings() -> None:
    assert styles.codepoint_key("2764-fe0f") == styles.codepoint_key("2764") == "2764"
    assert styles.codepoint_key("002a-fe0f-20e3") == styles.codepoint_key("2A-20E3") == "2A-20E3"
    assert styles.codepoint_key("1f3f4-e0067_e0062_e0065_e006e_e0067") == \
        styles.codepoint_key("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F")
    assert styles.codepoint_key("grinning-face") is None
    assert styles.name_key("Grinning Face") == styles.name_key("grinning-face") == "grinning face"
    assert styles.name_key("keycap: *") == "keycap"


def test_svg_rasterising_is_deterministic_and_exact() -> None:
    """resvg gives the same bytes twice and the pixels worked out by hand: a red left half, a 50%
    black square on white in the bottom right (255 * 0.5 -> 127), white elsewhere."""
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 4 4"><rect width="2" height="4" fill="#ff0000"/>'
           '<rect x="2" y="2" width="2" height="2" fill="#000000" fill-opacity="0.5"/></svg>')
    image = rasterise_svg(svg)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, rasterise_svg(svg))
    assert (image[:, :32] == [255, 0, 0]).all()
    assert (image[:32, 32:] == 255).all()
    assert (image[32:, 32:] == 127).all()
    disc = rasterise_svg(svg_disc("#3080c0", 20))
    assert np.array_equal(disc, rasterise_svg(svg_disc("#3080c0", 20)))
    assert hashlib.sha256(disc.tobytes()).hexdigest() == \
        "bfb254be0aea69c2fd89e527dccc032f4d4c946cf645881a3f9299e50e95ca0b"
    assert (disc[36, 36] == [48, 128, 192]).all() and (disc[0, 0] == 255).all()


def test_webp_is_composited_and_resized(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((256, 256, 4), dtype=np.uint8)
    rgba[:, :128] = [0, 0, 255, 255]  # opaque blue left half, transparent right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.webp", lossless=True)
    image = read_artwork(tmp_path / "x.webp")
    assert image.shape == (64, 64, 3)
    assert (image[:, :26] == [0, 0, 255]).all() and (image[:, 38:] == 255).all()  # Lanczos rings near the edge
    assert np.abs(image[:, 26:38].astype(int) - image[:, 26:38][:1].astype(int)).max() == 0  # same in every row
