"""Tiny synthetic npm package folders for the emoji dataset tests (no network).

Each ``make_*`` writes the layout of the real package (checked with ``npm pack`` + ``tar tzf``):
``emoji-datasource-<vendor>``: package.json, emoji.json, img/<vendor>/64/<code>.png;
``openmoji``: data/openmoji.json, color/svg/<CODE>.svg, black/svg/<CODE>.svg, LICENSE.txt;
``fluentui-emoji``: icons/flat/<name>.svg, icons/high-contrast/<name>.svg (names only, skin tones as
``-default``/``-light``... suffixes), LICENSE; ``@lobehub/fluent-emoji-3d``: assets/<code>.webp (256 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# The 40 holdout identities of today's two-style dataset (emoji-datasource 16.0.0, google + twitter),
# among them the bench's blue heart 1F499, lizard 1F98E and onion 1F9C5.
TODAYS_HOLDOUT = (
    "1F374", "1F386", "1F3A1", "1F3AF", "1F3C9", "1F3CE-FE0F", "1F449", "1F468-200D-1F4BB",
    "1F469-200D-1F9BC-200D-27A1-FE0F", "1F47A", "1F499", "1F50B", "1F555", "1F576-FE0F", "1F595",
    "1F64D-200D-2640-FE0F", "1F6AC", "1F6D5", "1F934", "1F960", "1F96D", "1F96E", "1F974", "1F97B",
    "1F97E", "1F98E", "1F992", "1F997", "1F9C5", "1F9D1-200D-1F680", "1F9D4-200D-2640-FE0F", "1F9E2",
    "1F9EA", "1F9FE", "1FA89", "1FA9A", "1FABE", "1FAF7", "2699-FE0F", "26FA",
)
# Train identities of today's dataset (not holdout), with their Unicode names; CAT FACE comes first and
# has the short name "cat", as in emoji.json, a trap for name matching (fluent's cat.svg is CAT, 1F408).
TODAYS_TRAIN = {"1F600": "GRINNING FACE", "1F603": "SMILING FACE WITH OPEN MOUTH", "1F431": "CAT FACE",
                "1F408": "CAT", "2764-FE0F": "HEAVY BLACK HEART", "1F355": "SLICE OF PIZZA",
                "1F680": "ROCKET", "1F44D": "THUMBS UP SIGN"}
CLDR = {"1F600": "grinning face", "1F603": "grinning face with big eyes", "1F408": "cat", "1F431": "cat face",
        "2764-FE0F": "red heart", "1F355": "pizza", "1F680": "rocket", "1F44D": "thumbs up"}
CATEGORIES = ["Smileys & Emotion", "Animals & Nature", "Food & Drink", "Objects"]


def fake_table() -> list[dict]:
    """emoji.json entries: today's 40 holdout code points, 8 train ones, a flag and a component."""
    entries = []
    codes = list(TODAYS_HOLDOUT) + list(TODAYS_TRAIN)
    for k, code in enumerate(codes):
        short = "cat" if code == "1F431" else f"thing{k}"
        entries.append({
            "name": TODAYS_TRAIN.get(code, f"HOLDOUT_THING {k}"), "unified": code,
            "non_qualified": code.replace("-FE0F", "") if code.endswith("-FE0F") else None,
            "image": f"{code.lower()}.png", "short_name": short, "short_names": [short],
            "category": CATEGORIES[k % len(CATEGORIES)], "subcategory": f"sub{k % 3}", "sort_order": k,
            "has_img_google": True, "has_img_twitter": True,
        })
    entries.append({"name": "United States Flag", "unified": "1F1FA-1F1F8", "image": "1f1fa-1f1f8.png",
                    "short_name": "us", "category": "Flags", "subcategory": "country-flag", "sort_order": 500,
                    "has_img_google": True, "has_img_twitter": False})
    entries.append({"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png",
                    "category": "Component", "subcategory": "skin-tone", "sort_order": 999,
                    "has_img_google": True, "has_img_twitter": True})
    return entries


