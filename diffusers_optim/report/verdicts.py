"""Verdicts a report states about arms run over the same seeds, with the error rate of the whole report controlled.

The procedure (README "Statistics" says the same in words):

- **Seeds are blocks** shared by every arm. Per metric, the arms and the seeds every one of them finished form a
  two-way arm x seed layout; the residual variance is pooled over arms, (K-1)(n-1) degrees of freedom instead of the
  n-1 of one paired difference, which is where the power at 2-3 seeds comes from.
- **Every pair of arms gets a simultaneous interval** (Tukey's studentized range at the pooled degrees of freedom),
  so the statements about the arm that the data made best are covered too: selecting it cannot inflate them.
  Each difference's standard error is the larger of the pooled one and the pair's own (its paired-by-seed
  differences): where spreads differ between arms (SGD beside Adam, one diverged seed) the pooled one alone
  understates the noisier pairs (simulated with spreads 1x to 3x: 7-9% of null studies made a false claim).
- **The report is one family.** The ranking metric gets RANKING_SHARE of the 5% error budget; the report's other
  keys (val/loss, each timestep bucket, ...) share the rest equally (Bonferroni: valid whatever the correlation
  between metrics and buckets).
- **Practical significance.** Each metric has a smallest difference that matters (`min_effect`). A resolved
  difference below it is no win ("negligible"); an interval inside (-min_effect, +min_effect) is resolved
  equivalence (two one-sided tests at the same simultaneous level).

Pure numpy/scipy functions of {arm: {seed: value}}; scipy gives the studentized-range and t quantiles.
tests/unit/test_verdicts.py checks the quantiles against published tables and calibrates the whole procedure on
simulated null studies.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np

from diffusers_optim.metrics.keys import higher_is_better

ALPHA = 0.05  # the chance that a report of a study with no real differences states any difference at all
RANKING_SHARE = 0.5  # of ALPHA, for the ranking metric; the report's other keys share the rest

# what each verdict claims; WORSE, BETTER and NEGLIGIBLE (and a resolved best) claim that two arms differ
BEST, WORSE, BETTER, NEGLIGIBLE, EQUIVALENT, TIED, NO_INTERVAL = (
    "best", "worse", "better", "negligible", "equivalent", "tied", "no interval")
DIFFERS = (WORSE, BETTER, NEGLIGIBLE)


def family_alphas(keys: list[str], ranking: str, alpha: float = ALPHA) -> dict[str, float]:
    """The error budget of each key the report states: RANKING_SHARE of alpha to the ranking metric, the rest
    split evenly over the other keys (all of alpha to the ranking metric when it is the only key)."""
    others = [k for k in dict.fromkeys(keys) if k != ranking]
    if not others:
        return {ranking: alpha}
    return {ranking: alpha * RANKING_SHARE, **{k: alpha * (1 - RANKING_SHARE) / len(others) for k in others}}


@functools.cache
def tukey_critical(num_arms: int, df: float, alpha: float) -> float:
    """The simultaneous two-sided critical value for all pairwise differences of num_arms means, in units of one
    difference's standard error: the studentized range quantile q(1-alpha; K, df) / sqrt(2)."""
    from scipy.stats import studentized_range, t

    if num_arms == 2:  # the range of two means is one difference: exactly Student's t
        return float(t.ppf(1 - alpha / 2, df))
    return float(studentized_range.ppf(1 - alpha, num_arms, df)) / math.sqrt(2)


def complete_blocks(per_arm: dict[str, dict[int, float]]) -> tuple[list[str], list[int], np.ndarray]:
    """(arms, seeds, values K x n): the arms with a finite value, on the seeds every one of them has."""
    finite = {arm: vals if all(map(math.isfinite, vals.values())) else
              {s: v for s, v in vals.items() if math.isfinite(v)} for arm, vals in per_arm.items()}
    arms = [arm for arm, vals in finite.items() if vals]
    seeds = sorted(set.intersection(*(set(finite[a]) for a in arms))) if arms else []
    values = np.array([[finite[a][s] for s in seeds] for a in arms], dtype=float).reshape(len(arms), len(seeds))
    return arms, seeds, values


