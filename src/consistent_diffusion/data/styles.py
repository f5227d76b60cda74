"""The house styles of the emoji dataset: which npm package draws each, and how its files are matched.

Identities come from ``emoji.json`` (emoji-data, shipped in every ``emoji-datasource-<vendor>``
package): one entry per base emoji with its code point, Unicode name and category. Each style's
files are matched to those entries

- by code point where the package names files by code point (emoji-datasource, OpenMoji,
  Fluent 3D). Keys are normalised: hex parts upper-cased without leading zeros, the variation
  selector U+FE0F and the cancel tag U+E007F dropped (packages disagree on them: ``2764-fe0f`` vs
  ``2764``);
- by normalised name otherwise (the ``fluentui-emoji`` SVGs are named ``grinning-face.svg``).
  The names tried, in order over all identities: the CLDR name that OpenMoji's ``openmoji.json``
  gives the code point (when an OpenMoji source is part of the build), the Unicode name, the
  emoji-data short names; before them, ``FLUENT_NAME_ALIASES`` for the ~30 Fluent names that are
  none of these (``knocked-out-face``, ``person-mage``...). A file is taken by one identity at most
  (the first pass that finds it).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from consistent_diffusion.core.errors import ConsistentDiffusionError

DATASOURCE_PREFIX = "emoji-datasource-"
SKIN_TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")
FLUENT_TONE_SUFFIXES = ("-medium-light", "-medium-dark", "-light", "-medium", "-dark")  # longest first
DROPPED_CODEPOINTS = (0xFE0F, 0xE007F)  # variation selector 16, cancel tag (packages disagree on both)
# fluentui-emoji file names that are not a CLDR, Unicode or short name of their emoji (checked by
# hand against fluentui-emoji 1.3.0 and emoji-datasource 16.0.0): name key -> code point.
FLUENT_NAME_ALIASES: dict[str, str] = {
    "keycap asterisk": "2A-20E3", "keycap hashtag": "23-20E3", "knocked out face": "1F635",
    "person blonde hair": "1F471", "man blonde hair": "1F471-200D-2642", "woman blonde hair": "1F471-200D-2640",
    "person deaf": "1F9CF", "man deaf": "1F9CF-200D-2642", "woman deaf": "1F9CF-200D-2640",
    "person elf": "1F9DD", "person fairy": "1F9DA", "person genie": "1F9DE", "person mage": "1F9D9",
    "person merpeople": "1F9DC", "man merpeople": "1F9DC-200D-2642", "woman merpeople": "1F9DC-200D-2640",
    "person superhero": "1F9B8", "person supervillain": "1F9B9", "person vampire": "1F9DB",
    "person zombie": "1F9DF", "person with bunny ears": "1F46F", "man with bunny ears": "1F46F-200D-2642",
    "woman with bunny ears": "1F46F-200D-2640", "person wrestling": "1F93C", "man wrestling": "1F93C-200D-2642",
    "woman wrestling": "1F93C-200D-2640", "phoenix bird": "1F426-200D-1F525", "blackbird": "1F426-200D-2B1B",
    "stuffedbread": "1F959", "stuffedbread flat": "1F959", "red triangle": "1F53A",
}


@dataclass(frozen=True)
class StyleSpec:
    """One house style: the package that draws it, where its files are and how they are named."""

    style: str
    package: str  # npm package name
    version: str  # version fetched by npm pack
    folder: str  # artwork folder inside the package
    match: str  # "datasource" (emoji.json has_img flags), "codepoint" or "name" (file stem)
    ext: str  # artwork file suffix
    artwork: str  # whose artwork
    licence: str  # SPDX id of the artwork licence
    licence_files: tuple[str, ...]  # licence files in the package, quoted in the dataset card


STYLES: dict[str, StyleSpec] = {s.style: s for s in (
    StyleSpec("google", "emoji-datasource-google", "16.0.0", "img/google/64", "datasource", ".png",
              "Noto Emoji (Google)", "Apache-2.0", ("LICENSE",)),
    StyleSpec("twitter", "emoji-datasource-twitter", "16.0.0", "img/twitter/64", "datasource", ".png",
              "Twemoji (Twitter, Inc. and other contributors)", "CC-BY-4.0", ("LICENSE",)),
    StyleSpec("openmoji", "openmoji", "17.0.0", "color/svg", "codepoint", ".svg",
              "OpenMoji colour (HfG Schwaebisch Gmuend and contributors)", "CC-BY-SA-4.0", ("LICENSE.txt",)),
    StyleSpec("openmoji-line", "openmoji", "17.0.0", "black/svg", "codepoint", ".svg",
              "OpenMoji black line art (HfG Schwaebisch Gmuend and contributors)", "CC-BY-SA-4.0",
              ("LICENSE.txt",)),
    StyleSpec("fluent-flat", "fluentui-emoji", "1.3.0", "icons/flat", "name", ".svg",
              "Fluent Emoji flat (Microsoft), packaged by Mohammad Abu Mattar", "MIT", ("LICENSE",)),
    StyleSpec("fluent-3d", "@lobehub/fluent-emoji-3d", "1.1.0", "assets", "codepoint", ".webp",
              "Fluent Emoji 3D (Microsoft), packaged by LobeHub", "MIT", ("LICENSE",)),
    StyleSpec("fluent-contrast", "fluentui-emoji", "1.3.0", "icons/high-contrast", "name", ".svg",
              "Fluent Emoji high contrast (Microsoft), packaged by Mohammad Abu Mattar", "MIT", ("LICENSE",)),
)}
ALL_STYLES = tuple(STYLES)
# Styles no training (VAE, UNet, probes, metric heads) may use: they test unseen-style transfer.
HELDOUT_STYLES = ("openmoji-line", "fluent-contrast")
# Other emoji-datasource vendors the builder still accepts (not redistributable: check first).
EXTRA_VENDORS: dict[str, tuple[str, str]] = {
    "facebook": ("Facebook emoji", "proprietary: check before redistributing"),
    "apple": ("Apple Color Emoji", "proprietary: check before redistributing"),
}


def spec_of(style: str) -> StyleSpec:
    """The StyleSpec of a style name, including the extra emoji-datasource vendors."""
    if style in STYLES:
        return STYLES[style]
    if style in EXTRA_VENDORS:
        artwork, licence = EXTRA_VENDORS[style]
        return StyleSpec(style, f"{DATASOURCE_PREFIX}{style}", "16.0.0", f"img/{style}/64", "datasource", ".png",
                         artwork, licence, ("LICENSE",))
    raise ConsistentDiffusionError(f"unknown style {style!r}; known: {', '.join((*STYLES, *EXTRA_VENDORS))}")


def package_root(folder: Path) -> Path:
    """The folder holding package.json: ``folder`` or its ``package`` child (an extracted tarball)."""
    return folder / "package" if (folder / "package" / "package.json").is_file() else folder


def styles_of_package(folder: Path) -> tuple[Path, dict, list[StyleSpec]]:
    """(root, package.json, styles it draws) of an extracted package folder."""
    root = package_root(folder)
    manifest = root / "package.json"
    if not manifest.is_file():
        raise ConsistentDiffusionError(f"{folder} is not an extracted npm package (no package.json)")
    info = json.loads(manifest.read_text())
    name = str(info.get("name", ""))
    if name.startswith(DATASOURCE_PREFIX):
        specs = [spec_of(name[len(DATASOURCE_PREFIX):])]
        if not (root / "emoji.json").is_file():
            raise ConsistentDiffusionError(f"{folder}: an emoji-datasource package needs emoji.json")
    else:
        specs = [s for s in STYLES.values() if s.package == name]
    if not specs:
        known = sorted({s.package for s in STYLES.values()}) + [f"{DATASOURCE_PREFIX}<vendor>"]
        raise ConsistentDiffusionError(f"{folder}: package {name!r} draws no known style ({', '.join(known)})")
    for spec in specs:
        if not (root / spec.folder).is_dir():
            raise ConsistentDiffusionError(f"{folder}: no {spec.style} artwork folder {spec.folder}")
    return root, info, specs


# ----------------------------------------------------------------------------- keys


def codepoint_key(code: str | None) -> str | None:
    """'2764-fe0f' / '002A-FE0F-20E3' / '1F600' -> '2764' / '2A-20E3' / '1F600'; None if not hex."""
    if not code:
        return None
    try:
        values = [int(part, 16) for part in re.split(r"[-_ ]", code.strip()) if part]
    except ValueError:
        return None
    values = [v for v in values if v not in DROPPED_CODEPOINTS]
    return "-".join(f"{v:X}" for v in values) or None


def name_key(name: str | None) -> str | None:
    """'Grinning Face' / 'grinning-face' / 'FACE_WITH:TEARS' -> 'grinning face' / ... / 'face with tears'."""
    if not name:
        return None
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    words = re.sub(r"[^a-z0-9]+", " ", ascii_name.lower().replace("&", " and ")).split()
    return " ".join(words) or None


def has_skin_tone(key: str) -> bool:
    return any(tone in key.split("-") for tone in SKIN_TONES)


# ----------------------------------------------------------------------------- file indexes


def codepoint_index(folder: Path, ext: str) -> dict[str, Path]:
    """{code point key: file} of the artwork files named by code point (first file per key, sorted)."""
    index: dict[str, Path] = {}
    for path in sorted(folder.glob(f"*{ext}")):
        key = codepoint_key(path.stem)
        if key is not None:
            index.setdefault(key, path)
    return index


def name_index(folder: Path, ext: str) -> dict[str, Path]:
    """{name key: file} of kebab-case named files; skin-tone variants (``-light``... beside a
    ``-default`` file) are skipped and ``-default`` is stripped."""
    stems = {p.stem: p for p in sorted(folder.glob(f"*{ext}"))}
    index: dict[str, Path] = {}
    for stem, path in stems.items():
        base = stem
        if stem.endswith("-default"):
            base = stem[: -len("-default")]
        else:
            tone = next((t for t in FLUENT_TONE_SUFFIXES if stem.endswith(t)), None)
            if tone and f"{stem[: -len(tone)]}-default" in stems:
                continue
        key = name_key(base)
        if key is not None:
            index.setdefault(key, path)
    return index


def cldr_names(roots: list[Path]) -> dict[str, str]:
    """{code point key: CLDR name} from OpenMoji's data/openmoji.json in any of ``roots``."""
    names: dict[str, str] = {}
    for root in roots:
        table = root / "data" / "openmoji.json"
        if table.is_file():
            for row in json.loads(table.read_text(encoding="utf-8")):
                key = codepoint_key(row.get("hexcode"))
                if key and row.get("annotation"):
                    names.setdefault(key, str(row["annotation"]))
    return names


