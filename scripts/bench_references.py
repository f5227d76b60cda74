"""Write the bench suites' reference images (and their attribution) from the emoji dataset.

Every reference is a real emoji of an identity the UNet never trained on: a **holdout identity**
(never used to train the embedded model, its probes or its metric heads) or a **val identity**
(never trained on either; the metric heads' settings were chosen on val), in one of the seven
house styles, 64x64 RGB on white, exactly as the dataset stores it. The held-out styles
(openmoji-line, fluent-contrast) give references in a style no prompt can ask for. The tuning
suite's identities and the evaluation suites' are different (``bench.suite_identities``), so no
option is chosen on the suite it is scored on.

    consistent-diffusion data emoji --out data/emoji
    python scripts/bench_references.py --data data/emoji          # rewrites src/.../bench/assets

Which images: every ``references`` entry of the built-in suites (``<name>_<style>.png``, the
emoji's name with spaces as underscores), looked up among the dataset's holdout and val records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_diffusion.core.images import save_png_atomic
from consistent_diffusion.core.outputs import write_text_atomic

ASSETS = Path(__file__).resolve().parents[1] / "src" / "consistent_diffusion" / "bench" / "assets"

SUITES = ASSETS.parent / "suites"
UNSEEN_SPLITS = ("holdout", "val")  # identities the UNet never trained on

LICENCES = {  # style -> (credit, licence, package)
    "google": ("Noto Emoji, Copyright Google Inc.", "Apache-2.0", "emoji-datasource-google"),
    "twitter": ("Twemoji, Copyright Twitter, Inc. and other contributors",
                "CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/)", "emoji-datasource-twitter"),
    "openmoji": ("OpenMoji, the open-source emoji and icon project", "CC-BY-SA-4.0", "openmoji (color/svg)"),
    "openmoji-line": ("OpenMoji, the open-source emoji and icon project", "CC-BY-SA-4.0", "openmoji (black/svg)"),
    "fluent-flat": ("Fluent Emoji, Copyright Microsoft Corporation", "MIT", "fluentui-emoji (icons/flat)"),
    "fluent-3d": ("Fluent Emoji 3D, Copyright Microsoft Corporation", "MIT", "@lobehub/fluent-emoji-3d"),
    "fluent-contrast": ("Fluent Emoji high contrast, Copyright Microsoft Corporation", "MIT",
                        "fluentui-emoji (icons/high-contrast)"),
}


def file_name(name: str, style: str) -> str:
    """``<name>_<style>.png`` with spaces and punctuation as underscores: ``hiking_boot_fluent-3d.png``
    (the suites' naming)."""
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    return f"{slug}_{style}.png"


def suite_references() -> dict[str, list[str]]:
    """Reference file name -> the built-in suites that use it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    used: dict[str, list[str]] = {}
    for path in sorted(SUITES.glob("*.toml")):
        for task in tomllib.loads(path.read_text(encoding="utf-8")).get("tasks", ()):
            for reference in task.get("references", ()):
                suites = used.setdefault(Path(reference).name, [])
                if path.stem not in suites:
                    suites.append(path.stem)
    return used


def attribution(rows: list[dict[str, str]], versions: dict[str, str]) -> str:
    lines = ["# Bench reference images", "",
             "Real emoji of identities the UNet never trained on: the dataset's **holdout identities** (never",
             "used to train the embedded model, its probes or its metric heads) and its **val identities**",
             "(never trained on either; the metric heads' settings were chosen on val), 64x64 RGB composited",
             "on white, written by",
             "`scripts/bench_references.py` from `consistent-diffusion data emoji`. The openmoji-line and",
             "fluent-contrast images are in the two held-out styles, which nothing was trained on.", "",
             "| file | emoji | code point | split | style | used by |", "|---|---|---|---|---|---|"]
    lines += [f"| `{r['file']}` | {r['name']} | {r['identity']} | {r['split']} | {r['style']} | {r['suite']} |"
              for r in rows]
    lines += ["", "Licences, by style:", ""]
    for style in sorted({r["style"] for r in rows}):
        credit, licence, package = LICENCES[style]
        version = versions.get(style, "")
        lines.append(f"- **{style}**: {credit}, licensed under {licence}. From the `{package}` package"
                     f"{' ' + version if version else ''}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an emoji dataset folder (consistent-diffusion data emoji)")
    parser.add_argument("--out", default=str(ASSETS), help="where to write (default: the package's bench assets)")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    labels = json.loads((data / "labels.json").read_text(encoding="utf-8"))
    images = np.load(data / "images.npy", mmap_mode="r")
    versions = {s["style"]: s.get("version", "") for s in labels["meta"].get("sources", [])}
    unseen = {file_name(r["name"], r["style"]): (i, r) for i, r in enumerate(labels["records"])
              if r["split"] in UNSEEN_SPLITS}
    wanted = suite_references()
    missing = sorted(set(wanted) - set(unseen))
    if missing:
        raise SystemExit(f"not holdout or val images of {data}: {', '.join(missing)}")
    for old in out.glob("*.png"):
        old.unlink()
    rows = []
    for name, suites in sorted(wanted.items()):
        i, record = unseen[name]
        save_png_atomic(Image.fromarray(np.asarray(images[i])), out / name)
        rows.append({"file": name, "name": record["name"], "style": record["style"], "suite": ", ".join(suites),
                     "split": record["split"],
                     "identity": "U+" + record["identity"].upper().replace("-", " U+")})
    write_text_atomic(attribution(rows, versions), out / "ATTRIBUTION.md")
    print(f"wrote {len(rows)} references and ATTRIBUTION.md to {out}")


if __name__ == "__main__":
    main()
