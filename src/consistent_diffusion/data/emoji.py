"""The emoji dataset: the same concepts drawn in several house styles, with known labels.

Seven house styles come from npm packages (see ``data.styles.STYLES``): google (Noto) and twitter
(Twemoji) as 64 px PNGs from ``emoji-datasource-<vendor>``, openmoji (colour) and openmoji-line
(black line art) as SVG from ``openmoji``, fluent-flat and fluent-contrast (monochrome) as SVG from
``fluentui-emoji``, fluent-3d as WebP from ``@lobehub/fluent-emoji-3d``. Identities, names and
categories come from ``emoji.json`` (emoji-data) of an emoji-datasource package; every style's
files are matched to them (by code point, or by normalised name, see ``data.styles``). SVG is
rasterised with resvg; everything is composited on white at 64x64 and stored as one uint8 array
``images.npy`` of shape (N, 64, 64, 3), plus ``labels.json`` (one record per row: style,
identity, name, category, subcategory, caption, split, style_split) and ``DATASET_CARD.md``.
An identity is kept when at least ``min_styles`` of the chosen styles draw it (with google and
twitter only: when both do, the rule this dataset has always had).

Skin-tone variants are dropped: each is the same identity and caption as its base emoji with a
different skin colour, so keeping them would add 5 near-duplicates for ~400 people emoji only,
skew category counts towards "People & Body" and give captions that cannot tell them apart.
The "Component" category (bare skin-tone swatches and hair parts) is dropped for the same reason.

The split is by identity (whole emoji, in every style) and a deterministic function of its code
point: ``holdout`` identities (a hash of the code point below ``holdout_fraction``, among the
subject categories) never enter any training (they are the "new subjects" for DreamBooth and
novel-concept tests), ``val`` identities are for measuring generalisation, the rest is ``train``.
The default ``holdout_fraction`` is pinned so that today's 40 holdout identities of the
google + twitter dataset stay exactly the holdout identities (the bench's references).

Held-out styles (``style_split == "heldout"``, default openmoji-line and fluent-contrast) are in
the dataset to measure unseen-style transfer only: training code selects rows with
``EmojiDataset.trainable`` / ``trainable_rows`` (train split AND a trained style).

Captions are ``"<name>, <style> style"``; for a deterministic ``unstyled_caption_fraction`` of the
training rows (a hash of identity and style) just ``"<name>"``, so the model learns to draw a good
emoji from a prompt without a style word.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.outputs import atomic_output_dir
from consistent_diffusion.data.emoji_card import SPLITS, build_summary, dataset_card  # noqa: F401  (re-exported)
from consistent_diffusion.data.emoji_sources import (  # noqa: F401  (re-exported: the module's old names)
    DEFAULT_NPM_VERSION,
    DEFAULT_STYLES,
    describe_source,
    describe_sources,
    npm_pack,
    package_slug,
    resolve_sources,
)
from consistent_diffusion.data.raster import IMAGE_SIZE, read_artwork
from consistent_diffusion.data.styles import (
    DATASOURCE_PREFIX,
    EXTRA_VENDORS,
    HELDOUT_STYLES,
    STYLES,
    StyleMatch,
    cldr_names,
    codepoint_key,
    match_style,
    spec_of,
)

DROPPED_CATEGORIES = ("Component",)
# Categories holdout identities are drawn from: recognisable subjects, not flags or symbols.
HOLDOUT_CATEGORIES = ("Smileys & Emotion", "Animals & Nature", "Food & Drink", "Objects",
                      "Travel & Places", "Activities", "People & Body")
# An identity of HOLDOUT_CATEGORIES is holdout when its hash is below this. Pinned between the
# 40th (0.027395) and 41st (0.027689) hash of today's google + twitter dataset (emoji-datasource
# 16.0.0, 1412 candidates): those 40 identities stay holdout, in every build.
HOLDOUT_FRACTION = 0.0275
UNSTYLED_CAPTION_FRACTION = 0.25
TRAINED, HELDOUT = "trained", "heldout"

# What each vendor's artwork is and how it is licensed (kept for callers of the two-style era).
VENDOR_INFO: dict[str, dict[str, str]] = {
    **{s: {"artwork": spec_of(s).artwork, "licence": spec_of(s).licence} for s in (*STYLES, *EXTRA_VENDORS)},
}


@dataclass
class EmojiDatasetConfig:
    """How to build the dataset."""

    out: Path  # output folder (written atomically: temp folder + rename)
    sources: list[Path] = field(default_factory=list)  # extracted package folders; empty: npm pack
    styles: tuple[str, ...] | None = None  # None: every style of ``sources``, or DEFAULT_STYLES (all seven) via npm
    npm_version: str = DEFAULT_NPM_VERSION  # emoji-datasource version to npm pack
    cache: Path | None = None  # where npm tarballs and extracted packages go
    holdout_fraction: float = HOLDOUT_FRACTION  # hash threshold of holdout identities (subject categories)
    val_fraction: float = 0.05  # fraction of remaining identities used for validation
    heldout_styles: tuple[str, ...] = HELDOUT_STYLES  # styles no training may use
    unstyled_caption_fraction: float = UNSTYLED_CAPTION_FRACTION  # training rows captioned "<name>" only
    min_styles: int = 2  # keep identities drawn by at least this many of the chosen styles
    seed: str = "consistent-diffusion-emoji-v1"  # salt of the split and caption hashes
    overwrite: bool = False  # replace an existing output folder

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.sources = [Path(s) for s in self.sources]
        self.styles = tuple(self.styles) if self.styles is not None else None
        self.heldout_styles = tuple(self.heldout_styles)
        if self.styles is not None and not self.styles:
            raise ConfigError("give at least one style or one --from package folder")
        for style in (*(self.styles or ()), *self.heldout_styles):
            if style not in STYLES and style not in EXTRA_VENDORS:
                raise ConfigError(f"unknown style {style!r}; known: {', '.join((*STYLES, *EXTRA_VENDORS))}")
        if self.styles is not None and len(set(self.styles)) != len(self.styles):
            raise ConfigError(f"each style may be given once, got {list(self.styles)}")
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.unstyled_caption_fraction <= 1.0:
            raise ConfigError(f"unstyled_caption_fraction must be in [0, 1], got {self.unstyled_caption_fraction}")
        if self.min_styles < 1:
            raise ConfigError(f"min_styles must be >= 1, got {self.min_styles}")


def is_trainable(record: dict, split: str = "train") -> bool:
    """Whether a row may be used to train anything: its identity split AND a trained style."""
    return record["split"] == split and record.get("style_split", TRAINED) == TRAINED


def trainable_rows(records: list[dict], split: str = "train") -> np.ndarray:
    """Row indices of ``split`` in trained styles: what the VAE, UNet, probes and heads train on."""
    return np.asarray([i for i, r in enumerate(records) if is_trainable(r, split)], dtype=np.int64)


@dataclass
class EmojiDataset:
    """A loaded dataset: images (N, 64, 64, 3) uint8 RGB on white, and one label dict per row."""

    images: np.ndarray
    records: list[dict]
    meta: dict

    def indices(self, split: str | None = None, style: str | None = None) -> np.ndarray:
        """Row indices of one split and/or style (None: any), held-out styles included."""
        keep = [
            i for i, r in enumerate(self.records)
            if (split is None or r["split"] == split) and (style is None or r["style"] == style)
        ]
        return np.asarray(keep, dtype=np.int64)

    def trainable(self, split: str = "train") -> np.ndarray:
        """Row indices of ``split`` in trained styles (never a held-out style): the rows to train on."""
        return trainable_rows(self.records, split)

    @property
    def styles(self) -> list[str]:
        return list(self.meta["styles"])

    @property
    def trained_styles(self) -> list[str]:
        return [s for s in self.styles if s not in self.heldout_styles]

    @property
    def heldout_styles(self) -> list[str]:
        return list(self.meta.get("heldout_styles", []))

    @property
    def categories(self) -> list[str]:
        return list(self.meta["categories"])


def load_emoji_dataset(folder: str | os.PathLike) -> EmojiDataset:
    """Read a folder written by ``build_emoji_dataset`` (older folders: every style is trained)."""
    folder = Path(folder)
    if not (folder / "images.npy").is_file() or not (folder / "labels.json").is_file():
        raise ConsistentDiffusionError(
            f"{folder} is not an emoji dataset (needs images.npy and labels.json); "
            "make one with: consistent-diffusion data emoji --out DIR"
        )
    images = np.load(folder / "images.npy", mmap_mode=None)
    labels = json.loads((folder / "labels.json").read_text())
    heldout = set(labels["meta"].get("heldout_styles", []))
    for record in labels["records"]:
        record.setdefault("style_split", HELDOUT if record["style"] in heldout else TRAINED)
    return EmojiDataset(images=images, records=labels["records"], meta=labels["meta"])


# ----------------------------------------------------------------------------- sources


# ----------------------------------------------------------------------------- records


def clean_name(name: str) -> str:
    """'NEGATIVE SQUARED AB' / 'Egypt Flag' -> lower-case, single-spaced caption text."""
    return " ".join(name.replace("_", " ").split()).lower()


def split_of(identity: str, holdout: set[str], val: set[str]) -> str:
    return "holdout" if identity in holdout else "val" if identity in val else "train"


def _hash01(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def identity_split(entry: dict, config: EmojiDatasetConfig) -> str:
    """'holdout' / 'val' / 'train' of one emoji.json entry: a function of its code point (and category)."""
    code = entry["unified"]
    if entry["category"] in HOLDOUT_CATEGORIES and _hash01(code, config.seed + ":holdout") < config.holdout_fraction:
        return "holdout"
    return "val" if _hash01(code, config.seed + ":val") < config.val_fraction else "train"


def choose_splits(entries: list[dict], config: EmojiDatasetConfig) -> tuple[set[str], set[str]]:
    """Deterministic (holdout, val) identity sets: the hash of each code point decides."""
    splits = {e["unified"]: identity_split(e, config) for e in entries}
    return {c for c, s in splits.items() if s == "holdout"}, {c for c, s in splits.items() if s == "val"}


def caption_of(name: str, style: str, identity: str, trained_row: bool, config: EmojiDatasetConfig) -> str:
    """'<name>, <style> style', or '<name>' for a hashed ``unstyled_caption_fraction`` of training rows."""
    if trained_row and _hash01(f"{identity}|{style}", config.seed + ":caption") < config.unstyled_caption_fraction:
        return name
    return f"{name}, {style} style"


def identity_table(sources: list[dict]) -> list[dict]:
    """Base emoji of emoji.json (no skin-tone variants, no components), in sort order."""
    tables = [s["root"] / "emoji.json" for s in sources if s["package"].startswith(DATASOURCE_PREFIX)]
    if not tables:
        raise ConfigError("names and categories come from emoji.json: include an emoji-datasource style "
                          "(google or twitter) in the build")
    table = json.loads(tables[0].read_text())
    return [
        e for e in sorted(table, key=lambda e: e.get("sort_order", 0))
        if e.get("category") not in DROPPED_CATEGORIES and e.get("name")
    ]


def match_sources(sources: list[dict], entries: list[dict]) -> list[StyleMatch]:
    """Each source's files matched to the emoji.json entries (OpenMoji's CLDR names help name matching)."""
    cldr = cldr_names([s["root"] for s in sources])
    return [match_style(spec_of(s["style"]), s["root"], entries, cldr) for s in sources]


def common_entries(sources: list[dict], matches: list[StyleMatch] | None = None, min_styles: int = 0) -> list[dict]:
    """Entries drawn by at least ``min_styles`` sources (0: by every source), in sort order."""
    entries = identity_table(sources)
    matches = matches if matches is not None else match_sources(sources, entries)
    need = len(sources) if min_styles <= 0 else min(min_styles, len(sources))
    keep = [e for e in entries if sum(e["unified"] in m.files for m in matches) >= need]
    if not keep:
        raise ConsistentDiffusionError(f"no emoji is drawn by {need} of the given sources")
    return keep


def read_png(path: Path) -> np.ndarray:
    """A 64 px PNG -> (64, 64, 3) uint8 RGB on white."""
    return read_artwork(path, IMAGE_SIZE)


# ----------------------------------------------------------------------------- build


def caption_name(entry: dict, cldr: dict[str, str]) -> str:
    """The name captions use: the emoji's CLDR short name (OpenMoji's annotation) where there is one,
    else its Unicode name. CLDR names what people see and type ("red heart"); Unicode names can
    contradict the drawing (U+2764 RED HEART is "HEAVY BLACK HEART") or be cryptic ("NEGATIVE SQUARED AB")."""
    return clean_name(cldr.get(codepoint_key(entry["unified"]) or "") or entry["name"])


def caption_name_counts(entries: list[dict], cldr: dict[str, str]) -> dict[str, int]:
    """How many identities are captioned by their CLDR name and how many by their Unicode name."""
    named = sum(codepoint_key(e["unified"]) in cldr for e in entries)
    return {"cldr": named, "unicode": len(entries) - named}


def make_record(entry: dict, style: str, split: str, style_split: str, config: EmojiDatasetConfig,
                cldr: dict[str, str] | None = None) -> dict:
    name = caption_name(entry, cldr or {})
    trained_row = split == "train" and style_split == TRAINED
    return {
        "style": style,
        "identity": entry["unified"].lower(),
        "name": name,
        "unicode_name": clean_name(entry["name"]),
        "short_name": entry.get("short_name", ""),
        "category": entry["category"],
        "subcategory": entry.get("subcategory", ""),
        "caption": caption_of(name, style, entry["unified"], trained_row, config),
        "split": split,
        "style_split": style_split,
    }


def matching_summary(table: list[dict], matches: list[StyleMatch]) -> dict:
    """How many identities of emoji.json have 1..K of the styles (those with fewer than ``min_styles``
    are dropped), and each style's drawn / unmatched file counts."""
    per_identity = Counter(sum(e["unified"] in m.files for m in matches) for e in table)
    return {
        "identities_by_style_count": {str(k): per_identity[k] for k in range(1, len(matches) + 1)},
        "drawn": {m.style: len(m.files) for m in matches},
        "unmatched_files": {m.style: len(m.unmatched) for m in matches},
        "unmatched_examples": {m.style: m.unmatched[:12] for m in matches if m.unmatched},
    }


