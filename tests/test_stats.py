"""The statistics of the experiment runner, on data whose answer is known."""
import numpy as np
import pytest

from halluc.core.stats import (mean_estimate, paired_mean_difference, paired_ratio_difference, ratio_estimate,
                          unpaired_resolution)

N = 1000  # problems per seed


def units(seeds=3, n=N):
    return np.repeat(np.arange(seeds), n)


def test_mean_interval_covers_problem_and_run_variance_and_per_seed_values():
    """Three seeds from one distribution: the two-level interval of a level is wider than the pooled-units
    normal interval (it adds the spread of the seeds' own means), not absurdly so, and holds the mean;
    a difference's interval holds its bootstrap interval and the per-seed t interval."""
    from halluc.core.stats import seed_t_interval

    rng = np.random.default_rng(0)
    x = (rng.random(3 * N) < 0.6).astype(float)
    e = mean_estimate(x, units())
    pooled = 1.96 * np.sqrt(0.6 * 0.4 / (3 * N))
    assert e.low < x.mean() < e.high and e.value == pytest.approx(x.mean()) and e.levels == "seeds+problems"
    assert pooled < e.half_width < 3 * pooled
    assert e.per_seed == pytest.approx([x[:N].mean(), x[N:2 * N].mean(), x[2 * N:].mean()])
    d = paired_mean_difference(x, rng.permutation(x), units())
    t_low, t_high = seed_t_interval(d.per_seed)
    assert d.low == min(d.bootstrap_low, t_low) and d.high == max(d.bootstrap_high, t_high)


def slow_two_level_interval(arrays, statistic, seeds, resamples, rng):
    """The obvious version: pick seeds with replacement, then each picked seed's problems."""
    groups = [np.flatnonzero(seeds == s) for s in np.unique(seeds)]
    draws = []
    for _ in range(resamples):
        picked = [groups[i] for i in rng.integers(len(groups), size=len(groups))]
        index = np.concatenate([g[rng.integers(len(g), size=len(g))] for g in picked])
        draws.append(statistic(*(a[index] for a in arrays)))
    return np.percentile(draws, [2.5, 97.5])


@pytest.mark.parametrize("sizes", [(400, 400, 400), (300, 500, 200, 400)])
def test_the_two_level_bootstrap_equals_the_obvious_loop(sizes):
    """Vectorised (equal seeds) and looped (unequal) paths against a slow reference, paired arrays:
    the same interval within Monte Carlo error."""
    from halluc.core.stats import _difference, _mean, hierarchical_bootstrap

    rng = np.random.default_rng(3)
    seeds = np.repeat(np.arange(len(sizes)), sizes)
    effect = np.repeat(rng.normal(0.05, 0.04, len(sizes)), sizes)  # each run its own effect
    base = (rng.random(len(seeds)) < 0.5).astype(float)
    arm = np.clip(base + (rng.random(len(seeds)) < effect), 0, 1)
    diff = _difference(_mean, 1)
    low, high, _ = hierarchical_bootstrap([arm, base], diff, seeds, seed=0, resamples=6000)
    ref_low, ref_high = slow_two_level_interval([arm, base], diff, seeds, 6000, np.random.default_rng(1))
    width = ref_high - ref_low
    assert abs(low - ref_low) < 0.1 * width and abs(high - ref_high) < 0.1 * width


def test_paired_difference_resolves_a_real_effect_and_not_a_shuffle():
    rng = np.random.default_rng(1)
    base = (rng.random(3 * N) < 0.6).astype(float)
    better = base.copy()
    better[rng.choice(np.flatnonzero(base == 0), 90, replace=False)] = 1.0  # +3 points, same problems
    e = paired_mean_difference(better, base, units())
    assert e.value == pytest.approx(0.03) and e.low > 0 and e.resolved()
    # pairing makes the bootstrap interval far tighter than comparing two independent samples
    assert (e.bootstrap_high - e.bootstrap_low) / 2 < 0.5 * unpaired_resolution(3 * N, 0.6)
    # negative control: the same accuracy on other problems (a shuffle) is not an effect
    shuffled = rng.permutation(base)
    control = paired_mean_difference(shuffled, base, units())
    assert control.low < 0 < control.high and not control.resolved()