# ----------------------------------------------------------------------------- matching


@dataclass
class StyleMatch:
    """Which identity each file of one style is: ``files`` maps emoji.json ``unified`` -> file."""

    style: str
    files: dict[str, Path]
    unmatched: list[str]  # file stems of this style that no identity took (skin tones excluded)


def match_datasource(spec: StyleSpec, root: Path, entries: list[dict]) -> StyleMatch:
    """emoji-datasource: an entry is drawn when ``has_img_<vendor>`` is set and its file exists."""
    folder = root / spec.folder
    files = {
        e["unified"]: folder / e["image"] for e in entries
        if e.get(f"has_img_{spec.style}") and (folder / e["image"]).is_file()
    }
    return StyleMatch(spec.style, files, [])


def match_codepoints(spec: StyleSpec, root: Path, entries: list[dict]) -> StyleMatch:
    """Files named by code point: match on the normalised key of ``unified`` or ``non_qualified``."""
    index = codepoint_index(root / spec.folder, spec.ext)
    files: dict[str, Path] = {}
    for entry in entries:
        for code in (entry["unified"], entry.get("non_qualified")):
            key = codepoint_key(code)
            if key in index and entry["unified"] not in files:
                files[entry["unified"]] = index[key]
    taken = set(files.values())
    unmatched = sorted(p.stem for k, p in index.items() if p not in taken and not has_skin_tone(k))
    return StyleMatch(spec.style, files, unmatched)


