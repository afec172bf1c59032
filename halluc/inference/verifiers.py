"""One API for "is the text so far already wrong?" (issue 12), used by guided decoding, search and
evaluation alike.

A verifier is called with `[(prompt ids, visible response ids)]` and their rows in the generator's
latest forward (finished rows leave that batch, so a row is not a prompt's index), and returns
P(the text so far is right) per item:
- `PRMVerifier`: a process reward model (halluc.objectives.prm) reads the text, scoring its last token;
- `HeadVerifier`: the policy's verifier head (halluc.objectives.verifier_head) at the newest position of the
  forward the generator just ran, free (the rows' hidden states are already there);
- `OracleVerifier`: the task's own step verifier (the skyline, and the tests' perfect verifier).
`make_verifier(kind, ...)` builds any of them by name. Each also scores whole solutions, P(right) at
the end of every step (`verifier.solution_scores`: ProcessBench evaluation, best-of-N, MCTS values),
and `best_of_n` / `weighted_vote` pick among N samples with them.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from halluc.tasks import Problem


class PRMVerifier:
    """A PRM scoring the policy's visible text (token ids shared with the policy, else re-tokenized)."""

    def __init__(self, prm, prm_tokenizer, policy_tokenizer=None, batch_size: int = 64):
        self.prm, self.tokenizer, self.batch_size = prm, prm_tokenizer, batch_size
        self.policy_tokenizer = policy_tokenizer
        self.same_ids = policy_tokenizer is None or policy_tokenizer.get_vocab() == prm_tokenizer.get_vocab()

    def _ids(self, prompt: list[int], visible: list[int]) -> list[int]:
        if self.same_ids:
            return list(prompt) + list(visible)
        decode = lambda ids: self.policy_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        from halluc.core.tokens import continuation_ids

        return self.tokenizer(decode(prompt))["input_ids"] + continuation_ids(self.tokenizer, [decode(visible)])[0]

    def __call__(self, items: list[tuple[list[int], list[int]]], rows: list[int] | None = None) -> list[float]:
        from halluc.objectives.prm import step_scores

        seqs = [self._ids(p, v) for p, v in items]
        pad = self.tokenizer.pad_token_id or 0
        return [s[0] for s in step_scores(self.prm, seqs, [[len(s) - 1] for s in seqs], self.batch_size, pad)]

    def solution_scores(self, prompt_ids, step_ids) -> list[list[float]]:
        """P(right) at the end of every step of every solution (the policy's token ids)."""
        if not self.same_ids:
            raise ValueError("whole-solution scores need a PRM with the policy's tokenizer")
        return _step_end_scores(self.prm, "prm", prompt_ids, step_ids, self.batch_size, self.tokenizer.pad_token_id or 0)


class HeadVerifier:
    """The policy's own verifier head: P(right) = 1 - sigmoid(wrong logit). reads="forward": at the
    newest position of each row in the policy's latest forward (free during generation; it must be
    called right after that forward); reads="text": one forward of its own over each text (MCTS
    values open steps long after the forward that wrote them)."""

    def __init__(self, policy, reads: str = "forward", pad_id: int = 0, batch_size: int = 64):
        from halluc.objectives.verifier_head import get_head

        if reads not in ("forward", "text"):
            raise ValueError(f"reads must be 'forward' or 'text', got {reads!r}")
        self.policy, self.reads, self.pad_id, self.batch_size = policy, reads, pad_id, batch_size
        self.head = get_head(policy)
        if self.head is None:
            raise ValueError("the policy has no verifier head (halluc.objectives.verifier_head.load_head)")

    def __call__(self, items, rows: list[int] | None = None) -> list[float]:
        if self.reads == "text":
            return [s[-1] for s in self.solution_scores([p for p, _ in items], [[v] for _, v in items])]
        last = self.head.last
        return [float(torch.sigmoid(-last[r, -1])) for r in rows]

    def solution_scores(self, prompt_ids, step_ids) -> list[list[float]]:
        """P(right) at the end of every step of every solution, one forward per batch."""
        return _step_end_scores(self.policy, "head", prompt_ids, step_ids, self.batch_size, self.pad_id)


