"""The tuning rule (``bench.tuning``): the default stays unless a variant's paired gain over it is
measurably above zero with its guards holding on each family; fine-tuning lengths pooled over
training seeds; the tuning suite's shape (seeds per length, shape tasks, defaults)."""

import numpy as np
import pytest

from consistent_diffusion.bench.suite import load_suite
from consistent_diffusion.bench.tuning import RULE, choose
from consistent_diffusion.core.errors import ConfigError

DEFAULTS = {"style_aligned": "style_aligned", "img2img_strength": "img2img_80", "ddpm_edit_skip": "skip8",
            "controlnet_scale": "controlnet_100"}


def _scores(values):
    return {"aggregate": float(np.mean(values)), "per_image": [float(v) for v in values], "validated": True}


def _cell(task, stack=(), name=None, family="style-unnamed", kind="style", trainings=(), **metrics):
    """A cell whose metrics are given per image (lists) or as constants (8 images)."""
    method = name or "+".join(m for m, _ in stack) or "plain"
    scores = {key: _scores(v if isinstance(v, (list, np.ndarray)) else [v] * 8) for key, v in metrics.items()}
    return {"task": task, "kind": kind, "family": family, "method": method, "num_images": 8,
            "stack": [{"method": m, **options} for m, options in stack], "scores": scores,
            "trainings": list(trainings)}


_RAW = np.random.default_rng(0).standard_normal(8)
NOISE = (_RAW - _RAW.mean()) / _RAW.std()  # mean 0, SD 1: a cell's mean is exactly what the test sets


def _style_report(shift_gain, shift_noise, shift_leakage=(0.2, 0.2)):
    """Two style families; plain 0.3, the paper's default 0.5, shift 2 = 0.5 + gain + noise."""
    cells = []
    for (task, family), leakage in zip((("a", "style-unnamed"), ("b", "style-unseen")), shift_leakage, strict=True):
        cells += [_cell(task, family=family, reference_style=0.3, reference_object=0.2, diversity=0.7),
                  _cell(task, [("style_aligned", {"reference_image": "{reference}"})], family=family,
                        reference_style=list(0.5 + 0.01 * NOISE), reference_object=0.2, diversity=0.7),
                  _cell(task, [("style_aligned", {"reference_image": "{reference}", "shared_score_shift": 2.0})],
                        name="style_aligned_shift2", family=family,
                        reference_style=list(0.5 + 0.01 * NOISE + shift_gain + shift_noise * NOISE[::-1]),
                        reference_object=leakage, diversity=0.7)]
    return {"cells": cells, "suite": {"name": "tuning", "tuning": {"defaults": DEFAULTS}}}


def _aligned(report):
    return {choice.option: choice for choice in choose(report)}["style_aligned"]


def test_the_default_stays_when_the_variants_interval_includes_zero_even_with_a_larger_mean():
    aligned = _aligned(_style_report(shift_gain=0.03, shift_noise=0.3))
    shift = next(c for c in aligned.candidates if c.value == {"shared_score_shift": 2.0})
    assert shift.over_default.mean > 0 and shift.over_default.low <= 0, "a larger mean, not a measured gain"
    assert shift.gain.mean > aligned.default.gain.mean, "the old rule (largest mean) would have picked it"
    assert aligned.kept_default and aligned.chosen.value == {}, "the paper's defaults stay"
    assert "the default, kept" in aligned.summary() and "over the default" in aligned.summary()


def test_a_variant_measurably_better_than_the_default_is_picked_only_when_its_guards_hold_on_each_family():
    chosen = _aligned(_style_report(shift_gain=0.2, shift_noise=0.01))
    assert chosen.chosen.value == {"shared_score_shift": 2.0} and not chosen.kept_default
    assert chosen.chosen.over_default.low > 0 and "measurably better than the default" in chosen.summary()
    # the same gain, but it copies the reference's subject on unseen styles only (0.05 below plain pooled)
    copying = _aligned(_style_report(shift_gain=0.2, shift_noise=0.01, shift_leakage=(0.05, 0.3)))
    shift = next(c for c in copying.candidates if c.value == {"shared_score_shift": 2.0})
    assert shift.over_default.low > 0 and len(shift.failed) == 1
    assert shift.failed[0].startswith("object leakage +0.100") and shift.failed[0].endswith("on style-unseen exceeds 0.05")
    assert copying.kept_default, "a guard failing on one family keeps the default"


