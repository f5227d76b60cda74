"""Fast tests of the emoji dataset builder on a fake npm package layout (no network, seconds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consistent_diffusion.cli.commands import data as data_command
from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.data import emoji
from consistent_diffusion.data.emoji import EmojiDatasetConfig, build_emoji_dataset, load_emoji_dataset

CATEGORIES = ["Smileys & Emotion", "Animals & Nature", "Food & Drink", "Flags"]


def fake_entries(count: int = 24) -> list[dict]:
    """emoji.json-like entries over four categories, plus a skin-tone component."""
    entries = []
    for k in range(count):
        code = f"1F{600 + k:03X}"
        entries.append({
            "name": f"Fake Thing {k}" if k % 2 else f"FAKE_THING {k}", "unified": code, "image": f"{code.lower()}.png",
            "short_name": f"thing{k}", "category": CATEGORIES[k % len(CATEGORIES)], "subcategory": f"sub{k % 3}",
            "sort_order": k, "has_img_google": True, "has_img_twitter": k != count - 1,
            "skin_variations": {"1F3FB": {"unified": f"{code}-1F3FB", "image": f"{code.lower()}-1f3fb.png"}},
        })
    entries.append({"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png",
                    "category": "Component", "subcategory": "skin-tone", "sort_order": 999,
                    "has_img_google": True, "has_img_twitter": True})
    return entries


def make_package(root: Path, vendor: str, entries: list[dict]) -> Path:
    """Write package/{package.json, emoji.json, img/<vendor>/64/*.png} like the npm tarball."""
    package = root / f"emoji-datasource-{vendor}" / "package"
    images = package / "img" / vendor / "64"
    images.mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": f"emoji-datasource-{vendor}", "version": "0.0.1"}))
    (package / "emoji.json").write_text(json.dumps(entries))
    rng = np.random.default_rng(len(vendor))
    for entry in entries:
        if not entry[f"has_img_{vendor}"]:
            continue
        rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
        rgba[:8, :8, 3] = 0  # a transparent corner: must come out white
        Image.fromarray(rgba, "RGBA").save(images / entry["image"])
    return package


@pytest.fixture()
def packages(tmp_path: Path) -> list[Path]:
    entries = fake_entries()
    return [make_package(tmp_path / "src", v, entries) for v in ("google", "twitter")]


def build(tmp_path: Path, packages: list[Path], name: str = "out", **kwargs) -> Path:
    config = EmojiDatasetConfig(out=tmp_path / name, sources=packages, holdout_identities=3, val_fraction=0.2,
                                **kwargs)
    return build_emoji_dataset(config)


def test_builds_images_labels_and_card(tmp_path: Path, packages: list[Path]) -> None:
    out = build(tmp_path, packages)
    dataset = load_emoji_dataset(out)
    # 24 fake emoji, one missing in twitter, the component dropped: 23 identities x 2 styles.
    assert dataset.images.shape == (46, 64, 64, 3) and dataset.images.dtype == np.uint8
    assert (dataset.images[:, :8, :8] == 255).all()
    assert dataset.styles == ["google", "twitter"]
    assert "Component" not in dataset.categories
    record = dataset.records[1]
    assert record["caption"] == f"{record['name']}, {record['style']} style"
    assert record["name"] == record["name"].lower() and "_" not in record["name"]
    card = (out / "DATASET_CARD.md").read_text()
    assert "Apache-2.0" in card and "CC-BY-4.0" in card and "skin-tone" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_split_is_by_identity_deterministic_and_holdout_in_every_style(tmp_path: Path, packages: list[Path]) -> None:
    first = load_emoji_dataset(build(tmp_path, packages, "a"))
    second = load_emoji_dataset(build(tmp_path, packages, "b"))
    assert [r["split"] for r in first.records] == [r["split"] for r in second.records]
    splits: dict[str, set[str]] = {}
    for r in first.records:
        splits.setdefault(r["identity"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    holdout = {r["identity"] for r in first.records if r["split"] == "holdout"}
    assert len(holdout) == 3
    for style in first.styles:
        assert {r["identity"] for r in first.records if r["style"] == style and r["split"] == "holdout"} == holdout
    assert all(r["category"] != "Flags" for r in first.records if r["split"] == "holdout")


def test_refuses_to_overwrite_and_rejects_bad_config(tmp_path: Path, packages: list[Path]) -> None:
    build(tmp_path, packages)
    with pytest.raises(ConfigError):
        build(tmp_path, packages)
    build(tmp_path, packages, overwrite=True)
    with pytest.raises(ConfigError):
        EmojiDatasetConfig(out=tmp_path / "x", val_fraction=0.9)
    with pytest.raises(ConsistentDiffusionError):
        build(tmp_path, [tmp_path], name="bad")


def test_missing_npm_says_how_to_use_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(ConsistentDiffusionError, match="--from"):
        build_emoji_dataset(EmojiDatasetConfig(out=tmp_path / "out", cache=tmp_path / "cache"))


def test_cli_command(tmp_path: Path, packages: list[Path], capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    data_command.register(parser.add_subparsers())
    args = parser.parse_args(["data", "emoji", "--out", str(tmp_path / "cli"), "--from", str(packages[0]),
                              "--from", str(packages[1].parent), "--holdout", "2"])
    assert args.func(args) == 0
    assert "wrote 46 images" in capsys.readouterr().out