class OracleVerifier:
    """The task's step verifier on the visible text: 1.0 while every step so far is right (and a
    written answer is the right one), else 0.0. Knows the problems by their prompt ids."""

    def __init__(self, task, problems: list[Problem], tokenizer):
        self.task, self.tokenizer = task, tokenizer
        self.by_prompt = {tuple(tokenizer(p.prompt)["input_ids"]): p for p in problems}

    def text_is_right(self, problem: Problem, text: str) -> bool:
        steps = self.task.split_steps(text)
        report = self.task.verify_steps(problem, steps)
        first = report.first_wrong
        if first is not None and first < len(steps):
            return False
        return self.task.extract_answer(text) is None or report.answer_correct

    def __call__(self, items, rows=None) -> list[float]:
        out = []
        for prompt, visible in items:
            problem = self.by_prompt[tuple(prompt)]
            out.append(float(self.text_is_right(problem, self.tokenizer.decode(visible, skip_special_tokens=True))))
        return out

    def solution_scores(self, prompt_ids, step_ids) -> list[list[float]]:
        """1.0 / 0.0 at the end of every step: the text up to there is still right."""
        return [self([(p, [t for s in steps[:i + 1] for t in s]) for i in range(len(steps))])
                for p, steps in zip(prompt_ids, step_ids)]


def make_verifier(kind: str | None, *, policy=None, tokenizer=None, task=None, problems=None, prm=None,
                  prm_tokenizer=None, head_reads: str = "forward"):
    """The verifier named `kind`, for guided decoding, MCTS values and evaluation alike: "oracle" (the
    task's verifier on `problems`), "prm" (the `prm` model with `prm_tokenizer`, reading the policy's
    text), "head" (the policy's head, loaded already: halluc.objectives.verifier_head.load_head; `head_reads`:
    HeadVerifier's reads), or "none" / None: no verifier (None)."""
    if kind in (None, "none"):
        return None
    if kind == "oracle":
        return OracleVerifier(task, problems, tokenizer)
    if kind == "prm":
        return PRMVerifier(prm, prm_tokenizer, tokenizer)
    if kind == "head":
        return HeadVerifier(policy, reads=head_reads, pad_id=(tokenizer.pad_token_id or 0) if tokenizer else 0)
    raise ValueError(f"verifier kind must be oracle, prm, head or none, got {kind!r}")


def split_steps_ids(visible: list[int], ends) -> list[list[int]]:
    """Token ids of a response cut into steps after every step-end token (a last partial step kept)."""
    steps, cur = [], []
    for t in visible:
        cur.append(t)
        if t in ends:
            steps.append(cur)
            cur = []
    return steps + ([cur] if cur else [])


def step_positions(prompt_len: int, step_lengths: list[int]) -> list[int]:
    """Index of the last token of every step in prompt + steps."""
    ends, at = [], prompt_len
    for n in step_lengths:
        at += n
        ends.append(at - 1)
    return ends


def _step_end_scores(model, reads: str, prompt_ids: list[list[int]], step_ids: list[list[list[int]]],
                     batch_size: int = 64, pad_id: int = 0) -> list[list[float]]:
    """P(right) at the end of every step of every solution, in one forward per batch: a PRM's
    (reads="prm", model = the PRM) or a policy's head's (reads="head", model = the policy)."""
    seqs = [list(p) + [t for s in steps for t in s] for p, steps in zip(prompt_ids, step_ids)]
    where = [step_positions(len(p), [len(s) for s in steps]) for p, steps in zip(prompt_ids, step_ids)]
    if reads == "prm":
        from halluc.objectives.prm import step_scores

        return step_scores(model, seqs, where, batch_size, pad_id)
    from halluc.objectives.prm import scores_at
    from halluc.objectives.verifier_head import get_head

    head = get_head(model)

    def right(ids, mask):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=0)  # the hook keeps the head's logits
        return torch.sigmoid(-head.last)

    return scores_at(model, right, seqs, where, batch_size, pad_id)


