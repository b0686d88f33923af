"""Statistics over seeds: mean, std, n and a 95% t-interval per arm; differences between arms paired by seed.

Pure functions of lists and dicts of numbers, so each is tested against a known answer. scipy gives the
t quantile; nothing else here needs more than the standard library.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from diffusers_optim.metrics.keys import higher_is_better

CONFIDENCE = 0.95


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided t critical value for a mean of n values (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its sample std (ddof=1), n and 95% t-interval (None when n < 2)."""

    mean: float | None
    std: float | None
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def estimate(values: list[float]) -> Estimate:
    """Mean, std, n and the 95% t-interval of finite values (non-finite ones are left out)."""
    values = [v for v in values if math.isfinite(v)]
    n = len(values)
    if n == 0:
        return Estimate(None, None, 0, None, None)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, None, 1, None, None)
    std = statistics.stdev(values)
    half = t_quantile(n) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """`a - b` of one metric over the seeds both arms finished, with its interval and verdict."""

    a: str
    b: str
    metric: str
    seeds: list[int]
    estimate: Estimate

    @property
    def resolved(self) -> bool:
        """True when the 95% interval of the paired difference excludes zero."""
        e = self.estimate
        return e.low is not None and (e.low > 0 or e.high < 0)

    def as_dict(self) -> dict:
        return dict(a=self.a, b=self.b, metric=self.metric, seeds=self.seeds, resolved=self.resolved,
                    **self.estimate.as_dict())  # fmt: skip


def paired_difference(a: dict[int, float], b: dict[int, float], names=("a", "b"), metric="") -> Difference:
    """The per-seed differences a[s] - b[s] over the seeds where both are finite, as an Estimate.

    Pairing by seed removes what the seed does to both arms alike (data order, noise, init), which is
    most of the spread when arms are close.
    """
    seeds = sorted(s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s]))
    return Difference(names[0], names[1], metric, seeds, estimate([a[s] - b[s] for s in seeds]))


def rank_arms(per_seed: dict[str, dict[int, float]], metric: str) -> list[dict]:
    """Arms in order of their mean (best first), each marked tied or not with the best; arms without a value come
    after them with rank None: they are left out of the ranking, never ranked last as if they had lost.

    An arm is tied with the best when the paired difference's interval contains zero, or when fewer than two
    seeds pair up (nothing is resolved from one seed).
    """
    sign = -1.0 if higher_is_better(metric) else 1.0
    means = {arm: estimate(list(v.values())).mean for arm, v in per_seed.items()}
    order = sorted(per_seed, key=lambda arm: (means[arm] is None, sign * (means[arm] or 0.0)))
    best = order[0] if order and means[order[0]] is not None else None
    ranked = []
    for position, arm in enumerate(order, start=1):
        rank = position if means[arm] is not None else None
        row: dict = dict(arm=arm, rank=rank, best=arm == best, tied=False, diff_vs_best=None)
        if arm != best and rank is not None:
            diff = paired_difference(per_seed[arm], per_seed[best], (arm, best), metric)
            row.update(tied=not diff.resolved, diff_vs_best=diff.as_dict())
        ranked.append(row)
    return ranked