def test_one_seeds_outlier_run_is_not_resolved_though_pooled_units_would_be():
    """Issue 23, item 5: seed 0's run gains 50 points, seeds 1 and 2 lose 3. Pooled over problem x seed
    units the interval excludes 0 (the old report called it resolved); resampling the runs too, it
    does not. The negative control: the pooled-units bootstrap on the same data."""
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(2)
    base = (rng.random(3 * N) < 0.5).astype(float)
    arm = base.copy()
    arm[:N][base[:N] == 0] = 1.0           # seed 0: a large gain
    for s in (1, 2):
        arm[np.flatnonzero(base[s * N:(s + 1) * N] == 1)[:30] + s * N] = 0.0   # seeds 1, 2: lose 3 points
    e = paired_mean_difference(arm, base, units())
    assert e.low < 0 < e.high and not e.resolved() and e.per_seed[0] > 0.4
    pooled = scipy_stats.bootstrap([arm, base], lambda a, b, axis=-1: a.mean(axis) - b.mean(axis), paired=True,
                                   n_resamples=2000, method="percentile", rng=np.random.default_rng(0))
    assert pooled.confidence_interval.low > 0  # what the old, pooled interval said


def test_one_seed_resamples_problems_and_never_resolves():
    rng = np.random.default_rng(4)
    base = (rng.random(N) < 0.5).astype(float)
    arm = np.maximum(base, (rng.random(N) < 0.3).astype(float))  # +15 points
    e = paired_mean_difference(arm, base, np.zeros(N))
    assert e.levels == "problems" and e.low > 0.1 and not e.resolved()


def test_ratio_metrics():
    runs = np.array([0, 2, 1, 0, 3, 0], dtype=float)
    justified = np.array([0, 1, 1, 0, 3, 0], dtype=float)
    seeds = np.array([0, 0, 0, 1, 1, 1])
    e = ratio_estimate(justified, runs, seeds)
    assert e.value == pytest.approx(5 / 6) and e.per_seed == pytest.approx([2 / 3, 1.0])
    assert ratio_estimate(np.zeros(6), np.zeros(6), seeds) is None  # no BT run at all: undefined
    d = paired_ratio_difference(justified, runs, np.zeros(6), runs, seeds)
    assert d.value == pytest.approx(5 / 6)


def test_arms_are_paired_by_problem_id_and_different_problems_are_refused():
    """Issue 23, item 5: arms were paired by index with only a length check."""
    from halluc.pipeline.report import paired_by_id

    base = {"id": ["a", "b", "c"], "answer_correct": [1, 0, 1]}
    arm = {"id": ["c", "a", "b"], "answer_correct": [0, 1, 1]}
    assert paired_by_id(arm, base, "seed 0") == {"id": ["a", "b", "c"], "answer_correct": [1, 1, 0]}
    with pytest.raises(ValueError, match="seed 0: the arms were evaluated on different problems \\(1 of"):
        paired_by_id({"id": ["a", "b", "d"], "answer_correct": [1, 1, 1]}, base, "seed 0")
    twice = {"id": ["a", "b", "a"], "answer_correct": [1, 0, 0]}  # a prompt listed twice: copies match in order
    assert paired_by_id({"id": ["a", "a", "b"], "answer_correct": [1, 0, 1]}, twice, "s")["answer_correct"] == [1, 1, 0]
    old = {"answer_correct": [1, 1]}  # runs from before ids: by position, same count required
    with pytest.raises(ValueError, match="different problems"):
        paired_by_id(old, {"answer_correct": [1, 0, 1]}, "seed 0")


def test_an_interval_of_undefined_draws_is_not_resolved():
    from halluc.core.stats import Estimate

    assert not Estimate(0.3, float("nan"), float("nan"), [0.2, 0.4, 0.3]).resolved()
    assert Estimate(0.3, 0.1, 0.5, [0.2, 0.4, 0.3]).resolved()
    # fewer than MIN_SEEDS seeds with a value resolve nothing: two runs, or a ratio defined in one seed
    assert not Estimate(0.3, 0.1, 0.5, [0.2, 0.4]).resolved()
    assert not Estimate(0.3, 0.1, 0.5, [0.5, None, None]).resolved()