def _leaky_default_report(variant_leakage):
    """The paper's default copies the reference on unseen styles (leakage +0.15 over plain there);
    shift 2 carries less style (-0.05, wide) with ``variant_leakage`` on unseen styles."""
    cells = []
    for task, family in (("a", "style-unnamed"), ("b", "style-unseen")):
        unseen = family == "style-unseen"
        cells += [_cell(task, family=family, reference_style=0.3, reference_object=0.2, diversity=0.7),
                  _cell(task, [("style_aligned", {"reference_image": "{reference}"})], family=family,
                        reference_style=list(0.5 + 0.01 * NOISE), reference_object=0.35 if unseen else 0.2,
                        diversity=0.7),
                  _cell(task, [("style_aligned", {"reference_image": "{reference}", "shared_score_shift": 2.0})],
                        name="style_aligned_shift2", family=family,
                        reference_style=list(0.45 + 0.2 * NOISE[::-1]),
                        reference_object=variant_leakage if unseen else 0.2, diversity=0.7)]
    return {"cells": cells, "suite": {"name": "tuning", "tuning": {"defaults": DEFAULTS}}}


def test_a_default_that_fails_its_guard_gives_way_to_a_variant_that_passes_them_all():
    choice = _aligned(_leaky_default_report(variant_leakage=0.2))
    assert choice.default.failed and choice.default.failed[0].startswith("object leakage +0.150")
    shift = next(c for c in choice.candidates if c.value == {"shared_score_shift": 2.0})
    assert not shift.failed and shift.over_default.mean < 0, "weaker style, but it does not copy"
    assert choice.chosen is shift and "the default fails object leakage" in choice.summary()
    # when the variant copies too, the default stays and the record says it fails
    stays = _aligned(_leaky_default_report(variant_leakage=0.35))
    assert stays.kept_default and "the default itself fails object leakage" in stays.summary()


def test_the_gain_is_judged_over_the_default_not_over_plain():
    cells = [_cell("s", kind="shape", family="shape", shape=0.1, text=0.3)]
    for scale, mean, noise in ((1.0, 0.5, NOISE), (1.5, 0.52, NOISE[::-1])):
        cells.append(_cell("s", [("controlnet", {"scales": [scale]})], name=f"controlnet_{int(scale * 100)}",
                           kind="shape", family="shape", shape=list(mean + 0.05 * noise), text=0.3))
    report = {"cells": cells, "suite": {"tuning": {"defaults": DEFAULTS}}}
    scale = {choice.option: choice for choice in choose(report)}["controlnet_scale"]
    variant = next(c for c in scale.candidates if c.value == [1.5])
    assert variant.gain.low > 0, "far above plain"
    assert scale.chosen.value == [1.0], "but not measurably above the default"


def test_each_embedded_adapters_scale_is_its_own_option_judged_on_its_own_target():
    """Style-adapter cells are candidates of the style option only (reference_style, leakage guard);
    subject-adapter cells of the subject option only (reference_object); neither pools the other."""
    cells = [_cell("s", reference_style=0.3, reference_object=0.2, diversity=0.7),
             _cell("o", family="object", kind="object", reference_object=0.2, text=0.3, diversity=0.7)]
    for scale, gain, noise in ((1.0, 0.2, NOISE), (1.5, 0.4, NOISE[::-1])):
        use = {"adapters": "embedded-style", "images": "{reference}", "scales": [scale]}
        cells.append(_cell("s", [("ip_adapter", use)], name=f"ip_style_{int(scale * 100)}",
                           reference_style=list(0.3 + gain + 0.01 * NOISE), reference_object=0.2, diversity=0.7))
        use = {"adapters": "embedded-subject", "images": "{reference}", "scales": [scale]}
        cells.append(_cell("o", [("ip_adapter", use)], name=f"ip_subject_{int(scale * 100)}", family="object",
                           kind="object", reference_object=list(0.2 + gain / 4 + 0.3 * noise), text=0.3, diversity=0.7))
    defaults = {**DEFAULTS, "ip_adapter_style_scale": "ip_style_100", "ip_adapter_subject_scale": "ip_subject_100"}
    choices = {c.option: c for c in choose({"cells": cells, "suite": {"tuning": {"defaults": defaults}}})}
    style, subject = choices["ip_adapter_style_scale"], choices["ip_adapter_subject_scale"]
    assert [c.methods for c in style.candidates] == [["ip_style_100"], ["ip_style_150"]]
    assert [c.methods for c in subject.candidates] == [["ip_subject_100"], ["ip_subject_150"]]
    assert style.chosen.value == [1.5], "+0.2 with a tight interval: measurably better"
    assert subject.kept_default, "+0.05 inside a wide interval: the trained scale stays"


