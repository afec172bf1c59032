"""ProcessBench-style scores of a step verifier: golden values by hand, and the AUC against scipy."""
import random

import pytest

from halluc.inference.process_scores import first_below, first_false, process_score, step_auc


def test_first_below_and_first_false():
    assert first_below([0.9, 0.6, 0.4, 0.1]) == 2
    assert first_below([0.9, 0.6], threshold=0.7) == 1
    assert first_below([0.9, 0.8]) is None
    assert first_false([True, True, False, False]) == 2 and first_false([True]) is None


def test_process_score_golden():
    # erroneous: true 1 (pred 1: hit), true 0 (pred 2: miss), true 2 (pred None: miss) -> 1/3
    # correct: pred None (hit), pred 0 (miss) -> 1/2 ; F1 = 2 * (1/3) * (1/2) / (1/3 + 1/2) = 0.4
    got = process_score([1, 2, None, None, 0], [1, 0, 2, None, None])
    assert (got.erroneous, got.correct) == (3, 2)
    assert got.acc_erroneous == pytest.approx(1 / 3) and got.acc_correct == pytest.approx(0.5)
    assert got.f1 == pytest.approx(0.4)
    assert process_score([None], [None]).f1 is None  # no erroneous solution: no F1
    assert process_score([0, 1], [1, None]).f1 == 0.0
    with pytest.raises(ValueError, match="predictions"):
        process_score([None], [None, 1])


def test_step_auc_golden_and_against_scipy():
    assert step_auc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert step_auc([0.1, 0.9], [True, False]) == 0.0
    assert step_auc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    assert step_auc([0.3, 0.4], [True, True]) is None
    from scipy.stats import mannwhitneyu

    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(200)]  # rounded: many ties
    labels = [rng.random() < s + 0.1 for s in scores]
    pos = [s for s, ok in zip(scores, labels) if ok]
    neg = [s for s, ok in zip(scores, labels) if not ok]
    u = mannwhitneyu(pos, neg).statistic
    assert step_auc(scores, labels) == pytest.approx(u / (len(pos) * len(neg)))
    assert abs(step_auc(scores, labels) - 0.5) > 0.1  # the scores carry signal: not a constant 0.5


def test_a_calibrated_threshold_finds_what_0_5_misses_and_auc_stops_at_the_first_error():
    """Issue 23, item 3: a verifier whose scores are informative but all above 0.5 (wrong steps 0.6-0.7,
    right ones 0.8-0.9) scores F1 0 at 0.5; the threshold chosen on calibration rows scores 100% on
    others. Step AUC against first-error labels ignores the steps after the first error, which prefix
    labels call wrong whatever they hold."""
    from halluc.inference.process_scores import calibrated_threshold, up_to_first_error

    rng = random.Random(0)

    def solution(first_wrong):
        steps = [rng.uniform(0.8, 0.9) for _ in range(4)]
        labels = [True] * 4
        if first_wrong is not None:
            steps[first_wrong] = rng.uniform(0.6, 0.7)
            labels[first_wrong:] = [False] * (4 - first_wrong)
        return steps, labels

    rows = [solution(rng.choice([None, 0, 1, 2, 3])) for _ in range(200)]
    cal, test = rows[::2], rows[1::2]
    at_half = process_score([first_below(s, 0.5) for s, _ in test], [first_false(y) for _, y in test])
    assert at_half.acc_erroneous == 0.0 and at_half.f1 == 0.0  # the control: 0.5 calls nothing wrong
    t = calibrated_threshold([s for s, _ in cal], [y for _, y in cal])
    assert 0.7 < t < 0.8
    tuned = process_score([first_below(s, t) for s, _ in test], [first_false(y) for _, y in test])
    assert tuned.f1 == 1.0
    scores, labels = up_to_first_error([0.9, 0.3, 0.95, 0.9], [True, False, False, False])
    assert (scores, labels) == ([0.9, 0.3], [True, False])
    assert step_auc(*up_to_first_error([0.9, 0.3, 0.95], [True, False, False])) == 1.0
    assert step_auc([0.9, 0.3, 0.95], [True, False, False]) == 0.5  # prefix labels: a right-looking later step
