"""Scoring a step verifier (PRM or verifier head, issue 12) the way ProcessBench does.

A verifier gives each step of a solution a score (the probability that the text so far is still
right). From the scores, the predicted first wrong step is the first step scored below a threshold
(or none). ProcessBench (arXiv 2412.06559) reports, per data set, the accuracy of that prediction
on erroneous solutions (the exact first wrong step) and on correct ones (predicting none), and
their harmonic mean F1. Beside it, the step-level AUC of the scores against the step labels
(halluc.sources.step_labels): how well a score separates "still right" from "already wrong" steps at every
threshold at once. Pure functions, golden values in tests/test_process_scores.py.
"""
from __future__ import annotations

from dataclasses import dataclass


def first_below(scores: list[float], threshold: float = 0.5) -> int | None:
    """Index of the first step scored below `threshold`, or None (the solution is judged right)."""
    return next((i for i, s in enumerate(scores) if s < threshold), None)


def first_false(labels: list[bool]) -> int | None:
    """The true first wrong step of a labelled solution (None: every step right)."""
    return next((i for i, ok in enumerate(labels) if not ok), None)


@dataclass
class ProcessScore:
    erroneous: int          # solutions with a wrong step
    correct: int            # solutions without
    acc_erroneous: float | None  # share of erroneous ones whose first wrong step is predicted exactly
    acc_correct: float | None    # share of correct ones predicted to have none
    f1: float | None             # harmonic mean of the two (ProcessBench's number)


def process_score(predicted: list[int | None], true: list[int | None]) -> ProcessScore:
    """ProcessBench's scores from predicted and true first wrong steps (None = no wrong step)."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} solutions")
    err = [(p, t) for p, t in zip(predicted, true) if t is not None]
    cor = [(p, t) for p, t in zip(predicted, true) if t is None]
    acc_err = sum(p == t for p, t in err) / len(err) if err else None
    acc_cor = sum(p is None for p, _ in cor) / len(cor) if cor else None
    f1 = None
    if acc_err is not None and acc_cor is not None:
        f1 = 0.0 if acc_err + acc_cor == 0 else 2 * acc_err * acc_cor / (acc_err + acc_cor)
    return ProcessScore(len(err), len(cor), acc_err, acc_cor, f1)


def step_auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve of step scores for "still right" (label True) against "already
    wrong": the probability that a random right step scores above a random wrong one, ties half
    (Mann-Whitney U). None when one of the two kinds is missing."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = sorted(s for s, ok in zip(scores, labels) if ok)
    neg = sorted(s for s, ok in zip(scores, labels) if not ok)
    if not pos or not neg:
        return None
    from bisect import bisect_left, bisect_right

    wins = sum(bisect_left(neg, s) + 0.5 * (bisect_right(neg, s) - bisect_left(neg, s)) for s in pos)
    return wins / (len(pos) * len(neg))


def up_to_first_error(scores: list[float], labels: list[bool]) -> tuple[list[float], list[bool]]:
    """The steps up to and including the first wrong one: under prefix labels every step after the
    first error is "wrong" too (a wrong-step copy's own right answer included), which is not what a
    verifier should be scored on (issue 23: AUC against first-error labels)."""
    first = first_false(labels)
    end = len(labels) if first is None else first + 1
    return scores[:end], labels[:end]


def calibrated_threshold(scores: list[list[float]], labels: list[list[bool]]) -> float:
    """The threshold with the best ProcessBench F1 on these (calibration) solutions: each score's
    midpoint with the next higher one is a candidate (of at most 257 score quantiles), plus 0.5; ties
    go to the threshold nearest 0.5."""
    values = sorted({s for row in scores for s in row})
    if len(values) > 257:  # a large file: 256 quantiles of the scores (each candidate scans every solution)
        values = [values[round(i * (len(values) - 1) / 256)] for i in range(257)]
    candidates = {0.5} | {(a + b) / 2 for a, b in zip(values, values[1:])} | ({values[0] - 1e-6} if values else set())
    true = [first_false(row) for row in labels]

    def f1(t):
        return process_score([first_below(row, t) for row in scores], true).f1 or 0.0

    return max(sorted(candidates), key=lambda t: (f1(t), -abs(t - 0.5)))
