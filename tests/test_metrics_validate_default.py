"""`metrics validate` without `--data` builds the dataset `data emoji` builds (one default: all seven
styles, two held out, from ``data.emoji_sources.DEFAULT_STYLES``) and gets through on it; offline,
the npm client replaced by the fake package folders of ``_emoji_fakes``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _emoji_fakes import (
    CLDR,
    TODAYS_TRAIN,
    fake_table,
    make_datasource,
    make_fluent_3d,
    make_fluentui,
    make_openmoji,
)
from consistent_diffusion.cli.main import main
from consistent_diffusion.data import emoji_sources
from consistent_diffusion.data.emoji import EmojiDatasetConfig, load_emoji_dataset
from consistent_diffusion.data.styles import ALL_STYLES, HELDOUT_STYLES


@pytest.fixture()
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`npm pack` answered by fake package folders (every package of the seven styles); returns the
    packages asked for."""
    table = fake_table()
    codes = [e["unified"] for e in table if e["category"] not in ("Component", "Flags")]
    root = tmp_path / "npm"
    folders = [make_datasource(root, "google", table), make_datasource(root, "twitter", table),
               make_openmoji(root, codes), make_fluentui(root, [CLDR[c] for c in TODAYS_TRAIN if c != "1F431"]),
               make_fluent_3d(root, codes[:20] + [c.replace("-FE0F", "") for c in TODAYS_TRAIN])]
    by_package = {emoji_sources.describe_sources(folder)[0]["package"]: folder for folder in folders}
    asked: list[str] = []

    def npm_pack(package: str, version: str, cache: Path) -> Path:
        asked.append(package)
        return by_package[package]

    monkeypatch.setattr(emoji_sources, "npm_pack", npm_pack)
    return asked


def _styles(folder: Path) -> tuple[list[str], list[str]]:
    meta = json.loads((folder / "labels.json").read_text())["meta"]
    return sorted(load_emoji_dataset(folder).styles), sorted(meta["heldout_styles"])


def test_one_default_style_list_for_data_emoji_and_metrics_validate(tmp_path, fake_npm, monkeypatch):
    assert EmojiDatasetConfig(out=tmp_path / "x").styles is None and emoji_sources.DEFAULT_STYLES == ALL_STYLES
    assert main(["data", "emoji", "--out", str(tmp_path / "data")]) == 0
    seen = {}

    def validate_metrics(config, log=None):
        seen["data"] = Path(config.data)
        raise KeyboardInterrupt  # stop here: the dataset is what this test is about

    monkeypatch.setattr("consistent_diffusion.metrics.validation.validate_metrics", validate_metrics)
    assert main(["metrics", "validate", "--out", str(tmp_path / "val")]) == 130
    assert seen["data"] == tmp_path / "val-emoji-data"
    styles, heldout = _styles(seen["data"])
    assert (styles, heldout) == _styles(tmp_path / "data"), "metrics validate builds what data emoji builds"
    assert styles == sorted(ALL_STYLES) and heldout == sorted(HELDOUT_STYLES)


@pytest.mark.slow
def test_metrics_validate_default_path_gets_through_on_a_tiny_dataset(tmp_path, fake_npm, capsys):
    """The command as a user with the npm client runs it (no --data), on the tiny fake packages;
    before the one default it built google + twitter only and died: "roc_auc needs at least one
    positive and one negative score" (no unseen-style rows)."""
    out = tmp_path / "val"
    assert main(["metrics", "validate", "--out", str(out), "--sets", "10", "--no-concept"]) == 0
    report = json.loads((out / "validation.json").read_text())
    unseen = report["meta"]["data"]["unseen_styles"]
    assert unseen and set(unseen) <= set(HELDOUT_STYLES), "the unseen-style protocols have rows"
    assert {"object-unseen", "text-unseen"} <= {row["protocol_id"] for row in report["results"]}