def _trained(kind, steps, seed, gain):
    values = list(0.3 + gain + 0.01 * np.random.default_rng(steps + seed).standard_normal(8))
    training = {"task": "o", "training": f"{kind}_{steps}_seed{seed}", "kind": kind, "steps": steps,
                "options": {"steps": steps, "seed": seed}}
    return _cell("o", [(kind, {"weights": "{trained:x}"})], name=f"{kind}_{steps}_seed{seed}", kind="object",
                 family="object", trainings=[training], reference_object=values, text=0.3)


def test_fine_tuning_steps_are_pooled_over_training_seeds():
    plain = _cell("o", kind="object", family="object", reference_object=0.3, text=0.3)
    # 300 steps: one lucky training (+0.3), two no better than 150 steps: the pooled interval reaches zero
    lucky = [_trained("lora", 150, s, 0.1) for s in range(3)] + [
        _trained("lora", 300, 0, 0.4), _trained("lora", 300, 1, 0.1), _trained("lora", 300, 2, 0.09)]
    # DreamBooth 200 steps better than 150 on every seed; 300 not better than 200
    steady = [_trained("dreambooth", 150, s, 0.1) for s in range(3)] + [
        _trained("dreambooth", 200, s, 0.25 + 0.01 * s) for s in range(3)] + [
        _trained("dreambooth", 300, s, 0.26 - 0.02 * s) for s in range(3)]
    choices = {c.option: c for c in choose({"cells": [plain, *lucky, *steady]}, defaults={})}
    lora, dreambooth = choices["lora_steps"], choices["dreambooth_steps"]
    longest = next(c for c in lora.candidates if c.value == 300)
    assert len(longest.cells) == 3 and longest.training_seeds == 3
    assert longest.over_default.mean > 0.05 and longest.over_default.low <= 0, "one lucky seed is not a gain"
    assert lora.chosen.value == 150 and lora.kept_default and "3 training seeds pooled" in lora.summary()
    assert dreambooth.chosen.value == 200, "200 beats 150 on every seed, 300 does not beat 200"


def test_an_option_with_candidates_but_no_default_is_a_config_error():
    report = _style_report(0.2, 0.01)
    report["suite"]["tuning"] = {}
    with pytest.raises(ConfigError, match=r"names no default stack for it"):
        choose(report)


def test_the_tuning_suite_trains_each_length_with_three_seeds_and_has_three_shape_tasks():
    suite = load_suite("tuning")
    from consistent_diffusion.bench.prepare import check_trainings

    check_trainings(suite)  # `seed` is the training configs' own field
    for kind in ("lora", "dreambooth"):
        lengths: dict[int, set[int]] = {}
        for spec in suite.trainings.values():
            if spec.kind == kind:
                lengths.setdefault(spec.options["steps"], set()).add(spec.options["seed"])
        assert len(lengths) >= 3 and all(len(seeds) >= 3 for seeds in lengths.values()), kind
    shapes = [t for t in suite.tasks if t.family == "shape"]
    assert len(shapes) >= 3 and all(len(t.prompts) * len(t.seeds) >= 8 for t in shapes)
    assert all(any(m.startswith("controlnet_") for m in t.methods) for t in shapes)
    defaults = suite.tuning["defaults"]
    assert all(name in suite.methods for name in defaults.values()), "every default is one of the suite's stacks"
    aligned = [m for m in suite.methods if m.startswith("style_aligned")]
    assert len(aligned) >= 2 and defaults["style_aligned"] in aligned


@pytest.mark.parametrize("name", ["quick", "full", "standard"])
def test_the_evaluation_suites_say_which_rule_made_their_tuning_record(name):
    tuning = load_suite(name).tuning
    assert "rule" in tuning and ("bench.tuning" in tuning["rule"]), name
    assert RULE.split(":")[0] in tuning["rule"] or "largest mean" in tuning["rule"]
