"""The report's verdicts: quantiles against published tables, the verdict rules, and a calibration of the exact
functions the report uses (verdicts.judge_report) on simulated studies: null studies must state a difference in at
most 5% of cases (plus simulation error), for the ranking metric and for the whole family of keys; studies with a
real effect show the power, beside the method the report used before (an unadjusted paired t-interval per arm
against the best, report.stats.rank_arms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusers_optim.report.stats import rank_arms
from diffusers_optim.report.verdicts import (
    EQUIVALENT,
    NEGLIGIBLE,
    NO_INTERVAL,
    TIED,
    WORSE,
    classify,
    family_alphas,
    judge,
    judge_report,
    tukey_critical,
)

RANKING = "eval/fd"
KEYS = [RANKING, "val/loss", "val_t/000-249", "val_t/250-499", "val_t/500-749", "val_t/750-999"]
STUDIES = int(__import__("os").environ.get("VERDICT_STUDIES", 2000))
LIMIT = 0.065  # 5% plus the simulation error of 2000 studies (about 3 standard errors of a 5% share)


@pytest.mark.parametrize(("k", "df", "q"), [(3, 10, 3.877), (4, 20, 3.958), (6, 10, 4.912), (5, 60, 3.977)])
def test_the_critical_value_is_the_published_studentized_range_over_sqrt2(k, df, q):
    """Studentized range q(0.95; k, df) from the standard tables (e.g. Montgomery, Design and Analysis of
    Experiments, Table VII)."""
    assert tukey_critical(k, df, 0.05) == pytest.approx(q / math.sqrt(2), abs=2e-3)


def test_two_arms_are_one_paired_t_interval():
    from scipy.stats import t

    assert tukey_critical(2, 4, 0.05) == pytest.approx(float(t.ppf(0.975, 4)))
    a, b = {0: 1.0, 1: 2.0, 2: 3.5}, {0: 1.5, 1: 2.9, 2: 3.9}
    v = judge({"a": a, "b": b}, "val/loss", 0.05).verdicts[0]
    d = [b[s] - a[s] for s in a]
    half = float(t.ppf(0.975, 2)) * np.std(d, ddof=1) / math.sqrt(3)
    assert (v.diff, v.high - v.low) == pytest.approx((np.mean(d), 2 * half))


def test_the_family_budget_gives_half_to_the_ranking_metric():
    alphas = family_alphas(KEYS, RANKING)
    assert alphas[RANKING] == pytest.approx(0.025) and sum(alphas.values()) == pytest.approx(0.05)
    assert len({alphas[k] for k in KEYS[1:]}) == 1
    assert family_alphas([RANKING], RANKING) == {RANKING: 0.05}


@pytest.mark.parametrize(("diff", "half", "min_effect", "verdict"), [
    (0.5, 0.2, 0.1, WORSE),  # resolved and large enough to matter
    (0.05, 0.02, 0.1, EQUIVALENT),  # the whole interval inside (-0.1, 0.1)
    (0.08, 0.05, 0.1, NEGLIGIBLE),  # resolved, but below the smallest difference that matters
    (0.3, 0.5, 0.1, TIED),
    (0.3, 0.2, 0.0, WORSE),  # no min_effect: any resolved difference
])
def test_classify(diff, half, min_effect, verdict):
    assert classify(diff, half, min_effect) == verdict


def test_one_seed_gives_no_interval_and_higher_is_better_is_respected():
    one = judge({"a": {0: 1.0}, "b": {0: 2.0}}, "val/loss", 0.05)
    assert one.best == "a" and one.verdicts[0].verdict == NO_INTERVAL and one.claims == 0
    acc = judge({"a": {0: 0.5, 1: 0.6}, "b": {0: 0.9, 1: 0.95}}, "eval/precision", 0.05)
    assert acc.best == "b" and acc.verdicts[0].diff == pytest.approx(0.375)


# ---- calibration on simulated studies -------------------------------------------------------------------------


def simulate(rng, k: int, n: int, spreads, diverge: bool = False, effect: float = 0.0) -> dict:
    """One study: {key: {arm: {seed: value}}}. A seed effect shared by every arm (data order, noise, init), noise
    correlated across the keys (metrics and buckets of one run move together), per-arm spreads; optionally arm 0
    better by `effect` on every key, or arm 1 diverging on seed 0."""
    seed_effect = rng.normal(0, 3, (1, n, 1))
    noise = rng.standard_normal((k, n, len(KEYS))) @ CORRELATE * np.asarray(spreads)[:, None, None]
    values = 10 + seed_effect + noise
    values[1:] += effect
    if diverge:
        values[1, 0] += 20
    by_key = values.transpose(2, 0, 1).tolist()
    return {key: {f"arm{a}": dict(enumerate(by_key[j][a])) for a in range(k)} for j, key in enumerate(KEYS)}


# noise with correlation 0.7 between any two keys: standard normals times the Cholesky factor's transpose
CORRELATE = np.linalg.cholesky(np.full((len(KEYS), len(KEYS)), 0.7) + 0.3 * np.eye(len(KEYS))).T


SCENARIOS = {"equal spreads": (lambda k: [1.0] * k, False),
             "spreads 1x-2x": (lambda k: np.linspace(1, 2, k), False),
             "spreads 2x-1x": (lambda k: np.linspace(2, 1, k), False),
             "one arm diverged on one seed": (lambda k: [1.0] * k, True)}


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4, 6])  # one test per arm count, so the suite's workers share them
def test_null_studies_state_a_difference_in_at_most_5_percent(k, capsys):
    """K in {2, 4, 6} arms, n in {2, 3, 5} seeds, four kinds of spread: no real difference between the arms, so
    every difference the report would state is false. Measured per configuration, 2000 studies each."""
    rng = np.random.default_rng(2026 + k)
    rows = []
    for n in (2, 3, 5):
        for scenario, (spreads, diverge) in SCENARIOS.items():
            ranking = family = 0
            for _ in range(STUDIES):
                verdicts = judge_report(simulate(rng, k, n, spreads(k), diverge), RANKING)
                ranking += verdicts[RANKING].claims > 0
                family += any(v.claims for v in verdicts.values())
            rows.append((n, scenario, ranking / STUDIES, family / STUDIES))
    with capsys.disabled():
        print("\nnull studies with a resolved claim (ranking metric, whole family):")
        for n, scenario, ranking, family in rows:
            print(f"  K={k} n={n} {scenario:30s} {ranking:6.3f} {family:6.3f}")
    worst = max(rows, key=lambda r: r[3])
    assert all(r[2] <= LIMIT and r[3] <= LIMIT for r in rows), worst


def today_resolves_all(per_arm: dict) -> bool:
    """The method the report used before: each arm against the best by an unadjusted paired t-interval."""
    ranked = rank_arms(per_arm, RANKING)
    return ranked[0]["arm"] == "arm0" and not any(r["tied"] for r in ranked[1:])


def unpooled_resolves_all(per_arm: dict, alpha: float) -> bool:
    """The same simultaneous (Tukey) intervals without pooling: each pair's own paired SE, n - 1 df."""
    arms = list(per_arm)
    y = np.array([[per_arm[a][s] for s in sorted(per_arm[a])] for a in arms])
    k, n = y.shape
    crit = tukey_critical(k, n - 1, alpha)
    best = int(np.argmin(y.mean(1)))
    if arms[best] != "arm0":
        return False
    d = y - y[best]
    return all(d[i].mean() > crit * d[i].std(ddof=1) / math.sqrt(n) for i in range(k) if i != best)


