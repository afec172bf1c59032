"""Confidence intervals for experiment results: a two-level bootstrap over seeds, then problems.

A unit is one test problem of one seed (each seed has its own test problems and its own
trained model). Every arm of a sweep is evaluated on the same units, so two arms are compared
*paired*: a draw picks the same units for both arms, which removes the problem-to-problem
variance that both arms share.

A seed's training run is itself one draw: an interval over pooled problem x seed units treats the
runs as given, so one seed's outlier run could look "resolved" (issue 23). Each draw therefore
resamples the seeds with replacement, then the problems within each drawn seed
(`hierarchical_bootstrap`); with one seed only problems can be resampled (scipy's bootstrap), and
such an estimate says nothing about run-to-run variance. Each seed's own value is shown beside it.

With few seeds the two-level percentile bootstrap is too narrow: its seed draws come from 3 runs, so
the interval is about the spread of 3 values. On null effects with a real run-to-run spread (3 seeds x
400 problems, tests/test_stats.py; 1,000 gave the same) it excluded 0 in ~19% of draws instead of 5%. The interval of a
paired difference (what "resolved" is said of) is therefore the union of the bootstrap interval and
Student's t interval over the per-seed values (k seeds, k - 1 degrees of freedom: a run is one draw of
training, and each seed's value carries its own problems' noise). A difference is resolved when that
interval excludes 0 and at least MIN_SEEDS seeds have a value (`Estimate.resolved`); that made ~5% of
the same null effects resolved. A level (one arm's accuracy) keeps the bootstrap interval, bounded by
the values the metric can take: with 3 seeds read it as a description of these runs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
MIN_SEEDS = 3  # seeds with a value that a resolved difference needs (fewer: run-to-run variance is a guess)


@dataclass
class Estimate:
    value: float           # the statistic on all units
    low: float             # 95% interval: the bootstrap's, widened to the per-seed t interval (module doc)
    high: float
    per_seed: list[float | None]  # the statistic on each seed's units alone
    undefined_resamples: int = 0  # bootstrap draws where the statistic was undefined (a ratio over 0)
    levels: str = "seeds+problems"  # what the draws resample; "problems" with one seed
    bootstrap_low: float | None = None   # the bootstrap's own percentile interval (None: the same as low, high)
    bootstrap_high: float | None = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def resolved(self) -> bool:
        """The interval excludes 0, over at least MIN_SEEDS seeds with a value (one seed's run may be the
        outlier, and two say little of how runs spread)."""
        seeds = sum(v is not None for v in self.per_seed)
        return (self.levels == "seeds+problems" and seeds >= MIN_SEEDS
                and bool(np.isfinite(self.low) and np.isfinite(self.high)) and not self.low <= 0 <= self.high)

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "per_seed": self.per_seed,
                "undefined_resamples": self.undefined_resamples, "levels": self.levels,
                "bootstrap_low": self.bootstrap_low, "bootstrap_high": self.bootstrap_high}


def seed_t_interval(per_seed: list[float | None]) -> tuple[float, float]:
    """Student's t 95% interval of the mean of the per-seed values that are defined (k of them, k - 1
    degrees of freedom); (nan, nan) with fewer than 2."""
    values = np.array([v for v in per_seed if v is not None], dtype=float)
    if len(values) < 2:
        return np.nan, np.nan
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _ratio(num, den, axis=-1):
    den_sum = np.sum(den, axis=axis)
    return np.divide(np.sum(num, axis=axis), den_sum, out=np.full(np.shape(den_sum), np.nan),
                     where=den_sum > 0)


def _difference(statistic: Callable, n_args: int) -> Callable:
    """statistic(arm arrays) - statistic(baseline arrays), over the same resampled units."""
    def diff(*arrays, axis=-1):
        return statistic(*arrays[:n_args], axis=axis) - statistic(*arrays[n_args:], axis=axis)
    return diff


def hierarchical_bootstrap(arrays: list[np.ndarray], statistic: Callable, seed_of_unit: np.ndarray,
                           seed: int = 0, resamples: int = RESAMPLES) -> tuple[float, float, int]:
    """(low, high, undefined draws) of the percentile interval of a two-level bootstrap: each draw
    resamples the seeds (training runs) with replacement, then the units within each drawn seed. A
    seed's run is one draw of training, so its variance enters the interval, which a pooled bootstrap
    over problem x seed units leaves out. Arrays stay paired: every array is drawn at the same indices."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(seed_of_unit == s) for s in np.unique(seed_of_unit)]
    sizes = {len(g) for g in groups}
    draws = np.empty(resamples)
    if len(sizes) == 1:  # the usual case (every seed has its test problems): one vectorised draw
        n = sizes.pop()
        picked = rng.integers(len(groups), size=(resamples, len(groups)))           # seeds
        within = rng.integers(n, size=(resamples, len(groups), n))                  # units of each drawn seed
        index = np.stack(groups)[picked[:, :, None], within].reshape(resamples, -1)
        draws = np.asarray(statistic(*(a[index] for a in arrays), axis=-1), dtype=float)
    else:
        for b in range(resamples):
            index = np.concatenate([g[rng.integers(len(g), size=len(g))]
                                    for g in (groups[i] for i in rng.integers(len(groups), size=len(groups)))])
            draws[b] = statistic(*(a[index] for a in arrays), axis=-1)
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return np.nan, np.nan, resamples
    low, high = np.percentile(finite, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return float(low), float(high), int(resamples - len(finite))


def bootstrap(arrays: list[np.ndarray], statistic: Callable, seed_of_unit: np.ndarray,
              seed: int = 0, seed_t: bool = False) -> Estimate | None:
    """The statistic with its paired 95% interval: two-level (seeds, then problems) with several
    seeds, problems only with one; None if undefined on all units (e.g. a precision without a BT run).
    seed_t: widen it to the t interval over the seeds' own values (a difference: module doc)."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    seed_of_unit = np.asarray(seed_of_unit)
    value = float(statistic(*arrays))
    if not np.isfinite(value):
        return None
    per_seed = []
    for s in np.unique(seed_of_unit):
        v = float(statistic(*(a[seed_of_unit == s] for a in arrays)))
        per_seed.append(v if np.isfinite(v) else None)
    levels = "seeds+problems" if len(per_seed) > 1 else "problems"
    if all(np.ptp(a) == 0 for a in arrays):  # nothing varies: the interval is the point
        return Estimate(value, value, value, per_seed, 0, levels)
    if levels == "seeds+problems":
        low, high, dropped = hierarchical_bootstrap(arrays, statistic, seed_of_unit, seed)
        t_low, t_high = seed_t_interval(per_seed)
        if not seed_t or not (np.isfinite(low) and np.isfinite(high) and np.isfinite(t_low) and np.isfinite(t_high)):
            return Estimate(value, low, high, per_seed, dropped, levels)  # with seed_t: too few values to resolve
        return Estimate(value, min(low, t_low), max(high, t_high), per_seed, dropped, levels, low, high)
    with warnings.catch_warnings():  # a ratio with no BT run in some resamples is NaN there: handled below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(arrays, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                              confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    # Resamples where a ratio is undefined (no BT run drawn) are NaN and scipy gives NaN bounds:
    # the interval is then over the defined resamples (conditional on some run); how many were
    # dropped is kept with it.
    dropped = int((~np.isfinite(res.bootstrap_distribution)).sum())
    if not (np.isfinite(low) and np.isfinite(high)):
        dist = res.bootstrap_distribution[np.isfinite(res.bootstrap_distribution)]
        low, high = np.percentile(dist, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return Estimate(value, float(low), float(high), per_seed, dropped, levels)


def mean_estimate(values, seed_of_unit, seed: int = 0) -> Estimate | None:
    """Mean over units, e.g. answer accuracy from 0/1 per problem."""
    return bootstrap([values], _mean, seed_of_unit, seed)


def mean_of_differences(values, seed_of_unit, seed: int = 0) -> Estimate | None:
    """Mean over units of per-unit differences already paired (BT allowed minus banned on one problem):
    a difference, so its interval is widened as `paired_mean_difference`'s is."""
    return bootstrap([values], _mean, seed_of_unit, seed, seed_t=True)


def ratio_estimate(numerator, denominator, seed_of_unit, seed: int = 0) -> Estimate | None:
    """sum(numerator) / sum(denominator) over units, e.g. BT precision = justified runs / runs."""
    return bootstrap([numerator, denominator], _ratio, seed_of_unit, seed)


def paired_mean_difference(arm, baseline, seed_of_unit, seed: int = 0) -> Estimate | None:
    return bootstrap([arm, baseline], _difference(_mean, 1), seed_of_unit, seed, seed_t=True)


def paired_ratio_difference(arm_num, arm_den, base_num, base_den, seed_of_unit, seed: int = 0) -> Estimate | None:
    return bootstrap([arm_num, arm_den, base_num, base_den], _difference(_ratio, 2), seed_of_unit, seed, seed_t=True)


def unpaired_resolution(n_units: int, p: float = 0.5) -> float:
    """Half-width of a 95% normal interval for the difference of two independent proportions
    near p with n_units each: the smallest difference such sizes resolve without pairing."""
    return float(stats.norm.ppf(0.5 + CONFIDENCE / 2) * np.sqrt(2 * p * (1 - p) / n_units))
