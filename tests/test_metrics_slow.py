"""Slow: reproduce the validation table of docs/metrics.md on held-out real emoji.

Needs the emoji dataset: set CD_EMOJI_DATA to a folder made by `consistent-diffusion data emoji
--out DIR` (or the test builds one from npm into a temporary folder, which needs network or a cache).
Run with: pytest -m slow tests/test_metrics_slow.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from consistent_diffusion.metrics.extractors.heads import ASSET_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emoji_data(tmp_path_factory):
    folder = os.environ.get("CD_EMOJI_DATA")
    if folder:
        return Path(folder)
    from consistent_diffusion.data.emoji import EmojiDatasetConfig, build_emoji_dataset

    try:
        return build_emoji_dataset(EmojiDatasetConfig(out=tmp_path_factory.mktemp("emoji") / "data"))
    except Exception as error:  # noqa: BLE001 - no npm / network: nothing to validate on
        pytest.skip(f"no emoji dataset (set CD_EMOJI_DATA): {error}")


def test_validation_reproduces_shipped_table(emoji_data, tmp_path):
    from consistent_diffusion.metrics.validation import ValidationConfig, validate_metrics

    shipped = json.loads((ASSET_DIR / "validation.json").read_text())
    config = ValidationConfig(data=emoji_data, **{k: v for k, v in shipped["meta"]["config"].items()
                                                 if k in ("sets", "negatives_per_positive", "set_size", "seed",
                                                          "concept", "splits")})
    report = validate_metrics(config, log=lambda message: None)
    got = {(r["metric"], r["extractor"], r["protocol_id"]): r for r in report["results"]}
    for row in shipped["results"]:
        key = (row["metric"], row["extractor"], row["protocol_id"])
        if key not in got:  # e.g. a probe that is absent here
            continue
        assert got[key]["auc"] == pytest.approx(row["auc"], abs=0.01), key
        assert got[key]["passed"] == row["passed"], key
