"""Confidence intervals for experiment results: scipy's bootstrap over evaluation units.

A unit is one test problem of one seed (each seed has its own test problems and its own
trained model). Every arm of a sweep is evaluated on the same units, so two arms are compared
*paired*: the bootstrap resamples units and recomputes both arms' statistic on the same draw,
which removes the problem-to-problem variance that both arms share.

Seeds are pooled into the units, which treats the 3 training runs as given: a difference that
one seed drives can still get a narrow interval. Reports therefore show each seed's own value
beside the interval (halluc.core.stats.per_seed), and call a difference resolved only when the
interval excludes 0 and every seed agrees in sign (`resolved`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass
class Estimate:
    value: float           # the statistic on all units
    low: float             # 95% bootstrap interval (percentile)
    high: float
    per_seed: list[float | None]  # the statistic on each seed's units alone
    undefined_resamples: int = 0  # bootstrap draws where the statistic was undefined (a ratio over 0)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def resolved(self) -> bool:
        """The interval excludes 0 and every seed's value has the same sign as the estimate."""
        if self.low <= 0 <= self.high:
            return False
        sign = np.sign(self.value)
        return all(v is not None and np.sign(v) == sign for v in self.per_seed)

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "per_seed": self.per_seed,
                "undefined_resamples": self.undefined_resamples}


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


def bootstrap(arrays: list[np.ndarray], statistic: Callable, seed_of_unit: np.ndarray,
              seed: int = 0) -> Estimate | None:
    """The statistic with its paired 95% bootstrap interval; None if undefined on all units
    (e.g. a precision without a single BT run)."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    value = float(statistic(*arrays))
    if not np.isfinite(value):
        return None
    per_seed = []
    for s in np.unique(seed_of_unit):
        v = float(statistic(*(a[seed_of_unit == s] for a in arrays)))
        per_seed.append(v if np.isfinite(v) else None)
    if all(np.ptp(a) == 0 for a in arrays):  # nothing varies: the interval is the point
        return Estimate(value, value, value, per_seed)
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
    return Estimate(value, float(low), float(high), per_seed, dropped)


def mean_estimate(values, seed_of_unit, seed: int = 0) -> Estimate | None:
    """Mean over units, e.g. answer accuracy from 0/1 per problem."""
    return bootstrap([values], _mean, seed_of_unit, seed)


def ratio_estimate(numerator, denominator, seed_of_unit, seed: int = 0) -> Estimate | None:
    """sum(numerator) / sum(denominator) over units, e.g. BT precision = justified runs / runs."""
    return bootstrap([numerator, denominator], _ratio, seed_of_unit, seed)


def paired_mean_difference(arm, baseline, seed_of_unit, seed: int = 0) -> Estimate | None:
    return bootstrap([arm, baseline], _difference(_mean, 1), seed_of_unit, seed)


def paired_ratio_difference(arm_num, arm_den, base_num, base_den, seed_of_unit, seed: int = 0) -> Estimate | None:
    return bootstrap([arm_num, arm_den, base_num, base_den], _difference(_ratio, 2), seed_of_unit, seed)


def unpaired_resolution(n_units: int, p: float = 0.5) -> float:
    """Half-width of a 95% normal interval for the difference of two independent proportions
    near p with n_units each: the smallest difference such sizes resolve without pairing."""
    return float(stats.norm.ppf(0.5 + CONFIDENCE / 2) * np.sqrt(2 * p * (1 - p) / n_units))
