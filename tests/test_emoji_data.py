"""Fast tests of the emoji dataset builder on a fake npm package layout (no network, seconds)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from _emoji_fakes import TODAYS_HOLDOUT, fake_table, make_datasource
from consistent_diffusion.cli.commands import data as data_command
from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.data import emoji, emoji_sources
from consistent_diffusion.data.emoji import EmojiDatasetConfig, build_emoji_dataset, load_emoji_dataset

# What today's builder (before the seven styles, commit 6ff457a) wrote for the fake google + twitter
# packages below with its defaults: sha256 of images.npy and of json.dumps(records).
TODAYS_IMAGES_SHA256 = "459104ece55f93eeb28305687f9a3ee3b0eb9761aab98d1e27a040fa7f463585"
TODAYS_RECORDS_SHA256 = "1f4e86e266865c9a00bd62cf83159b0f2fad52af47fea308c4d436d999f4cbbb"
TODAYS_KEYS = ("style", "identity", "name", "short_name", "category", "subcategory", "caption", "split")


@pytest.fixture()
def packages(tmp_path: Path) -> list[Path]:
    entries = fake_table()
    return [make_datasource(tmp_path / "src", v, entries) for v in ("google", "twitter")]


def build(tmp_path: Path, packages: list[Path], name: str = "out", **kwargs) -> Path:
    kwargs.setdefault("unstyled_caption_fraction", 0.0)
    return build_emoji_dataset(EmojiDatasetConfig(out=tmp_path / name, sources=packages, **kwargs))


def test_builds_images_labels_and_card(tmp_path: Path, packages: list[Path]) -> None:
    out = build(tmp_path, packages)
    dataset = load_emoji_dataset(out)
    # 48 fake emoji, the flag missing in twitter, the component dropped: 48 identities x 2 styles.
    assert dataset.images.shape == (96, 64, 64, 3) and dataset.images.dtype == np.uint8
    assert (dataset.images[:, :8, :8] == 255).all()
    assert dataset.styles == ["google", "twitter"] and dataset.heldout_styles == []
    assert "Component" not in dataset.categories
    record = dataset.records[1]
    assert record["caption"] == f"{record['name']}, {record['style']} style"
    assert record["name"] == record["name"].lower() and "_" not in record["name"]
    card = (out / "DATASET_CARD.md").read_text()
    assert "Apache-2.0" in card and "CC-BY-4.0" in card and "skin-tone" in card
    assert "Cal Henderson" in card  # the package's licence file is quoted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_two_style_build_is_todays_dataset(tmp_path: Path, packages: list[Path]) -> None:
    """google + twitter with the unstyled-caption fraction 0: images.npy byte-identical to today's
    build, records identical on every one of today's keys (the additions: unicode_name, style_split).
    Without OpenMoji's CLDR table the caption names are the Unicode names, as today."""
    out = build(tmp_path, packages)
    assert hashlib.sha256((out / "images.npy").read_bytes()).hexdigest() == TODAYS_IMAGES_SHA256
    records = json.loads((out / "labels.json").read_text())["records"]
    assert all(set(r) == {*TODAYS_KEYS, "unicode_name", "style_split"} and r["style_split"] == "trained"
               and r["name"] == r["unicode_name"] for r in records)
    old = [{k: r[k] for k in TODAYS_KEYS} for r in records]
    assert hashlib.sha256(json.dumps(old).encode()).hexdigest() == TODAYS_RECORDS_SHA256


def test_todays_holdout_identities_stay_holdout(tmp_path: Path, packages: list[Path]) -> None:
    """The split is a function of the code point: today's 40 holdout emoji (the bench's references,
    e.g. blue heart 1F499, lizard 1F98E, onion 1F9C5) are holdout, in any build and any style."""
    dataset = load_emoji_dataset(build(tmp_path, packages))
    holdout = {r["identity"] for r in dataset.records if r["split"] == "holdout"}
    assert holdout == {c.lower() for c in TODAYS_HOLDOUT}
    assert {"1f499", "1f98e", "1f9c5"} <= holdout
    config = EmojiDatasetConfig(out=tmp_path / "unused")
    for code in TODAYS_HOLDOUT:  # alone, in any category of subjects: still holdout
        assert emoji.identity_split({"unified": code, "category": "Objects"}, config) == "holdout"
    assert emoji.identity_split({"unified": "1F499", "category": "Flags"}, config) != "holdout"
    assert emoji.identity_split({"unified": "1F600", "category": "Smileys & Emotion"}, config) == "train"


