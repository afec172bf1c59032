"""The model's own errors located by alignment to the reference: no step verifier needed.

N-MARS's data (research-wave3.md): sample the model, align each sample to the reference
solution token by token (difflib's maximal matching blocks, order-preserving), call every span
of the sample that the alignment does not match an error, and write after it one BT per error
token and the reference's tokens that belong there. Any task with references works (GSM8K free
text, a user's jsonl), where technique 5's judge (halluc/sources/own_errors.py) needs a verifier
that can place the first wrong step.

    sample     A B X Y C D Z         reference  A B C D E
    example    A B X Y <BT> <BT> C D Z <BT> E <EOS>
    roles      KEPT    ERROR BACKTRACK KEPT ERROR BACKTRACK CORRECTION KEPT

so apply_backtrack(response) == reference + EOS on every example (checked as it is built).
Only samples whose final answer is wrong are used by default: a right sample that words its steps
differently from the reference is not an error, and aligning it would teach erasing right text.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher

from halluc.core.config import PositiveInt
from halluc.core.example import Example, Role

log = logging.getLogger(__name__)


@dataclass
class AlignSettings:
    """How samples become examples (recipes/self_correct.py error_source=aligned)."""

    min_match: PositiveInt = 1  # a matched block shorter than this between two edits joins them (1: difflib's blocks)
    only_wrong: bool = True     # align only samples whose final answer is wrong


@dataclass
class AlignStats:
    problems: int = 0
    samples: int = 0
    right: int = 0          # right final answer: not used (only_wrong)
    wrong: int = 0
    unfinished: int = 0     # stopped by the length limit (aligned too: the reference's rest follows its last match)
    identical: int = 0      # the sample is the reference token for token: nothing to erase
    nothing_erased: int = 0  # the sample is a part of the reference (e.g. cut short): only insertions
    too_long: int = 0       # longer than max_len, or more BTs than generation's loop guard allows (32)
    kept: int = 0
    error_tokens: int = 0   # over kept examples
    bt_runs: int = 0
    runs_per_example: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {**asdict(self), "runs_per_example": {str(k): v for k, v in sorted(self.runs_per_example.items())}}


def alignment(sample: list[int], reference: list[int], min_match: int = 1) -> list[tuple[str, list[int], list[int]]]:
    """[(op, sample tokens, reference tokens)] with op "equal" or "edit", covering both sequences in order.

    difflib.SequenceMatcher (autojunk off: a frequent token like ';' is not junk here) gives the
    maximal matching blocks; a matched block shorter than `min_match` between two edits joins them
    (a lone ' =' matched inside a wrong step should not split it into two erasures)."""
    ops = SequenceMatcher(None, sample, reference, autojunk=False).get_opcodes()
    out: list[tuple[str, list[int], list[int]]] = []
    for tag, i1, i2, j1, j2 in ops:
        op = "equal" if tag == "equal" else "edit"
        out.append((op, list(sample[i1:i2]), list(reference[j1:j2])))
    merged: list[tuple[str, list[int], list[int]]] = []
    for k, (op, a, b) in enumerate(out):
        inner = 0 < k < len(out) - 1
        if op == "equal" and inner and len(a) < min_match:
            op = "edit"
        if merged and op == "edit" and merged[-1][0] == "edit":
            _, pa, pb = merged.pop()
            a, b = pa + a, pb + b
        merged.append((op, a, b))
    return merged


def aligned_example(prompt: list[int], sample: list[int], reference: list[int], bt_id: int, eos_id: int | None,
                    min_match: int = 1) -> Example | None:
    """The training example of one sample against the reference response (without EOS), or None if the
    sample is the reference. Matched tokens are KEPT; an unmatched sample span is ERROR followed by as
    many BTs; the reference tokens of that place are CORRECTION."""
    if sample == reference:
        return None
    eos = [eos_id] if eos_id is not None else []
    ex = Example().add(prompt, Role.PROMPT)
    for op, a, b in alignment(sample, reference, min_match):
        if op == "equal":
            ex.add(a, Role.KEPT)
            continue
        ex.add(a, Role.ERROR).add([bt_id] * len(a), Role.BACKTRACK).add(b, Role.CORRECTION)
    ex.add(eos, Role.KEPT)
    ex.check(reference + eos, bt_id)
    return ex


def bt_runs(roles: list[int]) -> list[int]:
    """The lengths of the example's BT runs."""
    runs, n = [], 0
    for r in roles + [None]:
        if r == Role.BACKTRACK:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def make_aligned_round(model, tokenizer, task, problems, *, k: int, sampling, max_new_tokens: int, per_problem: int,
                       bt_id: int, masked: bool = True, max_len: int = 256, min_match: int = 1,
                       only_wrong: bool = True, batch_size: int = 256) -> tuple[list[dict], AlignStats]:
    """Sample k solutions per problem, keep the wrong ones (or all with only_wrong=False), align each to
    the problem's reference and build its example: (SFT rows, statistics). Rows carry `problem` (index
    into `problems`), `kind` ("aligned") and `correction` ("reference")."""
    from tqdm.auto import tqdm

    from halluc.inference.generate import LoopGuards
    from halluc.sources.data import labels_from_roles, tokenize_problems
    from halluc.sources.own_errors import sample

    stats = AlignStats(problems=len(problems))
    samples = sample(model, tokenizer, problems, k, sampling, max_new_tokens, batch_size)
    references = [[t for s in steps for t in s] for _, steps in tokenize_problems(problems, tokenizer)]
    longest_run = LoopGuards().max_backtracks  # generation never writes more BTs: nor may training
    rows, taken = [], Counter()
    for i, prompt, gen in tqdm(samples, desc="aligning", unit="sample", leave=False):
        stats.samples += 1
        text = tokenizer.decode(gen.visible, skip_special_tokens=True)
        right = task.verify_steps(problems[i], task.split_steps(text)).answer_correct
        stats.right += bool(right)
        stats.wrong += not right
        stats.unfinished += gen.stop != "eos"  # aligned all the same: the reference's rest is its correction
        if (right and only_wrong) or taken[i] >= per_problem:
            continue
        ex = aligned_example(prompt, list(gen.visible), references[i], bt_id, tokenizer.eos_token_id, min_match)
        if ex is None:
            stats.identical += 1
            continue
        runs = bt_runs(ex.roles)
        if not runs:  # the sample is a part of the reference (cut short): nothing to erase
            stats.nothing_erased += 1
            continue
        if len(ex.ids) > max_len or sum(runs) > longest_run:
            stats.too_long += 1
            continue
        taken[i] += 1
        rows.append({"input_ids": ex.ids, "roles": ex.roles, "labels": labels_from_roles(ex.ids, ex.roles, masked),
                     "problem": i, "kind": "aligned", "correction": "reference"})
        stats.kept += 1
        stats.error_tokens += sum(runs)
        stats.bt_runs += len(runs)
        stats.runs_per_example[len(runs)] += 1
    return rows, stats
