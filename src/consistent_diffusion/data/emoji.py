"""The emoji dataset: the same concepts drawn in several house styles, with known labels.

Sources are the npm packages ``emoji-datasource-<vendor>`` (one per house style): each holds
``emoji.json`` (names, category, subcategory, skin-tone variations) and ``img/<vendor>/64/*.png``
(64x64 RGBA). We keep the base emoji that every chosen vendor draws, composite them on white and
store them as one uint8 array ``images.npy`` of shape (N, 64, 64, 3), plus ``labels.json`` (one
record per row: style, identity, name, category, subcategory, caption, split) and
``DATASET_CARD.md``.

Skin-tone variants are dropped: each is the same identity and caption as its base emoji with a
different skin colour, so keeping them would add 5 near-duplicates for ~400 people emoji only,
skew category counts towards "People & Body" and give captions that cannot tell them apart.
The "Component" category (bare skin-tone swatches and hair parts) is dropped for the same reason.

The split is by identity (whole emoji, in every style), deterministic (a hash of the code point):
``holdout`` identities never enter any training (they are the "new subjects" for DreamBooth and
novel-concept tests), ``val`` identities are for measuring generalisation, the rest is ``train``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.core.images import to_rgb
from consistent_diffusion.core.outputs import atomic_output_dir

DEFAULT_VENDORS = ("google", "twitter")
DEFAULT_NPM_VERSION = "16.0.0"
IMAGE_SIZE = 64
SPLITS = ("train", "val", "holdout")
DROPPED_CATEGORIES = ("Component",)
# Categories holdout identities are drawn from: recognisable subjects, not flags or symbols.
HOLDOUT_CATEGORIES = ("Smileys & Emotion", "Animals & Nature", "Food & Drink", "Objects",
                      "Travel & Places", "Activities", "People & Body")

# What each vendor's artwork is and how it is licensed (emoji.json itself is MIT, emoji-data).
VENDOR_INFO: dict[str, dict[str, str]] = {
    "google": {"artwork": "Noto Emoji (Google)", "licence": "Apache-2.0"},
    "twitter": {"artwork": "Twemoji (Twitter, Inc. and other contributors)", "licence": "CC-BY-4.0"},
    "facebook": {"artwork": "Facebook emoji", "licence": "proprietary: check before redistributing"},
    "apple": {"artwork": "Apple Color Emoji", "licence": "proprietary: check before redistributing"},
}


@dataclass
class EmojiDatasetConfig:
    """How to build the dataset."""

    out: Path  # output folder (written atomically: temp folder + rename)
    sources: list[Path] = field(default_factory=list)  # extracted package folders; empty: npm pack
    vendors: tuple[str, ...] = DEFAULT_VENDORS  # used when sources is empty
    npm_version: str = DEFAULT_NPM_VERSION  # package version to npm pack
    cache: Path | None = None  # where npm tarballs and extracted packages go
    holdout_identities: int = 40  # whole emoji kept out of all training
    val_fraction: float = 0.05  # fraction of remaining identities used for validation
    seed: str = "consistent-diffusion-emoji-v1"  # salt of the split hash
    overwrite: bool = False  # replace an existing output folder

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.sources = [Path(s) for s in self.sources]
        self.vendors = tuple(self.vendors)
        if not self.sources and not self.vendors:
            raise ConfigError("give at least one vendor or one --from package folder")
        if self.holdout_identities < 0:
            raise ConfigError(f"holdout_identities must be >= 0, got {self.holdout_identities}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")


@dataclass
class EmojiDataset:
    """A loaded dataset: images (N, 64, 64, 3) uint8 RGB on white, and one label dict per row."""

    images: np.ndarray
    records: list[dict]
    meta: dict

    def indices(self, split: str | None = None, style: str | None = None) -> np.ndarray:
        """Row indices of one split and/or style (None: any)."""
        keep = [
            i for i, r in enumerate(self.records)
            if (split is None or r["split"] == split) and (style is None or r["style"] == style)
        ]
        return np.asarray(keep, dtype=np.int64)

    @property
    def styles(self) -> list[str]:
        return list(self.meta["styles"])

    @property
    def categories(self) -> list[str]:
        return list(self.meta["categories"])


def load_emoji_dataset(folder: str | os.PathLike) -> EmojiDataset:
    """Read a folder written by ``build_emoji_dataset``."""
    folder = Path(folder)
    if not (folder / "images.npy").is_file() or not (folder / "labels.json").is_file():
        raise ConsistentDiffusionError(
            f"{folder} is not an emoji dataset (needs images.npy and labels.json); "
            "make one with: consistent-diffusion data emoji --out DIR"
        )
    images = np.load(folder / "images.npy", mmap_mode=None)
    labels = json.loads((folder / "labels.json").read_text())
    return EmojiDataset(images=images, records=labels["records"], meta=labels["meta"])


# ----------------------------------------------------------------------------- sources


def npm_pack(package: str, version: str, cache: Path) -> Path:
    """Fetch ``package@version`` with the npm client into ``cache``; return the extracted folder.

    The folder returned is the package root (holding ``package.json``). Reuses earlier downloads.
    """
    target = cache / f"{package}-{version}"
    if (target / "package" / "package.json").is_file():
        return target / "package"
    if shutil.which("npm") is None:
        raise ConsistentDiffusionError(
            "npm is not installed, so the emoji packages cannot be fetched. Either install Node.js/npm, "
            f"or fetch and extract them elsewhere (npm pack {package}@{version}; tar xzf the .tgz) and "
            "pass the extracted 'package' folders with --from DIR (once per vendor)."
        )
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{package}-{version}.tgz"
    if not tarball.is_file():
        result = subprocess.run(
            ["npm", "pack", f"{package}@{version}", "--pack-destination", str(cache)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0 or not tarball.is_file():
            raise ConsistentDiffusionError(
                f"npm pack {package}@{version} failed: {result.stderr.strip()[-400:]}; "
                "fetch it elsewhere and pass the extracted folder with --from DIR"
            )
    temp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(temp, filter="data")
        os.replace(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target / "package"


def describe_source(folder: Path) -> dict:
    """Vendor, package name and version of an extracted ``emoji-datasource-<vendor>`` folder."""
    root = folder / "package" if (folder / "package" / "package.json").is_file() else folder
    manifest = root / "package.json"
    if not manifest.is_file() or not (root / "emoji.json").is_file():
        raise ConsistentDiffusionError(
            f"{folder} is not an extracted emoji-datasource package (needs package.json and emoji.json)"
        )
    info = json.loads(manifest.read_text())
    name = str(info.get("name", ""))
    prefix = "emoji-datasource-"
    if not name.startswith(prefix):
        raise ConsistentDiffusionError(f"{folder}: package {name!r} is not an emoji-datasource-<vendor> package")
    vendor = name[len(prefix):]
    if not (root / "img" / vendor / "64").is_dir():
        raise ConsistentDiffusionError(f"{folder}: no 64 px images under img/{vendor}/64")
    return {"root": root, "vendor": vendor, "package": name, "version": str(info.get("version", "?"))}


def resolve_sources(config: EmojiDatasetConfig) -> list[dict]:
    """Source descriptions, from ``--from`` folders or from npm packs into the cache."""
    if config.sources:
        folders = config.sources
    else:
        cache = config.cache or Path.home() / ".cache" / "consistent-diffusion" / "npm"
        folders = [npm_pack(f"emoji-datasource-{v}", config.npm_version, Path(cache)) for v in config.vendors]
    sources = [describe_source(Path(f)) for f in folders]
    vendors = [s["vendor"] for s in sources]
    if len(set(vendors)) != len(vendors):
        raise ConfigError(f"each vendor may be given once, got {vendors}")
    return sources


# ----------------------------------------------------------------------------- records


def clean_name(name: str) -> str:
    """'NEGATIVE SQUARED AB' / 'Egypt Flag' -> lower-case, single-spaced caption text."""
    return " ".join(name.replace("_", " ").split()).lower()


def split_of(identity: str, holdout: set[str], val: set[str]) -> str:
    return "holdout" if identity in holdout else "val" if identity in val else "train"


def _hash01(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_splits(entries: list[dict], config: EmojiDatasetConfig) -> tuple[set[str], set[str]]:
    """Deterministic (holdout, val) identity sets: the hash of each code point decides."""
    ranked = sorted(entries, key=lambda e: _hash01(e["unified"], config.seed + ":holdout"))
    candidates = [e["unified"] for e in ranked if e["category"] in HOLDOUT_CATEGORIES]
    holdout = set(candidates[: config.holdout_identities])
    val = {
        e["unified"] for e in entries
        if e["unified"] not in holdout and _hash01(e["unified"], config.seed + ":val") < config.val_fraction
    }
    return holdout, val


def common_entries(sources: list[dict]) -> list[dict]:
    """Base emoji (no skin-tone variants, no components) that every source draws, in sort order."""
    table = json.loads((sources[0]["root"] / "emoji.json").read_text())
    keep = []
    for entry in sorted(table, key=lambda e: e.get("sort_order", 0)):
        if entry.get("category") in DROPPED_CATEGORIES or not entry.get("name"):
            continue
        if all(
            entry.get(f"has_img_{s['vendor']}")
            and (s["root"] / "img" / s["vendor"] / "64" / entry["image"]).is_file()
            for s in sources
        ):
            keep.append(entry)
    if not keep:
        raise ConsistentDiffusionError("no emoji is drawn by every given source")
    return keep


def read_png(path: Path) -> np.ndarray:
    """A 64 px PNG -> (64, 64, 3) uint8 RGB on white."""
    with Image.open(path) as opened:
        image = to_rgb(opened)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


# ----------------------------------------------------------------------------- build


def build_emoji_dataset(config: EmojiDatasetConfig) -> Path:
    """Build the dataset folder (images.npy, labels.json, DATASET_CARD.md) atomically."""
    if config.out.exists() and not config.overwrite:
        raise ConfigError(f"{config.out} already exists; remove it or pass --overwrite")
    sources = resolve_sources(config)
    entries = common_entries(sources)
    holdout, val = choose_splits(entries, config)
    images, records = [], []
    for source in sources:
        vendor = source["vendor"]
        for entry in entries:
            images.append(read_png(source["root"] / "img" / vendor / "64" / entry["image"]))
            name = clean_name(entry["name"])
            records.append({
                "style": vendor,
                "identity": entry["unified"].lower(),
                "name": name,
                "short_name": entry.get("short_name", ""),
                "category": entry["category"],
                "subcategory": entry.get("subcategory", ""),
                "caption": f"{name}, {vendor} style",
                "split": split_of(entry["unified"], holdout, val),
            })
    meta = {
        "format": "consistent-diffusion emoji dataset v1",
        "image_size": IMAGE_SIZE,
        "styles": [s["vendor"] for s in sources],
        "categories": sorted({r["category"] for r in records}),
        "sources": [{k: v for k, v in s.items() if k != "root"} for s in sources],
        "split_seed": config.seed,
        "holdout_identities": config.holdout_identities,
        "val_fraction": config.val_fraction,
    }
    write_dataset(config.out, np.stack(images), records, meta, config.overwrite)
    return config.out


def write_dataset(out: Path, images: np.ndarray, records: list[dict], meta: dict, overwrite: bool) -> None:
    """Write everything into a temp sibling folder, then rename it into place."""
    with atomic_output_dir(out, overwrite=overwrite) as temp:
        np.save(temp / "images.npy", images)
        (temp / "labels.json").write_text(json.dumps({"meta": meta, "records": records}, indent=0))
        (temp / "DATASET_CARD.md").write_text(dataset_card(records, meta))


def count_table(records: list[dict], key: str) -> str:
    """Markdown table of counts of ``key`` per split."""
    counts = Counter((r[key], r["split"]) for r in records)
    values = sorted({r[key] for r in records})
    lines = [f"| {key} | " + " | ".join(SPLITS) + " | total |", "|---|" + "---:|" * (len(SPLITS) + 1)]
    for value in values:
        row = [counts[(value, s)] for s in SPLITS]
        lines.append(f"| {value} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    return "\n".join(lines)


def dataset_card(records: list[dict], meta: dict) -> str:
    """The dataset card: sources, versions, licences, decisions, counts per style/category/split."""
    source_lines = [
        f"- `{s['package']}` {s['version']}: {VENDOR_INFO.get(s['vendor'], {}).get('artwork', s['vendor'])} "
        f"artwork, licence {VENDOR_INFO.get(s['vendor'], {}).get('licence', 'unknown: check the package')}"
        for s in meta["sources"]
    ]
    identities = Counter(r["split"] for r in records if r["style"] == meta["styles"][0])
    holdout_names = sorted({r["name"] for r in records if r["split"] == "holdout"})
    return "\n".join([
        "# Emoji dataset card",
        "",
        "Built by `consistent-diffusion data emoji`. The same emoji drawn in several house styles, "
        "so style and identity are labels we know.",
        "",
        "## Sources and licences",
        *source_lines,
        "- names, categories and subcategories: `emoji.json` from the same packages "
        "(emoji-data by Cal Henderson, MIT).",
        "Attribution for CC-BY-4.0 artwork (Twemoji): Copyright Twitter, Inc. and other contributors, "
        "https://creativecommons.org/licenses/by/4.0/. Noto Emoji: Copyright Google, Apache-2.0.",
        "",
        "## Content",
        f"- {len(records)} images, {meta['image_size']}x{meta['image_size']} RGB composited on white, "
        f"styles: {', '.join(meta['styles'])}; {identities.total()} identities per style.",
        "- captions: `<emoji name in lower case>, <style> style`, e.g. `grinning face, twitter style`.",
        "- labels per image: style, identity (code point), name, short name, category, subcategory, split.",
        "- skin-tone variants dropped: they repeat an identity and caption with another skin colour, "
        "would add five near-duplicates to each of ~400 people emoji (skewing counts towards People & Body) "
        "and their captions cannot tell them apart. The `Component` category (bare skin-tone swatches, hair "
        "parts) is dropped too.",
        "",
        "## Split (by identity, every style together; deterministic hash of the code point)",
        f"- train {identities['train']}, val {identities['val']}, holdout {identities['holdout']} identities "
        "per style.",
        "- holdout identities never enter any training (base model, probes); they serve as new subjects "
        "for DreamBooth and novel concepts. Holdout emoji: " + ", ".join(holdout_names) + ".",
        "",
        "## Counts per style",
        count_table(records, "style"),
        "",
        "## Counts per category",
        count_table(records, "category"),
        "",
    ])
