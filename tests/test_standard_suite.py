"""The standard suite (the committed evidence): its size per family, images per cell, quick's
method stacks and tuning record, references from identities the UNet never trained on."""

from collections import Counter
from pathlib import Path

from consistent_diffusion.bench.suite import BUILTIN_SUITES_DIR, available_suites, load_suite

ASSETS = BUILTIN_SUITES_DIR.parent / "assets"


def test_standard_is_sized_for_its_claims():
    assert "standard" in available_suites()
    suite = load_suite("standard")  # parsing checks every reference file exists
    counts = Counter(task.family for task in suite.tasks)
    assert counts["style-unnamed"] >= 12 and counts["style-unseen"] >= 12, counts
    for family in ("object", "concept-exemplar", "concept-text", "shape", "inversion"):
        assert counts[family] >= 8, (family, counts)
    for task in suite.tasks:
        if task.family != "inversion":  # a reconstruction ignores the seed: one image is all there is
            assert len(task.prompts) * len(task.seeds) >= 16, task.name
    quick = load_suite("quick")
    assert {name: spec.uses for name, spec in suite.methods.items()} == {
        name: spec.uses for name, spec in quick.methods.items()}, "the same method stacks as quick"
    assert suite.trainings == quick.trainings and suite.tuning == quick.tuning
    assert {m for t in suite.tasks for m in t.methods} == {m for t in quick.tasks for m in t.methods}


def test_standard_references_are_holdout_or_val_identities_and_the_suite_says_so():
    rows = {}
    for line in (ASSETS / "ATTRIBUTION.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 5 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells[4]
    references = {Path(r).name for task in load_suite("standard").tasks for r in task.references}
    assert references and all(rows.get(name) in ("holdout", "val") for name in references), \
        {name: rows.get(name) for name in references if rows.get(name) not in ("holdout", "val")}
    assert any(rows[name] == "val" for name in references)
    text = (BUILTIN_SUITES_DIR / "standard.toml").read_text(encoding="utf-8")
    assert "metric heads' settings were chosen on val" in text
    assert "smoke view" in (BUILTIN_SUITES_DIR / "quick.toml").read_text(encoding="utf-8")
