"""The emoji dataset's card (``DATASET_CARD.md``): counts per split, style matching, sources, licences."""

from __future__ import annotations

from collections import Counter

from consistent_diffusion.data.styles import spec_of

SPLITS = ("train", "val", "holdout")


def count_table(records: list[dict], key: str) -> str:
    """Markdown table of counts of ``key`` per split."""
    counts = Counter((r[key], r["split"]) for r in records)
    values = sorted({r[key] for r in records})
    lines = [f"| {key} | " + " | ".join(SPLITS) + " | total |", "|---|" + "---:|" * (len(SPLITS) + 1)]
    for value in values:
        row = [counts[(value, s)] for s in SPLITS]
        lines.append(f"| {value} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    return "\n".join(lines)


def matching_lines(meta: dict) -> list[str]:
    """Markdown lines: identities per number of styles, unmatched files per style."""
    matching = meta.get("matching")
    if not matching:
        return []
    by_count = matching["identities_by_style_count"]
    lines = ["| styles drawing it | identities |", "|---:|---:|"]
    lines += [f"| {k} | {n} |" for k, n in by_count.items()]
    lines += ["", "| style | identities drawn | files that matched no identity |", "|---|---:|---:|"]
    lines += [f"| {s} | {matching['drawn'][s]} | {matching['unmatched_files'][s]} |" for s in matching["drawn"]]
    for style, examples in matching.get("unmatched_examples", {}).items():
        lines.append(f"- {style}, unmatched examples: {', '.join(examples)}")
    return lines


def build_summary(records: list[dict], meta: dict) -> str:
    """The build's printed summary: matching, rows per style and split, held-out styles."""
    matching = meta.get("matching", {})
    by_count = matching.get("identities_by_style_count", {})
    lines = [
        f"{len(records)} images, styles {', '.join(meta['styles'])} (held out: "
        f"{', '.join(meta.get('heldout_styles', [])) or 'none'}), built in {meta.get('build_seconds', '?')} s",
        "identities by number of styles: " + ", ".join(f"{k}: {n}" for k, n in by_count.items()),
        "files matching no identity: " + ", ".join(f"{s} {n}" for s, n in matching.get("unmatched_files", {}).items()),
        "rows per style and split:",
        count_table(records, "style"),
    ]
    return "\n".join(lines)


def source_line(source: dict) -> str:
    spec = spec_of(source.get("style", source.get("vendor", "")))
    return (f"- {spec.style}: `{source['package']}` {source['version']} (`{source.get('folder', spec.folder)}`), "
            f"{spec.artwork}, artwork licence {spec.licence}")


def licence_section(meta: dict) -> list[str]:
    texts = meta.get("licences", {})
    lines = []
    for package, text in texts.items():
        lines += [f"### `{package}`", "", "```text", text, "```", ""]
    return lines


def dataset_card(records: list[dict], meta: dict) -> str:
    """The dataset card: sources, versions, licences, decisions, matching, counts per style/category/split."""
    styles = meta["styles"]
    heldout = meta.get("heldout_styles", [])
    identities = Counter(r["split"] for r in {r["identity"]: r for r in records}.values())
    holdout_names = sorted({r["name"] for r in records if r["split"] == "holdout"})
    fraction = meta.get("unstyled_caption_fraction", 0.0)
    return "\n".join([
        "# Emoji dataset card",
        "",
        "Built by `consistent-diffusion data emoji`. The same emoji drawn in several house styles, "
        "so style and identity are labels we know.",
        "",
        "## Sources and licences",
        *[source_line(s) for s in meta.get("sources", [])],
        "- names, categories and subcategories: `emoji.json` from the emoji-datasource packages "
        "(emoji-data by Cal Henderson, MIT); OpenMoji's `data/openmoji.json` (CLDR names) names the "
        "captions and helps match the name-only Fluent files.",
        "- attribution: Noto Emoji, Copyright Google, Apache-2.0. Twemoji: Copyright Twitter, Inc. and other "
        "contributors, CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/). OpenMoji: the open-source "
        "emoji and icon project of HfG Schwaebisch Gmuend, CC-BY-SA-4.0 "
        "(https://creativecommons.org/licenses/by-sa/4.0/): images derived from it, the openmoji and "
        "openmoji-line rows, must be shared under the same licence. Fluent Emoji: Copyright Microsoft "
        "Corporation, MIT (https://github.com/microsoft/fluentui-emoji); the npm packages that carry it are "
        "MIT too (`@lobehub/fluent-emoji-3d` ships no licence file; its package.json and README say MIT).",
        "- the emoji-datasource packages' own LICENSE file is emoji-data's MIT licence; their README gives the "
        "artwork licences above.",
        "",
        "## Content",
        f"- {len(records)} images, {meta['image_size']}x{meta['image_size']} RGB composited on white "
        "(SVG rasterised with resvg at 64x64, WebP resized with Lanczos), "
        f"styles: {', '.join(styles)}; {identities.total()} identities.",
        "- captions: `<name in lower case>, <style> style`, e.g. `red heart, twitter style`; for "
        f"{fraction:.0%} of the training rows (a hash of identity and style) just `<name>`. The name is the "
        "emoji's CLDR short name (OpenMoji's annotation) where there is one"
        + (" ({cldr} identities), else its Unicode name ({unicode})".format(**meta["caption_names"])
           if "caption_names" in meta else ", else its Unicode name")
        + ": U+2764's Unicode name is `heavy black heart`, its CLDR name `red heart`.",
        "- labels per image: style, identity (code point), name, Unicode name, short name, category, subcategory, "
        "split, style_split.",
        "- skin-tone variants dropped: they repeat an identity and caption with another skin colour, "
        "would add five near-duplicates to each of ~400 people emoji (skewing counts towards People & Body) "
        "and their captions cannot tell them apart. The `Component` category (bare skin-tone swatches, hair "
        "parts) is dropped too.",
        "",
        "## Held-out styles",
        f"- {', '.join(heldout) or 'none'}: `style_split = heldout`. Never used to train the VAE, the UNet, the "
        "probes or the metric heads (training selects rows with `trainable_rows`: train split and a trained "
        "style); they test whether a method carries a style the model never saw, and whether the style "
        "metric works on unseen styles.",
        "",
        "## Matching identities across packages",
        "- by code point where the package names files by code point (emoji-datasource, OpenMoji, Fluent 3D; "
        "U+FE0F and U+E007F ignored), by normalised name otherwise (fluentui-emoji: a hand-checked alias table "
        "for the ~30 Fluent names that are no CLDR, Unicode or short name, then CLDR name, then Unicode name, "
        "then short names, each pass over all identities). Identities drawn by fewer than "
        f"{meta.get('min_styles', len(styles))} styles are dropped.",
        "- files that matched no identity are not emoji of emoji.json (OpenMoji's extras: regional indicator "
        "letters, symbols, its own pictograms; skin-tone variants are not counted).",
        "",
        *matching_lines(meta),
        "",
        "## Split (by identity, every style together; deterministic hash of the code point)",
        f"- train {identities['train']}, val {identities['val']}, holdout {identities['holdout']} identities.",
        "- holdout identities never enter any training (base model, probes); they serve as new subjects "
        "for DreamBooth and novel concepts. Holdout emoji: " + ", ".join(holdout_names) + ".",
        "",
        "## Counts per style",
        count_table(records, "style"),
        "",
        "## Counts per category",
        count_table(records, "category"),
        "",
        "## Licence files of the packages",
        "",
        *licence_section(meta),
    ])
