"""The statistics of the experiment runner, on data whose answer is known."""
import numpy as np
import pytest

from halluc.core.stats import (mean_estimate, paired_mean_difference, paired_ratio_difference, ratio_estimate,
                          unpaired_resolution)

N = 1000  # problems per seed


def units(seeds=3, n=N):
    return np.repeat(np.arange(seeds), n)


def test_mean_interval_has_the_normal_width_and_per_seed_values():
    rng = np.random.default_rng(0)
    x = (rng.random(3 * N) < 0.6).astype(float)
    e = mean_estimate(x, units())
    half = 1.96 * np.sqrt(0.6 * 0.4 / (3 * N))
    assert e.low < x.mean() < e.high and e.value == pytest.approx(x.mean())
    assert e.half_width == pytest.approx(half, rel=0.15)
    assert e.per_seed == pytest.approx([x[:N].mean(), x[N:2 * N].mean(), x[2 * N:].mean()])


def test_paired_difference_resolves_a_real_effect_and_not_a_shuffle():
    rng = np.random.default_rng(1)
    base = (rng.random(3 * N) < 0.6).astype(float)
    better = base.copy()
    better[rng.choice(np.flatnonzero(base == 0), 90, replace=False)] = 1.0  # +3 points, same problems
    e = paired_mean_difference(better, base, units())
    assert e.value == pytest.approx(0.03) and e.low > 0 and e.resolved()
    # pairing makes the interval far tighter than comparing two independent samples
    assert e.half_width < 0.5 * unpaired_resolution(3 * N, 0.6)
    # negative control: the same accuracy on other problems (a shuffle) is not an effect
    shuffled = rng.permutation(base)
    control = paired_mean_difference(shuffled, base, units())
    assert control.low < 0 < control.high and not control.resolved()


def test_resolved_needs_every_seed_to_agree():
    rng = np.random.default_rng(2)
    base = (rng.random(3 * N) < 0.5).astype(float)
    arm = base.copy()
    arm[:N][base[:N] == 0] = 1.0           # seed 0: a large gain
    lose = np.flatnonzero(base[2 * N:] == 1)[:30] + 2 * N
    arm[lose] = 0.0                         # seed 2: loses 3 points
    e = paired_mean_difference(arm, base, units())
    assert e.low > 0 and e.per_seed[2] < 0 and not e.resolved()


def test_ratio_metrics():
    runs = np.array([0, 2, 1, 0, 3, 0], dtype=float)
    justified = np.array([0, 1, 1, 0, 3, 0], dtype=float)
    seeds = np.array([0, 0, 0, 1, 1, 1])
    e = ratio_estimate(justified, runs, seeds)
    assert e.value == pytest.approx(5 / 6) and e.per_seed == pytest.approx([2 / 3, 1.0])
    assert ratio_estimate(np.zeros(6), np.zeros(6), seeds) is None  # no BT run at all: undefined
    d = paired_ratio_difference(justified, runs, np.zeros(6), runs, seeds)
    assert d.value == pytest.approx(5 / 6)