def null_effects(reps: int, rules: dict, seeds: int = 3, n: int = 400, spread: float = 0.15) -> dict:
    """{rule: the share of `reps` null comparisons it calls resolved}: both arms from one distribution
    (each run its own draw of quality, `spread` on the probit scale; the same problems)."""
    rng = np.random.default_rng(5)
    hits = dict.fromkeys(rules, 0)
    for r in range(reps):
        z = rng.normal(size=(seeds, n))  # the problems' difficulty, shared by both arms (pairing)
        arm, base = ((z + 0.5 * rng.normal(size=(seeds, n)) < 0.3 + spread * rng.normal(size=(seeds, 1)))
                     .astype(float).ravel() for _ in range(2))
        e = paired_mean_difference(arm, base, units(seeds, n), seed=r)
        for name, rule in rules.items():
            hits[name] += rule(e)
    return {name: h / reps for name, h in hits.items()}


def test_null_effects_are_resolved_about_5_percent_of_the_time_with_3_seeds():
    """Issue found at stop 36: with 3 seeds the two-level bootstrap alone is too narrow (its seed draws
    come from 3 runs) and called ~19% of null effects resolved; the reported interval, widened to the
    per-seed t interval, calls ~4%. Negative control: the bootstrap interval alone, on the same draws."""
    rates = null_effects(150, {"reported": lambda e: e.resolved(),
                               "bootstrap alone": lambda e: not e.bootstrap_low <= 0 <= e.bootstrap_high})
    assert rates["reported"] <= 0.09 and rates["bootstrap alone"] >= 0.12, rates


def _record(arm, seed, before, after):
    split = lambda acc: {"test_id": {"per_problem": {"id": [f"p{i}" for i in range(len(acc))], "answer_correct": acc},  # noqa: E731
                                     "first_error_kinds": {}}}
    return {"setting": "default", "arm": arm, "seed": seed, "before": split(before), "after": split(after)}


def test_an_arm_that_trains_its_own_base_reports_it_beside_the_shared_one():
    """Retry pretraining arms (base_retry.*) start from a base of their own: it is reported as ARM/base and
    compared with the base the other arms share; an arm that changes its base without saying so is refused."""
    from types import SimpleNamespace

    from halluc.pipeline.report import BASE, analyse, collect, own_base_arms

    rng = np.random.default_rng(0)
    shared, retry_base = [list(rng.integers(0, 2, 200)) for _ in range(3)], [[1] * 200 for _ in range(3)]
    records = [r for s in range(3) for r in (_record("clean", s, shared[s], shared[s]),
                                              _record("retry", s, retry_base[s], retry_base[s]))]
    sweep = SimpleNamespace(arms={"clean": [], "retry": ["base_retry.rate=0.2"]}, baseline="clean", settings={})
    assert own_base_arms(sweep.arms) == {"retry"}
    results = analyse(sweep, records)["default"]
    assert list(results["arms"]) == [BASE, "clean", "retry", "retry/base"]
    gain = results["vs_baseline"]["retry/base"]["test_id"]["answer_acc"]  # against the shared base
    assert gain["value"] == pytest.approx(1 - np.mean(shared)) and gain["resolved"]
    with pytest.raises(ValueError, match="started from another base"):
        collect(records, ["clean", "retry"])  # not declared: a mixed-up base is an error
    # an arm that starts from another policy (a recipe's starting model, not base.*) is declared in the sweep
    other = [dict(r, arm="other") if r["arm"] == "retry" else r for r in records]
    declared = SimpleNamespace(arms={"clean": [], "other": ["errors.source=none"]}, baseline="clean", settings={},
                               own_base=["other"])
    assert list(analyse(declared, other)["default"]["arms"]) == [BASE, "clean", "other", "other/base"]


def test_backtrackings_own_effect_is_widened_as_a_difference():
    """BT's own effect (allowed minus banned, per problem) is one array of differences: its interval is a
    difference's (bootstrap and per-seed t), not a level's (halluc/pipeline/report.py DIFFERENCES)."""
    from halluc.core.stats import mean_of_differences, seed_t_interval
    from halluc.pipeline.report import DIFFERENCES, METRICS

    rng = np.random.default_rng(6)
    gain = rng.choice([-1.0, 0.0, 1.0], p=[0.05, 0.85, 0.10], size=3 * N)
    e, level = mean_of_differences(gain, units()), mean_estimate(gain, units())
    t_low, t_high = seed_t_interval(e.per_seed)
    assert (e.low, e.high) == (min(level.low, t_low), max(level.high, t_high))
    assert "bt_gain" in DIFFERENCES <= set(METRICS)