@pytest.mark.slow
def test_power_of_the_pooled_analysis_beside_unpooled_and_todays(capsys):
    """Arm 0 better by 3 noise standard deviations on every key, equal spreads (the pooled analysis's assumption):
    the share of studies that resolve arm 0 better than every other arm. Pooling must not lose power against the
    same simultaneous intervals without it; today's method is shown for reference (its error rate is not 5%)."""
    rng = np.random.default_rng(7)
    rows = []
    for k in (2, 4, 6):
        for n in (2, 3, 5):
            ours = unpooled = today = 0
            for _ in range(STUDIES // 4):
                study = simulate(rng, k, n, [1.0] * k, effect=3.0)
                verdicts = judge_report(study, RANKING)
                ours += verdicts[RANKING].resolved_best
                unpooled += unpooled_resolves_all(study[RANKING], verdicts[RANKING].alpha)
                today += today_resolves_all(study[RANKING])
            rows.append((k, n, *(x / (STUDIES // 4) for x in (ours, unpooled, today))))
    with capsys.disabled():
        print("\npower (arm 0 resolved best): pooled (ours), unpooled, unadjusted (before)")
        for k, n, ours, unpooled, today in rows:
            print(f"  K={k} n={n}  {ours:6.3f} {unpooled:6.3f} {today:6.3f}")
    assert all(ours >= unpooled for _, _, ours, unpooled, _ in rows), rows
    assert rows[-1][2] > 0.3  # 6 arms, 5 seeds, a 3-sigma effect: found in about half the studies (0.486 measured)


def test_min_effect_flags_are_parsed_or_refused_in_one_line():
    from diffusers_optim.errors import UserError
    from diffusers_optim.report.verdicts import parse_min_effects

    assert parse_min_effects(["eval/fd=0.05", "val/loss=1e-3"]) == {"eval/fd": 0.05, "val/loss": 0.001}
    assert parse_min_effects(None) == {}
    for bad in ("eval/fd", "eval/fd=x", "=0.1", "val/loss=-1", "val/loss=nan"):
        with pytest.raises(UserError, match="expected METRIC=VALUE"):
            parse_min_effects([bad])
