"""Preference pairs in three forms, from the same sampled solutions (technique 6; issue 24).

Every pair technique 5's round built so far had chosen = BT run + correction and rejected = the
model's continuation after its error: no pair ever says "after a right step, go on", and DPO on
them learned to backtrack after everything (docs/results.md). The forms (a pair's `form` column):

    bt        prompt = question + right steps + the wrong step     (halluc/sources/own_errors.build)
              chosen = BTs + correction + rest + EOS;  rejected = the model's own continuation
    step      Step-DPO: prompt = question + right steps (+ the tokens the wrong and the right step share)
              chosen = the right step;  rejected = the model's wrong step (no BTs on either side)
    balanced  prompt = question + right steps before step j, where steps j and j+1 are right
              chosen   = step j, step j+1
              rejected = step j, BTs erasing it, step j again, step j+1
              (the same visible text: the rejected side only wastes a BT run over a right step)

`select_forms` draws the training set: `weights[form]` x N pairs of each form, N the number of `bt`
pairs (so bt=1, balanced=1 is one balanced pair per error pair), never more than were built, kept
in the order they were built (the trainer shuffles).
"""
from __future__ import annotations

import logging
import random
from collections import Counter

from dataclasses import dataclass

from halluc.core.config import NonNegativeFloat
from halluc.core.example import Role, common_prefix_len
from halluc.core.inputs import InputError

log = logging.getLogger(__name__)

FORMS = ("bt", "step", "balanced")


@dataclass
class PairWeights:
    """How many pairs of each form preference training takes, per `bt` pair there is (recipes/dpo.py `pairs.*`)."""

    bt: NonNegativeFloat = 1.0        # BT run + correction over the model's continuation of its error
    step: NonNegativeFloat = 0.0      # Step-DPO: the right step over the wrong one
    balanced: NonNegativeFloat = 0.0  # after a right step: go on, over erasing it


def step_pair(prompt: list[int], prefix: list[int], wrong: list[int], right: list[int]) -> dict | None:
    """The Step-DPO pair of one located error: the same prefix, the right step over the wrong one
    (their shared leading tokens go to the prompt); None if either side would be empty."""
    shared = common_prefix_len(wrong, right)
    chosen, rejected = right[shared:], wrong[shared:]
    if not chosen or not rejected:
        return None
    head = prompt + prefix + wrong[:shared]
    return {"prompt_ids": head, "prompt_roles": [int(Role.PROMPT)] * len(prompt) + [int(Role.KEPT)] * (len(head) - len(prompt)),
            "chosen_ids": chosen, "chosen_roles": [int(Role.CORRECTION)] * len(chosen),
            "rejected_ids": rejected, "rejected_roles": [int(Role.KEPT)] * len(rejected)}


def step_cuts(text_steps: list[str], text: str, ends: list[int]) -> list[int] | None:
    """The token count at the end of every step (`ends`: own_errors.char_ends of the tokens), or None if a
    step ends inside a token."""
    from halluc.sources.own_errors import token_cut

    cuts, at = [], 0
    for s in text_steps:
        at = text.index(s, at) + len(s)
        cut = token_cut(ends, at)
        if cut is None:
            return None
        cuts.append(cut)
    return cuts


def balanced_pair(prompt: list[int], visible: list[int], cuts: list[int], j: int, bt_id: int) -> dict:
    """Continue after right step j (chosen) over erasing it and writing it again (rejected); both go on
    with step j + 1. `cuts`: the token count at the end of every step of `visible`."""
    start = cuts[j - 1] if j else 0
    step, nxt = visible[start:cuts[j]], visible[cuts[j]:cuts[j + 1]]
    head = prompt + visible[:start]
    chosen = step + nxt
    rejected = step + [bt_id] * len(step) + step + nxt
    return {"prompt_ids": head, "prompt_roles": [int(Role.PROMPT)] * len(prompt) + [int(Role.KEPT)] * start,
            "chosen_ids": chosen, "chosen_roles": [int(Role.KEPT)] * len(chosen),
            "rejected_ids": rejected,
            "rejected_roles": [int(Role.ERROR)] * len(step) + [int(Role.BACKTRACK)] * len(step) +
                              [int(Role.CORRECTION)] * len(step) + [int(Role.KEPT)] * len(nxt)}


def balanced_pairs(task, problems, tokenizer, samples, bt_id: int, per_problem: int, seed: int) -> tuple[list[dict], Counter]:
    """Balanced pairs from sampled solutions [(problem index, prompt ids, generation)]: in each sample
    whose first two steps verify ("ok": a step the verifier cannot check does not count), one random step
    j with step j + 1 also right; at most `per_problem` per problem. Returns (pairs with a `problem` column, counts of why samples gave none)."""
    from halluc.sources.own_errors import char_ends

    rng = random.Random(seed)
    pairs, taken, why = [], Counter(), Counter()
    for i, prompt, gen in samples:  # the visible text: what is left after the sample's own BTs
        if taken[i] >= per_problem:
            why["problem_full"] += 1
            continue
        text = tokenizer.decode(gen.visible, skip_special_tokens=True)
        steps = task.split_steps(text)
        report = task.verify_steps(problems[i], steps)
        kinds = report.kinds[:len(steps)]
        right = next((k for k, kind in enumerate(kinds) if kind != "ok"), len(kinds))  # leading checked-right steps
        if right == len(steps) and not report.answer_correct:
            right -= 1  # every step checks, the answer does not: the last step is the wrong one
        if right < 2:
            why["fewer_than_two_right_steps"] += 1
            continue
        cuts = step_cuts(steps[:right], text, char_ends(tokenizer, gen.visible))
        if cuts is None:
            why["unaligned"] += 1
            continue
        j = rng.randrange(right - 1)
        pairs.append({**balanced_pair(prompt, list(gen.visible), cuts, j, bt_id), "problem": i, "kind": "right_step",
                      "correction": "none"})
        taken[i] += 1
    why["kept"] = len(pairs)
    return pairs, why


def select_forms(pairs: list[dict], weights: dict[str, float], seed: int) -> list[dict]:
    """weights[form] x N pairs of each form (N = the `bt` pairs there are), drawn at random, never more
    than there are (a shortfall is logged). Pairs without a `form` column (a user's file) are all `bt`."""
    if any(weights.get(f) for f in FORMS if f != "bt") and not any("form" in p for p in pairs):
        raise InputError(f"pairs: {weights} asks for step or balanced pairs, but these pairs have no `form` column: "
                         "they come from the model's own errors (data unset, or a self_correct round's data/pairs)")
    by_form: dict[str, list[dict]] = {f: [] for f in FORMS}
    for p in pairs:
        by_form[p.get("form", "bt")].append(p)
    n = len(by_form["bt"])
    rng = random.Random(seed)
    chosen: set[int] = set()
    for form in FORMS:
        want = round(weights.get(form, 0.0) * n)
        have = by_form[form]
        if want > len(have):
            log.warning("pairs.%s=%g asks for %d %s pairs; there are %d: all of them", form, weights[form], want,
                        form, len(have))
        chosen |= {id(p) for p in (have if want >= len(have) else rng.sample(have, want))}
    if not chosen:
        raise InputError(f"pairs: the weights {weights} select no pair from {({f: len(v) for f, v in by_form.items()})}")
    return [p for p in pairs if id(p) in chosen]  # in their order: the default (bt only) is the pairs as built