def random_rgba(rng: np.random.Generator, size: int = 64) -> Image.Image:
    rgba = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
    rgba[: size // 8, : size // 8, 3] = 0  # a transparent corner: must come out white
    return Image.fromarray(rgba, "RGBA")


def make_datasource(root: Path, vendor: str, entries: list[dict]) -> Path:
    """package/{package.json, emoji.json, img/<vendor>/64/*.png} like the npm tarball."""
    package = root / f"emoji-datasource-{vendor}" / "package"
    images = package / "img" / vendor / "64"
    images.mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": f"emoji-datasource-{vendor}", "version": "0.0.1"}))
    (package / "emoji.json").write_text(json.dumps(entries))
    (package / "LICENSE").write_text("The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n")
    rng = np.random.default_rng(len(vendor))
    for entry in entries:
        if entry[f"has_img_{vendor}"]:
            random_rgba(rng).save(images / entry["image"])
    return package


def svg_disc(colour: str, radius: int = 20) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="{radius}" '
            f'fill="{colour}"/></svg>')


def make_openmoji(root: Path, codes: list[str]) -> Path:
    """openmoji: data/openmoji.json + color/svg + black/svg, files named by upper-case code point."""
    package = root / "openmoji" / "package"
    for sub in ("color/svg", "black/svg", "data"):
        (package / sub).mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "openmoji", "version": "0.0.2"}))
    (package / "LICENSE.txt").write_text("Attribution-ShareAlike 4.0 International\n")
    table = []
    for k, code in enumerate(codes):
        hexcode = code.replace("-FE0F", "") if code == "2764-FE0F" else code  # openmoji drops some FE0F
        table.append({"hexcode": hexcode, "annotation": CLDR.get(code, f"thing {k}"), "group": "x"})
        (package / "color" / "svg" / f"{hexcode}.svg").write_text(svg_disc(f"#{(k * 40) % 256:02x}8020", 10 + k % 20))
        (package / "black" / "svg" / f"{hexcode}.svg").write_text(svg_disc("#000000", 10 + k % 20))
    (package / "color" / "svg" / "E000.svg").write_text(svg_disc("#ff0000"))  # an openmoji extra: no identity
    (package / "black" / "svg" / "E000.svg").write_text(svg_disc("#000000"))
    table.append({"hexcode": "E000", "annotation": "openmoji extra", "group": "extras-openmoji"})
    (package / "data" / "openmoji.json").write_text(json.dumps(table))
    return package


def make_fluentui(root: Path, names: list[str]) -> Path:
    """fluentui-emoji: icons/flat and icons/high-contrast SVGs named by the CLDR name in kebab case."""
    package = root / "fluentui-emoji" / "package"
    for sub in ("icons/flat", "icons/high-contrast"):
        (package / sub).mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "fluentui-emoji", "version": "0.0.3"}))
    (package / "LICENSE").write_text("MIT License\n\nCopyright (c) 2022 Mohammad Abu Mattar\n")
    for k, name in enumerate(names):
        stem = name.replace(" ", "-")
        if name == "thumbs up":  # a skin-tone emoji: -default plus tone variants
            for tone in ("default", "light", "dark"):
                (package / "icons" / "flat" / f"{stem}-{tone}.svg").write_text(svg_disc("#ffcc00"))
            (package / "icons" / "high-contrast" / f"{stem}-default.svg").write_text(svg_disc("#000000"))
            continue
        (package / "icons" / "flat" / f"{stem}.svg").write_text(svg_disc(f"#20{(k * 50) % 256:02x}80"))
        (package / "icons" / "high-contrast" / f"{stem}.svg").write_text(svg_disc("#000000", 15))
    (package / "icons" / "flat" / "no-such-emoji.svg").write_text(svg_disc("#123456"))  # fails to match
    return package


def make_fluent_3d(root: Path, codes: list[str]) -> Path:
    """@lobehub/fluent-emoji-3d: assets/<lower-case code>.webp at 256 px (lossless)."""
    package = root / "fluent-emoji-3d" / "package"
    (package / "assets").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "@lobehub/fluent-emoji-3d", "version": "0.0.4",
                                                       "license": "MIT"}))
    rng = np.random.default_rng(3)
    for code in codes:
        random_rgba(rng, 256).save(package / "assets" / f"{code.lower()}.webp", lossless=True)
    return package
