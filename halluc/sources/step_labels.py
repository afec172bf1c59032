"""Step labels for the verifiers of issue 12 (the PRM, technique 7; the verifier head, technique 10).

A label answers, at the end of each step, "is the text so far still right?":
- from the task verifier (`verifier_labels`): True while every step up to and including this one
  verifies, False from the first wrong step on (ProcessBench's "earliest error" reading). A
  solution whose answer is wrong but whose steps all verify (GSM8K: every annotation consistent)
  cannot be labelled: None, skipped and counted by the caller;
- from Monte Carlo rollouts (`rollout_labels`, Math-Shepherd): from each step prefix, N sampled
  continuations of the policy (batched); soft label = the fraction that end on the right answer,
  hard = any does. A prefix that already holds the final answer needs no rollout: its label is
  whether that answer is right.
Reference solutions get synthetic wrong steps with `with_wrong_step` (the task's own error kinds).

`stepwise_row` stores one labelled solution in TRL's stepwise format (`prompt`, `completions` =
the steps, `labels`) plus the token ids, tokenized piece by piece as halluc.sources.data does (the prompt
with the tokenizer's special tokens, each step alone without them), so nothing is re-encoded.
(TRL 1.16, the version the tests pin, ships no PRM trainer; the format is the one its PRMTrainer
read up to 0.2x.)
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from halluc.tasks import Problem


def verifier_labels(task, problem: Problem, steps: list[str]) -> list[bool] | None:
    """Per step: every step so far verifies (module docstring); None if the verifier cannot place
    a wrong answer."""
    report = task.verify_steps(problem, steps)
    first = report.first_wrong
    if first is None and not report.answer_correct and _has_answer(task, steps):
        return None
    first = len(steps) if first is None else first
    return [i < first for i in range(len(steps))]


def with_wrong_step(task, problem: Problem, k: int, rng: random.Random) -> list[str] | None:
    """The reference solution with step k replaced by one of the task's plausible wrong steps (None
    if the task has none there); the steps after it are the reference's."""
    wrong = task.corrupt_step(problem, k, rng)
    if wrong is None:
        return None
    return list(problem.steps[:k]) + [wrong] + list(problem.steps[k + 1:])


@dataclass
class RolloutLabels:
    soft: list[float]      # per step: fraction of rollouts from its prefix that end right
    hard: list[bool]       # per step: some rollout does
    rollouts: int          # continuations generated for this solution


def rollout_labels(model, tokenizer, task, items: list[tuple[Problem, list[str]]], n: int, sampling,
                   max_new_tokens: int, batch_size: int = 256) -> list[RolloutLabels]:
    """Math-Shepherd labels for every step of every (problem, steps) item: n continuations from
    each step prefix that does not hold the final answer yet, all items batched together."""
    from halluc.sources.own_errors import sample_from_ids

    from halluc.core.tokens import continuation_ids

    prompts, where = [], []
    for j, (problem, steps) in enumerate(items):
        prompt = tokenizer(problem.prompt)["input_ids"]
        ids = list(prompt)
        for i, step_ids in enumerate(continuation_ids(tokenizer, steps)):
            ids = ids + step_ids
            if not _has_answer(task, steps[:i + 1]):
                prompts += [list(ids)] * n
                where += [(j, i)] * n
    gens = sample_from_ids(model, tokenizer, prompts, sampling, max_new_tokens, batch_size, desc="rollouts")
    right: dict[tuple[int, int], int] = {}
    for (j, i), gen in zip(where, gens):
        problem, steps = items[j]
        text = "".join(steps[:i + 1]) + tokenizer.decode(gen.visible, skip_special_tokens=True)
        right[j, i] = right.get((j, i), 0) + task.verify_steps(problem, task.split_steps(text)).answer_correct
    out = []
    for j, (problem, steps) in enumerate(items):
        soft = []
        for i in range(len(steps)):
            if (j, i) in right:
                soft.append(right[j, i] / n)
            else:  # the answer is written: no rollout decides it
                soft.append(float(task.verify_steps(problem, steps[:i + 1]).answer_correct))
        out.append(RolloutLabels(soft, [s > 0 for s in soft], n * sum((j, i) in right for i in range(len(steps)))))
    return out


def agreement(verifier: list[list[bool] | None], hard: list[list[bool]]) -> dict:
    """How often the verifier's labels and the rollouts' hard labels agree, step by step, where both
    exist; with the two kinds of disagreement counted."""
    both = agree = verifier_only = rollout_only = 0
    for v, h in zip(verifier, hard):
        if v is None:
            continue
        for a, b in zip(v, h):
            both += 1
            agree += a == b
            verifier_only += a and not b   # the verifier says right, no rollout recovers
            rollout_only += b and not a    # the verifier says wrong, a rollout still ends right
    return {"steps": both, "agreement": agree / both if both else None,
            "right_but_no_rollout_recovers": verifier_only, "wrong_but_a_rollout_ends_right": rollout_only}


def stepwise_row(tokenizer, problem: Problem, steps: list[str], labels: list) -> dict:
    """One labelled solution in TRL's stepwise format, with its token ids (module docstring)."""
    from halluc.core.tokens import continuation_ids

    if len(labels) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(labels)} labels")
    return {"prompt": problem.prompt, "completions": list(steps), "labels": list(labels),
            "prompt_ids": tokenizer(problem.prompt)["input_ids"],
            "completion_ids": continuation_ids(tokenizer, steps)}


def _has_answer(task, steps: list[str]) -> bool:
    return task.extract_answer("".join(steps)) is not None


def labelled_solutions(model, tokenizer, task, problems: list[Problem], *, wrong_steps: int, samples: int,
                       sampling, max_new_tokens: int, seed: int, batch_size: int = 64) -> tuple[list[dict], dict]:
    """Stepwise rows with verifier labels, for every problem: its reference solution, `wrong_steps`
    copies with one synthetic wrong step each, and `samples` of the model's own solutions (the
    visible text; unplaceable wrong answers skipped). Each row records its `source`. Returns
    (rows, counts)."""
    from halluc.sources.own_errors import sample

    rng = random.Random(seed)
    rows, counts = [], {"reference": 0, "wrong_step": 0, "sample": 0, "sample_unlabelled": 0}

    def add(problem, steps, source):
        labels = verifier_labels(task, problem, steps)
        if labels is None:
            counts[source + "_unlabelled"] = counts.get(source + "_unlabelled", 0) + 1
            return
        rows.append({**stepwise_row(tokenizer, problem, steps, labels), "source": source})
        counts[source] += 1

    for problem in problems:
        add(problem, list(problem.steps), "reference")
        for k in rng.sample(range(len(problem.steps)), min(wrong_steps, len(problem.steps))):
            steps = with_wrong_step(task, problem, k, rng)
            if steps is not None:
                add(problem, steps, "wrong_step")
    if samples:
        for i, _, gen in sample(model, tokenizer, problems, samples, sampling, max_new_tokens, batch_size,
                                desc="samples to label"):
            steps = task.split_steps(tokenizer.decode(gen.visible, skip_special_tokens=True))
            if steps:
                add(problems[i], steps, "sample")
    counts["wrong_steps_labelled"] = sum(not x for r in rows for x in r["labels"])
    counts["steps_labelled"] = sum(len(r["labels"]) for r in rows)
    return rows, counts