def pair_standard_errors(values: np.ndarray, row_means: np.ndarray) -> tuple[np.ndarray, float]:
    """(K x K standard errors of the differences of arm means, pooled degrees of freedom) for a K x n layout.

    Each entry is the larger of the pooled two-way one, sqrt(2 s^2 / n), and the pair's own, sd(y_i - y_j) / sqrt(n).
    """
    k, n = values.shape
    col_means = values.sum(axis=0) / k
    residual = values - row_means[:, None] - col_means[None, :] + col_means.sum() / n
    df = (k - 1) * (n - 1)
    pooled = math.sqrt(2 * float(np.einsum("ij,ij->", residual, residual)) / df / n)
    diffs = values[:, None, :] - values[None, :, :]
    centred = diffs - (row_means[:, None] - row_means[None, :])[:, :, None]
    own = np.sqrt(np.einsum("ijk,ijk->ij", centred, centred) / (n - 1) / n)
    return np.maximum(own, pooled), float(df)


@dataclass(frozen=True)
class Verdict:
    """One arm against the reference arm (the best, unless asked) on one metric: the difference (signed so that
    positive is worse), its simultaneous interval, and what it resolves."""

    arm: str
    best: str
    metric: str
    verdict: str
    diff: float | None  # arm - best, signed so that positive is worse
    low: float | None
    high: float | None
    min_effect: float
    seeds: list[int]
    resolvable: float | None  # the smallest difference these seeds resolve at this level (the half-width)
    seeds_needed: int | None  # about how many seeds the observed difference would need to be resolved

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KeyVerdicts:
    """The verdicts of one metric: arms best first (by mean), the best arm, one Verdict per arm other than the
    reference (the best unless another was asked for)."""

    metric: str
    alpha: float
    order: list[str]
    best: str | None
    verdicts: list[Verdict]
    resolved_best: bool  # the best arm is resolved better than every other arm by at least min_effect
    df: float | None
    method: str

    @property
    def claims(self) -> int:
        """How many statements of a difference between two arms this key makes."""
        return sum(v.verdict in DIFFERS for v in self.verdicts) + int(self.resolved_best)

    def of(self, arm: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.arm == arm), None)

    def as_dict(self) -> dict:
        return dict(metric=self.metric, alpha=self.alpha, order=self.order, best=self.best, df=self.df,
                    method=self.method, resolved_best=self.resolved_best,
                    verdicts=[v.as_dict() for v in self.verdicts])


def classify(diff: float, half: float, min_effect: float) -> str:
    """What an interval diff +- half (positive is worse) resolves against the smallest difference that matters."""
    low, high = diff - half, diff + half
    if min_effect > 0 and -min_effect < low and high < min_effect:
        return EQUIVALENT
    if low > 0:
        return WORSE if diff >= min_effect else NEGLIGIBLE
    if high < 0:
        return BETTER if -diff >= min_effect else NEGLIGIBLE
    return TIED


def seeds_needed(diff: float, half: float, num_seeds: int) -> int | None:
    """Seeds at which the observed difference would about fill the interval (half-width shrinks as 1/sqrt(n);
    the critical value's fall with more degrees of freedom is left out, so this errs high)."""
    if diff == 0 or half <= abs(diff):
        return None
    return max(num_seeds + 1, math.ceil(num_seeds * (half / diff) ** 2))


