"""Write the task lists of the built-in `quick`, `standard` and `full` suites from one table of subjects.

The methods, trainings and the [tuning] record are hand-written at the top of `quick.toml`
(everything before its first `[[tasks]]`); this script keeps that header, rewrites the tasks, and
gives `full.toml` the same header with more subjects per family and four seeds per prompt (for
GPUs and real models), and `standard.toml` (the committed evidence) the whole tables: 24 unnamed-style
and 16 unseen-style tasks, 18 object tasks, 8 per other family, 16 images per cell. Every reference is a holdout or val emoji
(identities the UNet never trained on) written by `bench_references.py`; none is one the tuning
suite chooses options on (`bench.suite_identities`). The tables list quick's subjects first, then
full's, then the standard suite's (val identities).

    python scripts/make_suites.py          # then: python scripts/bench_references.py --data DIR
"""

from __future__ import annotations

import json
from pathlib import Path

SUITES = Path(__file__).resolve().parents[1] / "src" / "consistent_diffusion" / "bench" / "suites"
UNNAMED = ["cat face", "rocket", "pizza", "house"]  # prompts without a style word
STYLED = ["twitter", "google", "openmoji", "fluent-3d"]  # the trained styles a subject is asked in

# (subject, reference style) per family; quick takes the first three (two exemplar concepts), full
# six (four), standard all: twenty-four unnamed-style and sixteen unseen-style tasks, eighteen
# objects, eight per other family. The last eight unnamed-style and six object entries were added to
# narrow the intervals (docs/bench.md: power): four of each drawn with random.Random(29) from the
# holdout and val identities no suite used yet (symbols for styles, so no prompt's subject is the
# reference's; people for objects), then two more of each with random.Random(30) and two more
# unnamed-style with random.Random(31) from what was left, each count from the half-widths before it
STYLE_UNNAMED = [("giraffe", "twitter"), ("mango", "google"), ("hiking boot", "fluent-3d"),
                 ("bullseye", "openmoji"), ("gear", "fluent-flat"), ("moon cake", "twitter"),
                 ("bird", "twitter"), ("bouquet", "google"), ("seedling", "fluent-3d"),
                 ("ticket", "openmoji"), ("video game", "fluent-flat"), ("egg", "twitter"),
                 ("evergreen tree", "twitter"), ("lime", "google"), ("desert", "fluent-3d"), ("file folder", "openmoji"),
                 ("ng button", "twitter"), ("japanese symbol for beginner", "google"), ("scorpio", "fluent-3d"),
                 ("wheelchair symbol", "openmoji"), ("reverse button", "fluent-flat"), ("fog", "twitter"),
                 ("prohibited", "google"), ("free button", "fluent-3d")]
STYLE_UNSEEN = [("ferris wheel", "openmoji-line"), ("gear", "fluent-contrast"), ("rugby football", "openmoji-line"),
                ("carpentry saw", "fluent-contrast"), ("hindu temple", "openmoji-line"), ("astronaut", "fluent-contrast"),
                ("house with garden", "openmoji-line"), ("fire extinguisher", "fluent-contrast"),
                ("skateboard", "openmoji-line"), ("hammer and wrench", "fluent-contrast"),
                ("japanese castle", "openmoji-line"), ("tooth", "fluent-contrast"),
                ("factory", "openmoji-line"), ("locked with key", "fluent-contrast"), ("broken heart", "openmoji-line"),
                ("broken chain", "fluent-contrast")]
OBJECTS = ["cricket", "goblin", "billed cap", "prince", "battery", "receipt", "broom", "gloves", "brain", "dress", "briefs",
           "manual wheelchair", "people hugging", "man juggling", "man supervillain", "woman genie", "man getting massage",
           "person running"]
EXEMPLAR_CONCEPTS = ["fortune cookie", "moon cake", "sari", "fireworks", "cookie", "tropical drink", "white flower",
                     "high-heeled shoe"]
TEXT_CONCEPTS = [("cat face with sunglasses", "cat"), ("pizza with a face", "pizza"), ("rocket made of flowers", "rocket"),
                 ("house made of candy", "house"), ("ghost wearing a crown", "ghost"), ("heart made of ice", "heart"),
                 ("dog wearing a top hat", "dog"), ("tree made of crystals", "tree")]