def test_new_identities_do_not_move_todays_split(tmp_path: Path) -> None:
    """A larger emoji table (as when new styles or a newer emoji-data add identities) with new code points
    of low hash: today's identities keep their split; the new ones are judged alone (1FB06 is below the
    holdout threshold, so it is holdout too; a count-based rule would have pushed one of today's 40 out)."""
    entries = fake_table()
    extra = [{**entries[-3], "name": f"NEW THING {c}", "unified": c, "image": f"{c.lower()}.png",
              "sort_order": 600 + k} for k, c in enumerate(("1FB06", "1FB12", "1FB20"))]
    packages = [make_datasource(tmp_path / "src", v, entries + extra) for v in ("google", "twitter")]
    dataset = load_emoji_dataset(build(tmp_path, packages))
    split = {r["identity"]: r["split"] for r in dataset.records}
    assert all(split[c.lower()] == "holdout" for c in TODAYS_HOLDOUT)
    assert split["1fb06"] == split["1fb12"] == split["1fb20"] == "holdout"
    assert sum(s == "holdout" for s in split.values()) == 43


def test_split_is_by_identity_and_deterministic(tmp_path: Path, packages: list[Path]) -> None:
    first = load_emoji_dataset(build(tmp_path, packages, "a", val_fraction=0.3))
    second = load_emoji_dataset(build(tmp_path, packages, "b", val_fraction=0.3))
    assert [r["split"] for r in first.records] == [r["split"] for r in second.records]
    splits: dict[str, set[str]] = {}
    for r in first.records:
        splits.setdefault(r["identity"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {"train", "val", "holdout"} == {r["split"] for r in first.records}
    assert all(r["category"] != "Flags" for r in first.records if r["split"] == "holdout")


def test_unstyled_captions_are_a_fixed_fraction_of_training_rows(tmp_path: Path, packages: list[Path]) -> None:
    dataset = load_emoji_dataset(build(tmp_path, packages, "a", unstyled_caption_fraction=0.5))
    again = load_emoji_dataset(build(tmp_path, packages, "b", unstyled_caption_fraction=0.5))
    assert [r["caption"] for r in dataset.records] == [r["caption"] for r in again.records]
    unstyled = [r for r in dataset.records if r["caption"] == r["name"]]
    assert unstyled and all(r["split"] == "train" for r in unstyled)
    train = [r for r in dataset.records if r["split"] == "train"]
    assert 0.25 < len(unstyled) / len(train) < 0.75
    assert all(r["caption"] == f"{r['name']}, {r['style']} style" for r in dataset.records if r not in unstyled)


def test_refuses_to_overwrite_and_rejects_bad_config(tmp_path: Path, packages: list[Path]) -> None:
    build(tmp_path, packages)
    with pytest.raises(ConfigError):
        build(tmp_path, packages)
    build(tmp_path, packages, overwrite=True)
    for bad in ({"val_fraction": 0.9}, {"styles": ("sepia",)}, {"unstyled_caption_fraction": 1.5},
                {"styles": ()}, {"min_styles": 0}):
        with pytest.raises(ConfigError):
            EmojiDatasetConfig(out=tmp_path / "x", **bad)
    with pytest.raises(ConsistentDiffusionError):
        build(tmp_path, [tmp_path], name="bad")
    with pytest.raises(ConfigError, match="openmoji"):
        build(tmp_path, packages, name="missing", styles=("google", "openmoji"))


def test_missing_npm_says_how_to_use_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emoji_sources.shutil, "which", lambda name: None)
    with pytest.raises(ConsistentDiffusionError, match="--from"):
        build_emoji_dataset(EmojiDatasetConfig(out=tmp_path / "out", cache=tmp_path / "cache"))


def test_cli_command(tmp_path: Path, packages: list[Path], capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    data_command.register(parser.add_subparsers())
    args = parser.parse_args(["data", "emoji", "--out", str(tmp_path / "cli"), "--from", str(packages[0]),
                              "--from", str(packages[1].parent), "--unstyled-fraction", "0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "wrote 96 images" in out and "identities by number of styles: 1: 1, 2: 48" in out


def test_cli_help_explains_styles(capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    data_command.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "emoji", "--help"])
    text = capsys.readouterr().out
    for word in ("openmoji-line", "fluent-contrast", "fluent-3d", "held-out", "CC-BY-SA-4.0", "WebP"):
        assert word in text