def judge(per_arm: dict[str, dict[int, float]], metric: str, alpha: float, min_effect: float = 0.0,
          reference: str | None = None) -> KeyVerdicts:
    """Every arm against the best (or `reference`) on one metric, with simultaneous intervals at level alpha (see
    the module doc): the intervals cover every pair at once, so any reference is as valid as the selected best."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    arms, seeds, values = complete_blocks(per_arm)
    if not arms:
        return KeyVerdicts(metric, alpha, [], None, [], False, None, "no values")
    signed = sign * values
    row_means = signed.sum(axis=1) / max(len(seeds), 1)
    if seeds:  # the arms' means on the seeds they share, so the order and the differences agree
        means = dict(zip(arms, row_means.tolist()))
    else:
        means = {a: sign * float(np.mean([v for v in per_arm[a].values() if math.isfinite(v)])) for a in arms}
    order = sorted(arms, key=lambda a: means[a])
    best = order[0]
    ref = reference if reference in arms else best
    others = [a for a in order if a != ref]
    # an arm without a value (no run finished) is said so, never left out in silence
    empty = [Verdict(a, ref, metric, NO_INTERVAL, None, None, None, min_effect, [], None, None)
             for a in per_arm if a not in arms]
    if len(seeds) < 2 or len(arms) < 2:
        verdicts = [Verdict(a, ref, metric, NO_INTERVAL, means[a] - means[ref], None, None, min_effect,
                            seeds, None, None) for a in others]
        return KeyVerdicts(metric, alpha, order, best, verdicts + empty, False, None,
                           f"no interval: {len(seeds)} seed{'s' if len(seeds) != 1 else ''} in common")
    se, df = pair_standard_errors(signed, row_means)
    crit = tukey_critical(len(arms), df, alpha)
    b = arms.index(ref)
    verdicts = []
    for a in others:
        i = arms.index(a)
        diff, half = means[a] - means[ref], float(crit * se[i, b])
        verdicts.append(Verdict(a, ref, metric, classify(diff, half, min_effect), diff, diff - half, diff + half,
                                min_effect, seeds, half, seeds_needed(diff, half, len(seeds))))
    resolved_best = ref == best and all(v.verdict == WORSE for v in verdicts)  # of the arms with a value
    verdicts += empty
    method = (f"two-way arm x seed, {len(seeds)} seeds, Tukey at {df:.0f} df, each SE the larger of pooled and "
              f"paired, alpha {alpha:.3g}")
    return KeyVerdicts(metric, alpha, order, best, verdicts, resolved_best, df, method)


def judge_report(per_key: dict[str, dict[str, dict[int, float]]], ranking: str,
                 min_effects: dict[str, float] | None = None, alpha: float = ALPHA) -> dict[str, KeyVerdicts]:
    """The verdicts of every key a report states, the family's error budget split by family_alphas."""
    alphas = family_alphas(list(per_key), ranking, alpha)
    effects = min_effects or {}
    return {key: judge(table, key, alphas[key], effects.get(key, 0.0)) for key, table in per_key.items()}


def default_min_effect(key: str, rows: list[dict]) -> float:
    """The smallest difference that matters when none is given, measured by the runs themselves: for val/loss and
    val_t/* the standard error of their own estimate (held-out images, frozen noise), for eval/fd its spread over
    independent draws of real images at the same sample count (eval_floor/fd_sd); 0 (any resolved difference)
    for a metric with neither."""
    from diffusers_optim.metrics.keys import se_key

    source = "eval_floor/fd_sd" if key == "eval/fd" else se_key(key) if key.startswith(("val/", "val_t/")) else None
    values = [float(r[source]) for r in rows if source and isinstance(r.get(source), (int, float))
              and math.isfinite(r[source])]
    return float(np.mean(values)) if values else 0.0


def parse_min_effects(items: list[str] | None) -> dict[str, float]:
    """--min_effect eval/fd=0.05 val/loss=0.001: {metric: smallest difference that matters}; one-line errors."""
    from diffusers_optim.errors import UserError

    effects = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            number = float(value) if sep and key else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or number < 0:
            raise UserError(f"--min_effect {item}: expected METRIC=VALUE with VALUE >= 0 (e.g. eval/fd=0.05)")
        effects[key] = number
    return effects


MIN_EFFECT_HELP = ("Smallest difference that matters, per metric (METRIC=VALUE ...): resolved differences below it "
                   "are no win. Default: val/loss and val_t/* their own standard error, eval/fd its spread over "
                   "draws of real images at the same sample count, other metrics 0.")