SHAPES = [("racing car", "twitter"), ("carpentry saw", "google"), ("astronaut", "twitter"),
          ("fork and knife", "google"), ("ferris wheel", "twitter"), ("hiking boot", "google"),
          ("floppy disk", "twitter"), ("ping pong", "google")]
INVERSIONS = [("giraffe", "twitter"), ("mango", "google"), ("goblin", "twitter"),
              ("cricket", "google"), ("racing car", "twitter"), ("billed cap", "twitter"),
              ("cow face", "twitter"), ("window", "google")]

STYLE_NAMES = {"twitter": "Twemoji", "google": "Noto", "openmoji": "OpenMoji", "fluent-flat": "Fluent flat",
               "fluent-3d": "Fluent 3D", "openmoji-line": "OpenMoji line art", "fluent-contrast": "Fluent high contrast"}
STYLE_METHODS = ["plain", "img2img", "style_aligned"]
EMBEDDED_STYLE_METHODS = ["ip_adapter_style"]  # the embedded model's own adapters: quick and standard, not full
EMBEDDED_SUBJECT_METHODS = ["ip_adapter_subject"]
OBJECT_METHODS = ["plain", "img2img_40", "img2img_80", "ddpm_edit", "lora", "dreambooth", "consistent_subject",
                  "consistent_subject_real"]
EXEMPLAR_METHODS = ["plain", "img2img_40", "lora", "dreambooth", "textual_inversion"]
SHAPE_METHODS = ["plain", "controlnet", "style_aligned_controlnet"]


STANDARD_INTRO = """# The standard suite: the committed evidence (docs/bench.md: power), built like the quick suite:
# 24 unnamed-style and 16 unseen-style tasks, 18 object tasks and 8 per other family, 16 images per cell (4 prompts x 4 seeds; a
# shape task 16 seeds of its one prompt), the same method stacks and [tuning] record as quick.
# Subjects and references are identities the UNet never trained on: the emoji dataset's holdout
# identities and its val identities (the metric heads' settings were chosen on val, so the val
# references are unseen by the UNet but not by the heads' settings); none is a tuning identity.
# 63 minutes on 2 CPU cores (`bench --suite standard --workers 2` into an empty folder, nothing else running,
# 2026-12-04; docs/bench.md). Quick's header comment follows (its sizes and time are quick's):
#"""


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def asset(name: str, style: str) -> str:
    return f"../assets/{slug(name).replace('-', '_')}_{style}.png"