def name_candidates(entry: dict, cldr: dict[str, str]) -> list[list[str]]:
    """Names to try per pass: [CLDR name], [Unicode name], [short names]."""
    short = [entry.get("short_name"), *(entry.get("short_names") or [])]
    passes = [[cldr.get(codepoint_key(entry["unified"]) or "")], [entry.get("name")], short]
    return [[k for k in (name_key(n) for n in names) if k] for names in passes]


def match_names(spec: StyleSpec, root: Path, entries: list[dict], cldr: dict[str, str]) -> StyleMatch:
    """Files named by name: the alias table, then several passes over all identities, each file taken once."""
    index = name_index(root / spec.folder, spec.ext)
    candidates = [name_candidates(e, cldr) for e in entries]
    files: dict[str, Path] = {}
    taken: set[str] = set()
    by_code = {codepoint_key(e["unified"]): e["unified"] for e in entries}
    for key, code in FLUENT_NAME_ALIASES.items():
        unified = by_code.get(codepoint_key(code))
        if key in index and unified is not None and unified not in files:
            files[unified] = index[key]
            taken.add(key)
    for level in range(3):
        for entry, names in zip(entries, candidates, strict=True):
            if entry["unified"] in files:
                continue
            key = next((k for k in names[level] if k in index and k not in taken), None)
            if key is not None:
                files[entry["unified"]] = index[key]
                taken.add(key)
    unmatched = sorted(index[k].stem for k in index if k not in taken)
    return StyleMatch(spec.style, files, unmatched)


def match_style(spec: StyleSpec, root: Path, entries: list[dict], cldr: dict[str, str]) -> StyleMatch:
    """Which entries ``spec``'s package draws, and which of its files matched none."""
    if spec.match == "datasource":
        return match_datasource(spec, root, entries)
    if spec.match == "codepoint":
        return match_codepoints(spec, root, entries)
    return match_names(spec, root, entries, cldr)
