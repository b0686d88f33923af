"""Known answers for the statistics over seeds: intervals, paired differences, tied marks, rounding."""

from __future__ import annotations

import math

import pytest

from diffusers_optim.report import stats
from diffusers_optim.report.render import fmt_pm

T2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom (tables)
T4 = 2.7764451051977987  # ... with 4 degrees of freedom


def test_estimate_mean_std_and_t_interval():
    e = stats.estimate([1.0, 2.0, 3.0])
    assert (e.mean, e.std, e.n) == (2.0, 1.0, 3)
    assert e.low == pytest.approx(2.0 - T2 / math.sqrt(3)) and e.high == pytest.approx(2.0 + T2 / math.sqrt(3))
    e5 = stats.estimate([10.0, 12.0, 14.0, 16.0, 18.0])
    assert e5.std == pytest.approx(math.sqrt(10.0)) and e5.half_width == pytest.approx(T4 * math.sqrt(2.0))
    # one seed: a mean but no spread and no interval; non-finite seeds (diverged) are not averaged in
    assert stats.estimate([0.5, math.nan]) == stats.Estimate(0.5, None, 1, None, None)
    assert stats.estimate([]).n == 0 and stats.estimate([]).mean is None


def test_paired_difference_uses_only_shared_seeds_and_removes_the_seed_effect():
    # the seed moves both arms by a lot; the arms differ by 0.5 +- 0.1: unpaired that is hidden, paired it is not
    a = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}
    b = {0: 0.5, 1: 1.4, 2: 2.6, 3: 0.0}
    d = stats.paired_difference(a, b, ("a", "b"), "val/loss")
    assert d.seeds == [0, 1, 2] and d.estimate.mean == pytest.approx(0.5) and d.estimate.std == pytest.approx(0.1)
    assert d.estimate.half_width == pytest.approx(T2 * 0.1 / math.sqrt(3)) and d.resolved
    unpaired = stats.estimate([1.0, 2.0, 3.0]).low < stats.estimate([0.5, 1.4, 2.6]).high
    assert unpaired  # the arms' own intervals overlap
    tied = stats.paired_difference({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.9, 1: 1.1, 2: 0.95})
    assert tied.estimate.mean == pytest.approx(0.05 / 3) and not tied.resolved
    single = stats.paired_difference({0: 5.0}, {0: 1.0})
    assert single.estimate.n == 1 and not single.resolved  # one seed resolves nothing


def test_rank_marks_arms_tied_with_the_best():
    per_seed = {
        "far": {0: 2.0, 1: 2.1, 2: 2.2},  # clearly worse than best
        "best": {0: 1.0, 1: 1.1, 2: 1.2},
        "close": {0: 1.05, 1: 1.08, 2: 1.25},  # diffs .05 -.02 .05: interval spans 0
        "gone": {},  # every seed failed
    }
    ranked = stats.rank_arms(per_seed, "val/loss")
    assert [r["arm"] for r in ranked] == ["best", "close", "far", "gone"]
    assert [r["tied"] for r in ranked] == [False, True, False, False]
    assert ranked[0]["best"] and ranked[0]["diff_vs_best"] is None and ranked[3]["diff_vs_best"] is None
    far = ranked[2]["diff_vs_best"]
    assert far["mean"] == pytest.approx(1.0) and far["resolved"] and far["a"] == "far" and far["b"] == "best"
    # a metric where higher is better ranks the other way
    assert stats.higher_is_better("eval/recall") and not stats.higher_is_better("eval/fd")
    assert [r["arm"] for r in stats.rank_arms(per_seed, "eval/precision")][:2] == ["far", "close"]


def test_numbers_are_rounded_to_their_interval():
    assert fmt_pm(0.041234, 0.001432) == "0.0412 ± 0.0014"
    assert fmt_pm(12.3456, 2.5) == "12.3 ± 2.5"
    assert fmt_pm(0.5, None) == "0.500" and fmt_pm(0.25, 0.0, "train/clipped_fraction") == "25%"