def tasks(count: int, concepts: int, seeds: int, styles: int | None = None, objects: int | None = None,
          embedded: bool = True, unnamed: int | None = None) -> list[dict]:
    """The task list with ``count`` subjects per family (``concepts`` exemplar concepts, ``styles``
    per style family, ``unnamed`` of them for unnamed styles, and ``objects`` object subjects:
    default ``count``); ``embedded`` adds the cells of the embedded model's own adapters (the full
    suite, for real models, leaves them out)."""
    style_methods = STYLE_METHODS + (EMBEDDED_STYLE_METHODS if embedded else [])
    subject_methods = EMBEDDED_SUBJECT_METHODS if embedded else []
    styles = count if styles is None else styles
    sizes = {"style-unnamed": styles if unnamed is None else unnamed, "style-unseen": styles}
    objects = count if objects is None else objects
    two = list(range(seeds))
    out = []
    for family, table, what in (("style-unnamed", STYLE_UNNAMED, "the style of a {style} {name}, prompts without a "
                                                                 "style word"),
                                ("style-unseen", STYLE_UNSEEN, "{style} (a held-out style) from a {name}")):
        for name, style in table[:sizes[family]]:
            out.append({"name": f"{family}-{slug(name)}", "kind": "style", "family": family,
                        "description": f"new subjects in {what.format(style=STYLE_NAMES[style], name=name)}",
                        "prompts": UNNAMED, "seeds": two, "references": [asset(name, style)],
                        "reference_prompt": f"{name}, {style} style", "methods": style_methods})
    for index, name in enumerate(OBJECTS[:objects]):
        out.append({"name": f"object-{slug(name)}", "kind": "object", "family": "object",
                    "description": f"keep one new subject (a holdout {name}) across styles and seeds",
                    "prompts": [f"{name}, {style} style" for style in STYLED], "seeds": two,
                    "references": [asset(name, "twitter"), asset(name, "google")], "subject": name.split()[-1],
                    "reference_prompt": f"{name}, twitter style",
                    "methods": OBJECT_METHODS + subject_methods + (["lora_style_aligned"] if index == 0 else [])})
    for name in EXEMPLAR_CONCEPTS[:concepts]:
        out.append({"name": f"concept-{slug(name)}", "kind": "concept", "family": "concept-exemplar",
                    "description": name, "prompts": [f"{name}, {style} style" for style in STYLED], "seeds": two,
                    "references": [asset(name, "twitter"), asset(name, "google")],
                    "methods": EXEMPLAR_METHODS + subject_methods})
    for text, subject in TEXT_CONCEPTS[:count]:
        out.append({"name": f"concept-{slug(text)}", "kind": "concept", "family": "concept-text", "description": text,
                    "prompts": [text] + [f"{text}, {style} style" for style in STYLED[:3]], "seeds": two,
                    "subject": subject, "methods": ["plain", "consistent_subject"]})
    for index, (name, style) in enumerate(SHAPES[:count]):
        second = [asset(name, "google" if style == "twitter" else "twitter")] if index == 0 else []
        out.append({"name": f"shape-{slug(name)}", "kind": "shape", "family": "shape",
                    "description": f"follow the silhouette and edges of a real {name} ({style}); "
                                   "style from it in the combination",
                    "prompts": [name], "seeds": list(range(4 * seeds)), "references": [asset(name, style)] + second,
                    "methods": SHAPE_METHODS + (["lora_controlnet"] if index == 0 else [])})
    for name, style in INVERSIONS[:count]:
        out.append({"name": f"inversion-{slug(name)}", "kind": "object", "family": "inversion",
                    "description": f"re-sample a real {name} ({style}) from its edit-friendly DDPM inversion "
                                   "with its own prompt",
                    "prompts": [f"{name}, {style} style"], "seeds": [0], "references": [asset(name, style)],
                    "reference_prompt": f"{name}, {style} style", "methods": ["ddpm_reconstruct"]})
    return out


def render(header: str, task_list: list[dict]) -> str:
    keys = ["name", "kind", "family", "description", "prompts", "seeds", "references", "subject",
            "reference_prompt", "methods"]
    lines = [header.rstrip("\n")]
    for task in task_list:
        lines.append("\n[[tasks]]")
        lines += [f"{key} = {json.dumps(task[key], ensure_ascii=False)}" for key in keys if key in task]
    return "\n".join(lines) + "\n"


def references(task_list: list[dict]) -> set[str]:
    return {Path(path).name for task in task_list for path in task.get("references", ())}


def main() -> None:
    quick_path = SUITES / "quick.toml"
    text = quick_path.read_text(encoding="utf-8")
    header = text[: text.index("\n[[tasks]]")] + "\n"
    quick, full = tasks(3, 2, 2), tasks(6, 4, 4, embedded=False)
    quick_path.write_text(render(header, quick), encoding="utf-8")
    smoke = header[header.index("#\n# A smoke view"):header.index("\n", header.index("the committed evidence.")) + 1]
    full_header = header.replace(smoke, "").replace('name = "quick"', 'name = "full"').replace(
        "# The quick suite:", "# The full suite (GPUs and real models; twice the subjects, four seeds), built like the quick suite:")
    (SUITES / "full.toml").write_text(render(full_header, full), encoding="utf-8")
    standard = tasks(8, 8, 4, styles=16, objects=18, unnamed=24)
    standard_header = full_header.replace('name = "full"', 'name = "standard"').replace(
        "# The full suite (GPUs and real models; twice the subjects, four seeds), built like the quick suite:",
        STANDARD_INTRO)
    (SUITES / "standard.toml").write_text(render(standard_header, standard), encoding="utf-8")
    print(f"quick: {len(quick)} tasks; full: {len(full)} tasks; standard: {len(standard)} tasks; "
          f"references needed: {len(references(standard) | references(full))}")


if __name__ == "__main__":
    main()