def aggregate(scores: list[float]) -> float:
    """One number per solution from its step scores: the minimum (a solution is as good as its
    worst step; the usual PRM aggregate). An empty solution scores 0."""
    return min(scores) if scores else 0.0


def best_of_n(scores: list[float]) -> int:
    """Index of the best-scored sample (the first on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def vote_key(answer: str | None) -> str | None:
    """What votes are counted by: a number by its value ("1000" and "1000.0" are one answer), other
    text as written, stripped."""
    if answer is None:
        return None
    try:
        return format(float(answer), ".12g")
    except ValueError:
        return answer.strip()


def weighted_vote(answers: list[str | None], scores: list[float]) -> int:
    """Index of the representative sample of the answer with the largest summed score (weighted
    majority voting; answers compared by `vote_key`); the representative is that answer's best-scored
    sample. No answer: best_of_n."""
    keys = [vote_key(a) for a in answers]
    total: dict[str, float] = defaultdict(float)
    for k, s in zip(keys, scores):
        if k is not None:
            total[k] += s
    if not total:
        return best_of_n(scores)
    winner = max(total, key=lambda k: (total[k], -keys.index(k)))
    return max((i for i, k in enumerate(keys) if k == winner), key=lambda i: (scores[i], -i))


def calibration_split(prompt_ids: list[list[int]], seed: int = 0) -> tuple[list[int], list[int]]:
    """(calibration rows, scored rows): the problems (rows grouped by prompt) dealt into two halves in a
    seeded random order, so a problem's rows stay on one side and no side gets one kind of row (by
    position, [reference, wrong copy] rows put every reference on one side). One problem: its rows dealt."""
    import random

    groups: dict[tuple, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        groups.setdefault(tuple(ids), []).append(i)
    order = list(groups.values()) if len(groups) > 1 else [[i] for i in range(len(prompt_ids))]
    random.Random(seed).shuffle(order)
    return sorted(i for g in order[::2] for i in g), sorted(i for g in order[1::2] for i in g)


def process_bench(verifier, rows: list[dict], tokenizer, threshold: float | None = None) -> dict:
    """ProcessBench-style scores (halluc.inference.process_scores) of a verifier (a PRM, a policy's head, the
    oracle) on stepwise rows, overall and per row `source`. threshold=None: chosen for the best F1 on
    half the problems (`calibration_split`) and scored on the rest (issue 23: 0.5 on imbalanced labels
    called most steps wrong); each entry holds the threshold used. Step AUC is against
    first-error labels: the steps up to and including the first wrong one."""
    import dataclasses

    from halluc.inference.process_scores import (calibrated_threshold, first_below, first_false, process_score,
                                                 step_auc, up_to_first_error)

    if not rows:
        return {}
    prompt_ids = [r.get("prompt_ids") or tokenizer(r["prompt"])["input_ids"] for r in rows]
    from halluc.core.tokens import continuation_ids

    step_ids = [r.get("completion_ids") or continuation_ids(tokenizer, r["completions"])
                for r in rows]
    scores = verifier.solution_scores(prompt_ids, step_ids)
    labels = [[bool(x) for x in r["labels"]] for r in rows]
    scored = list(range(len(rows)))
    calibration = {}
    if threshold is None:
        held, scored = calibration_split(prompt_ids)
        threshold = calibrated_threshold([scores[i] for i in held], [labels[i] for i in held])
        calibration = {"calibrated_on": len(held)}
    out = {}
    for source in ["all"] + sorted({r.get("source", "given") for r in rows}):
        pick = [i for i in scored if source == "all" or rows[i].get("source", "given") == source]
        score = process_score([first_below(scores[i], threshold) for i in pick], [first_false(labels[i]) for i in pick])
        firsts = [up_to_first_error(scores[i], labels[i]) for i in pick]
        out[source] = {**dataclasses.asdict(score), "threshold": threshold, **calibration,
                       "step_auc": step_auc([x for s, _ in firsts for x in s], [x for _, y in firsts for x in y]),
                       "step_auc_prefix_labels": step_auc([x for i in pick for x in scores[i]],
                                                          [x for i in pick for x in labels[i]])}
    return out
