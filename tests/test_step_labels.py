"""Step labels (issue 12's data): from the verifier, from Monte Carlo rollouts, in TRL's stepwise format."""
import copy
import random

import pytest
import torch

from halluc.sources.step_labels import agreement, rollout_labels, stepwise_row, verifier_labels, with_wrong_step
from halluc.tasks import arith


def test_labels_from_a_known_wrong_step_are_right():
    """A reference solution with step k replaced by a plausible wrong step: True before k, False
    from k on; the reference itself: all True. Negative control: a wrong answer step is caught."""
    rng = random.Random(0)
    checked = 0
    for problem in arith.make_split(60, (2, 4), seed=7):
        n = len(problem.steps)
        assert verifier_labels(arith, problem, problem.steps) == [True] * n
        for k in range(n):
            steps = with_wrong_step(arith, problem, k, rng)
            if steps is None:
                continue
            assert verifier_labels(arith, problem, steps) == [True] * k + [False] * (n - k), (k, steps)
            checked += 1
    assert checked > 100
    problem = arith.make_split(1, (2, 2), seed=3)[0]
    wrong_answer = problem.steps[:-1] + [f" answer = {(int(problem.answer) + 1) % 7}"]
    assert verifier_labels(arith, problem, wrong_answer)[-1] is False


def test_rollout_labels_shape_and_what_needs_no_rollout(bt_tokenizer):
    """n rollouts from every prefix without the answer; a prefix with the answer is labelled by it
    (1.0 right, 0.0 wrong) whatever the model; soft labels are fractions, hard = soft > 0."""
    from halluc.inference.generate import Sampling
    from halluc.core.model import tiny_llama

    tok = copy.deepcopy(bt_tokenizer)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id).eval()
    problems = arith.make_split(4, (2, 3), seed=11)
    right = [(p, list(p.steps)) for p in problems]
    wrong = [(p, p.steps[:-1] + [f" answer = {(int(p.answer) + 1) % 7}"]) for p in problems]
    labels = rollout_labels(model, tok, arith, right + wrong, n=3, sampling=Sampling(0.8, 0.95, 0), max_new_tokens=24)
    for (p, steps), lab in zip(right + wrong, labels):
        assert len(lab.soft) == len(steps) and lab.rollouts == 3 * (len(steps) - 1)
        assert all(s in (0.0, 1 / 3, 2 / 3, 1.0) for s in lab.soft)
        assert lab.hard == [s > 0 for s in lab.soft]
    assert [lab.soft[-1] for lab in labels] == [1.0] * 4 + [0.0] * 4


def test_agreement_counts_both_kinds_of_disagreement():
    got = agreement([[True, True, False], None, [True, False]], [[True, False, False], [True], [True, True]])
    assert got == {"steps": 5, "agreement": 3 / 5, "right_but_no_rollout_recovers": 1,
                   "wrong_but_a_rollout_ends_right": 1}


def test_stepwise_rows_keep_the_text_and_the_ids(lab_tokenizer):
    problem = arith.make_split(1, (3, 3), seed=5)[0]
    labels = verifier_labels(arith, problem, problem.steps)
    row = stepwise_row(lab_tokenizer, problem, problem.steps, labels)
    assert set(row) == {"prompt", "completions", "labels", "prompt_ids", "completion_ids"}
    assert problem.prompt + "".join(row["completions"]) == problem.prompt + problem.solution
    assert row["prompt_ids"] == lab_tokenizer(problem.prompt)["input_ids"]
    assert all(row["completion_ids"]) and len(row["completion_ids"]) == len(problem.steps)
    decoded = lab_tokenizer.decode(sum(row["completion_ids"], []), skip_special_tokens=True)
    assert decoded.replace(" ", "") == problem.solution.replace(" ", "")
    with pytest.raises(ValueError, match="labels"):
        stepwise_row(lab_tokenizer, problem, problem.steps, labels[:-1])
