"""The advisor: Pareto front, constraints, the diversity-collapse rule, intervals and their doubt."""

import numpy as np

from consistent_diffusion.bench.advisor import Constraints, advise, format_advice


def _values(mean, seed=0, spread=0.01):
    return list(mean + spread * np.random.default_rng(seed).standard_normal(8))


def cell(task, method, stack, object_, text, diversity, seconds=0.3, train=0.0, params=0, object_spread=0.01):
    """A hand-made object cell; ``object_`` is a mean (eight values around it) or the per-image values."""
    def score(values, validated=True):
        return {"aggregate": float(np.mean(values)), "per_image": values, "validated": validated}

    return {"task": task, "kind": "object", "method": method, "stack": [{"method": m} for m in stack], "num_images": 8,
            "scores": {"object": score(object_ if isinstance(object_, list) else _values(object_, spread=object_spread)),
                       "text": score(_values(text, 1)),
                       "diversity": score(_values(diversity, 2))},
            "cost": {"seconds_per_image": seconds, "train_seconds": train, "trainable_parameters": params}}


def report(*cells):
    return {"cells": [cell("t", "plain", [], 0.1, 0.2, 0.7), *cells]}


def test_the_pareto_front_comes_first_and_dominated_stacks_are_marked():
    ranked = advise(report(cell("t", "good", ["style_aligned"], 0.4, 0.2, 0.7),
                           cell("t", "worse", ["img2img"], 0.3, 0.15, 0.6, seconds=0.5)), ["object"])
    names = [r.method for r in ranked]
    assert names.index("good") < names.index("worse")
    assert next(r for r in ranked if r.method == "worse").pareto is False
    text = format_advice(ranked, ["object"])
    assert "(dominated)" in text and "vs plain" in text and "[+" in text


def test_a_copying_method_is_dropped_unless_asked_for():
    copier = cell("t", "copier", ["img2img"], 0.9, 0.2, 0.2)  # diversity 0.2 < half of plain's 0.7
    assert "copier" not in [r.method for r in advise(report(copier), ["object"])]
    kept = advise(report(copier), ["object"], constraints=Constraints(allow_low_diversity=True))
    assert kept[0].method == "copier"


def test_user_constraints():
    slow = cell("t", "slow", ["lora"], 0.5, 0.2, 0.7, seconds=0.4, train=80.0, params=1000)
    mute = cell("t", "mute", ["img2img"], 0.5, 0.05, 0.7)
    both = report(slow, mute)
    assert "slow" not in [r.method for r in advise(both, ["object"], constraints=Constraints(max_seconds=5.0))]
    assert "mute" not in [r.method for r in advise(both, ["object"], constraints=Constraints(min_text=0.1))]
    assert "slow" not in [r.method for r in advise(both, ["object"], constraints=Constraints(allow_training=False))]
    assert [r.method for r in advise(both, ["object"], constraints=Constraints(min_diversity=0.9))] == []


def test_an_inconclusive_top_choice_is_said():
    unsure = cell("t", "unsure", ["style_aligned"], [0.5, -0.2, 0.45, -0.1, 0.5, -0.15, 0.4, -0.1], 0.21, 0.7)
    text = format_advice(advise(report(unsure), ["object"]), ["object"])
    assert text.splitlines()[1].startswith("1. unsure")
    assert "inconclusive on object" in text


def style_cell(method, stack, within, to_reference, leakage):
    """A style cell: within-set style, agreement with the reference's style, object leakage."""
    def score(mean, seed):
        values = _values(mean, seed)
        return {"aggregate": float(np.mean(values)), "per_image": values, "validated": True}

    return {"task": "s", "kind": "style", "method": method, "stack": [{"method": m} for m in stack], "num_images": 8,
            "scores": {"style": score(within, 0), "reference_style": score(to_reference, 1),
                       "reference_object": score(leakage, 2), "text": score(0.2, 3), "diversity": score(0.7, 4)},
            "cost": {"seconds_per_image": 0.3}}


def test_style_is_ranked_on_the_reference_and_a_method_that_copies_its_subject_is_dropped():
    cells = [style_cell("plain", [], 0.95, 0.3, 0.2),  # plain: alike to each other (one default style), not to the reference
             style_cell("aligned", ["style_aligned"], 0.85, 0.7, 0.22),
             style_cell("copier", ["img2img"], 0.97, 0.9, 0.6)]  # the reference's style *and* its subject
    dropped = []
    ranked = advise({"cells": cells}, ["style"], dropped=dropped)
    assert [r.method for r in ranked] == ["aligned", "plain"], "within-set style would rank the copier first"
    assert dropped[0][0] == "copier" and "copies the reference's subject" in dropped[0][1]
    assert "dropped copier: object leakage +0.400" in format_advice(ranked, ["style"], dropped)
    assert "style agreement with the reference 0.702 [0.697, 0.706], +0.400" in format_advice(ranked, ["style"])
    assert "object leakage +0.020" in format_advice(ranked, ["style"])
    kept = advise({"cells": cells}, ["style"], constraints=Constraints(allow_copying=True))
    assert [r.method for r in kept][:2] == ["copier", "aligned"]


def test_the_diversity_guard_is_half_of_plains_diversity_not_a_fixed_number():
    """Diversity 0.3 is more than half of a low-diversity plain's 0.2 (kept) and 0.55 is less than half
    of a high-diversity plain's 1.2 (dropped): a guard against a fixed 0.5 would get both wrong."""
    def with_plain(plain_diversity, *cells):
        return {"cells": [cell("t", "plain", [], 0.1, 0.2, plain_diversity), *cells]}

    varied = cell("t", "varied", ["img2img"], 0.5, 0.2, 0.3)
    assert [r.method for r in advise(with_plain(0.2, varied), ["object"])][0] == "varied"
    collapsed = cell("t", "collapsed", ["img2img"], 0.5, 0.2, 0.55)
    dropped = []
    advise(with_plain(1.2, collapsed), ["object"], dropped=dropped)
    assert [method for method, _ in dropped] == ["collapsed"]
    assert "below half of plain's 1.2" in dropped[0][1]