def build_emoji_dataset(config: EmojiDatasetConfig, log=None) -> Path:
    """Build the dataset folder (images.npy, labels.json, DATASET_CARD.md) atomically."""
    if config.out.exists() and not config.overwrite:
        raise ConfigError(f"{config.out} already exists; remove it or pass --overwrite")
    start = time.perf_counter()
    sources = resolve_sources(config.sources, config.styles, config.cache, config.npm_version)
    table = identity_table(sources)
    matches = match_sources(sources, table)
    entries = common_entries(sources, matches, config.min_styles)
    cldr = cldr_names([s["root"] for s in sources])
    styles = [s["style"] for s in sources]
    heldout = [s for s in styles if s in config.heldout_styles]
    images, records = [], []
    for source, match in zip(sources, matches, strict=True):
        style = source["style"]
        style_split = HELDOUT if style in heldout else TRAINED
        for entry in entries:
            if entry["unified"] in match.files:
                images.append(read_artwork(match.files[entry["unified"]], IMAGE_SIZE))
                records.append(make_record(entry, style, identity_split(entry, config), style_split, config, cldr))
    meta = {
        "format": "consistent-diffusion emoji dataset v2",
        "image_size": IMAGE_SIZE,
        "styles": styles,
        "heldout_styles": heldout,
        "categories": sorted({r["category"] for r in records}),
        "sources": [{k: v for k, v in s.items() if k != "root"} for s in sources],
        "split_seed": config.seed,
        "holdout_fraction": config.holdout_fraction,
        "val_fraction": config.val_fraction,
        "unstyled_caption_fraction": config.unstyled_caption_fraction,
        "caption_names": caption_name_counts(entries, cldr),
        "min_styles": config.min_styles,
        "matching": matching_summary(table, matches),
        "licences": licence_texts(sources),
    }
    write_dataset(config.out, np.stack(images), records, meta, config.overwrite)
    meta["build_seconds"] = round(time.perf_counter() - start, 1)
    if log is not None:
        log(build_summary(records, meta))
    return config.out


def licence_texts(sources: list[dict]) -> dict[str, str]:
    """{package: licence file text} for every package of the build (quoted in the dataset card)."""
    texts: dict[str, str] = {}
    for source in sources:
        spec = spec_of(source["style"])
        for name in spec.licence_files:
            path = source["root"] / name
            if path.is_file() and source["package"] not in texts:
                texts[source["package"]] = path.read_text(encoding="utf-8", errors="replace").strip()
    return texts


def write_dataset(out: Path, images: np.ndarray, records: list[dict], meta: dict, overwrite: bool) -> None:
    """Write everything into a temp sibling folder, then rename it into place."""
    with atomic_output_dir(out, overwrite=overwrite) as temp:
        np.save(temp / "images.npy", images)
        (temp / "labels.json").write_text(json.dumps({"meta": meta, "records": records}, indent=0))
        (temp / "DATASET_CARD.md").write_text(dataset_card(records, meta))


