"""Bench statistics: bootstrap intervals, paired differences, seed-independent cells, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from consistent_diffusion.bench.records import CellRecord, Report, Score, SuiteSummary, TaskSummary
from consistent_diffusion.bench.stats import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    Interval,
    bootstrap_interval,
    paired_samples,
    report_intervals,
    samples,
    verdict,
)


def test_a_constant_has_a_zero_width_interval_and_draws_are_reproducible():
    constant = bootstrap_interval([[0.3] * 8])
    assert constant.mean == pytest.approx(0.3) and constant.low == pytest.approx(0.3) and constant.high == pytest.approx(0.3)
    data = list(np.random.default_rng(1).normal(0.5, 0.1, 40))
    first, again = bootstrap_interval([data]), bootstrap_interval([data])
    assert first == again, "a fixed generator: the same interval on every run"
    assert first.low < np.mean(data) < first.high and first.samples == 40
    # about the normal-theory width 2 * 1.96 * sd / sqrt(n)
    assert first.high - first.low == pytest.approx(2 * 1.96 * np.std(data) / np.sqrt(40), rel=0.25)
    assert bootstrap_interval([data * 4]).high - bootstrap_interval([data * 4]).low < first.high - first.low


def test_tasks_are_resampled_so_disagreeing_tasks_widen_the_interval():
    rng = np.random.default_rng(0)
    near = [list(rng.normal(0.2, 0.01, 8)), list(rng.normal(0.21, 0.01, 8))]
    apart = [list(rng.normal(0.0, 0.01, 8)), list(rng.normal(0.4, 0.01, 8))]
    pooled = bootstrap_interval([apart[0] + apart[1]])
    clustered = bootstrap_interval(apart)
    assert clustered.high - clustered.low > 2 * (pooled.high - pooled.low), "task-to-task spread counts"
    assert bootstrap_interval(near).high - bootstrap_interval(near).low < 0.05
    assert bootstrap_interval([[], []]) is None


def test_seed_independent_cells_count_one_sample_per_prompt():
    assert samples([1.0, 1.0, 2.0, 2.0], seeds=2) == [1.0, 1.0, 2.0, 2.0]
    assert samples([1.0, 1.0, 2.0, 2.0], seeds=2, seed_independent=True) == [1.0, 2.0]
    assert samples([0.5, None, float("nan")], seeds=1) == [0.5]


def test_paired_differences_cancel_what_prompts_share():
    prompt_effect = [0.0, 0.5, 1.0, 1.5]
    plain = [p + 0.1 for p in prompt_effect]
    method = [p + 0.2 for p in prompt_effect]
    diffs = paired_samples(method, plain, seeds=1)
    assert diffs == pytest.approx([0.1] * 4)
    paired = bootstrap_interval([diffs])
    unpaired = bootstrap_interval([method]).low - bootstrap_interval([plain]).high
    assert paired.low > 0.09 and unpaired < 0, "pairing finds the difference the prompts' spread hides"
    with pytest.raises(ValueError, match="not paired"):
        paired_samples([1.0], [1.0, 2.0], seeds=1)


def test_the_three_verdicts():
    up, down, unsure = Interval(0.1, 0.05, 0.15), Interval(-0.1, -0.15, -0.05), Interval(0.02, -0.01, 0.05)
    assert verdict([up, up]) == HELD
    assert verdict([up, down]) == NOT_HELD
    assert verdict([down]) == NOT_HELD
    assert verdict([up, unsure]) == INCONCLUSIVE
    assert verdict([up, None]) == INCONCLUSIVE and verdict([]) == INCONCLUSIVE
    assert verdict([up, down], expected_sign=[1, -1]) == HELD, "a claim may predict a decrease"


def _cell(task, method, stack, values, kind="object"):
    return CellRecord(id=f"{task}__{method}", task=task, kind=kind, method=method, stack=tuple(stack),
                      num_images=len(values),
                      scores={kind: Score(name="object_consistency", aggregate=float(np.mean(values)),
                                          per_image=tuple(values), validated=True)})


def test_report_intervals_pair_each_cell_with_its_tasks_plain_cell():
    suite = SuiteSummary(name="s", tasks=(TaskSummary(name="a", kind="object", prompts=("x", "y"), seeds=(0, 1)),
                                          TaskSummary(name="b", kind="object", prompts=("x", "y"), seeds=(0, 1))))
    cells = (
        _cell("a", "plain", [], [0.1, 0.2, 0.3, 0.4]),
        _cell("a", "edit", [{"method": "ddpm_edit"}], [0.5, 0.5, 0.7, 0.7]),
        _cell("b", "plain", [], [0.2, 0.2, 0.2, 0.2]),
        _cell("b", "edit", [{"method": "ddpm_edit"}], [0.4, 0.4, 0.4, 0.4]),
    )
    intervals = report_intervals(Report(cells=cells, suite=suite))
    edit = intervals["cells"]["a__edit"]["object"]
    assert edit["interval"]["samples"] == 2, "a DDPM edit ignores the seed: one sample per prompt"
    assert edit["vs_plain"]["mean"] == pytest.approx(((0.5 - 0.15) + (0.7 - 0.35)) / 2)
    assert "vs_plain" not in intervals["cells"]["a__plain"]["object"]
    table = intervals["table"]["edit"]["object"]["object"]
    assert table["interval"]["samples"] == 4 and table["vs_plain"]["low"] > 0
    report = Report(cells=cells, suite=suite, intervals=intervals)
    assert Report.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert "intervals" not in Report(cells=cells, suite=suite).to_dict(), "old reports keep their layout"
    assert report.cell_interval("a__edit", "object", "vs_plain").mean == pytest.approx(0.35)
