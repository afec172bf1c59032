"""Own errors located by alignment to the reference (halluc/sources/aligned_errors.py): golden examples,
the invariant on random pairs of sequences with a negative control, and a round from a tiny model."""
import copy
import random
from difflib import SequenceMatcher

import pytest
import torch

from halluc.core.example import Role, apply_backtrack
from halluc.core.model import tiny_llama
from halluc.core.tokens import backtrack_id
from halluc.inference.generate import Sampling
from halluc.sources.aligned_errors import aligned_example, alignment, bt_runs, make_aligned_round
from halluc.tasks import arith

BT, EOS = 99, 98
A, B, C, D, E, X, Y, Z = 1, 2, 3, 4, 5, 6, 7, 8
K, ER, BK, CO, PR = int(Role.KEPT), int(Role.ERROR), int(Role.BACKTRACK), int(Role.CORRECTION), int(Role.PROMPT)


def test_the_docstring_example_golden():
    ex = aligned_example([50], [A, B, X, Y, C, D, Z], [A, B, C, D, E], BT, EOS)
    assert ex.ids == [50, A, B, X, Y, BT, BT, C, D, Z, BT, E, EOS]
    assert ex.roles == [PR, K, K, ER, ER, BK, BK, K, K, ER, BK, CO, K]
    assert bt_runs(ex.roles) == [2, 1]


def test_a_skipped_and_a_replaced_span_golden():
    # the sample skips C (the reference's C is written, nothing erased) and writes Z for E
    ex = aligned_example([], [A, B, D, Z], [A, B, C, D, E], BT, None)
    assert ex.ids == [A, B, C, D, Z, BT, E]
    assert ex.roles == [K, K, CO, K, ER, BK, CO]
    assert aligned_example([], [A, B], [A, B], BT, EOS) is None  # the reference itself: nothing to erase
    cut_short = aligned_example([], [A, B], [A, B, C], BT, EOS)  # a part of the reference: only insertions
    assert bt_runs(cut_short.roles) == [] and cut_short.ids == [A, B, C, EOS]


def test_min_match_joins_edits_split_by_a_short_match():
    sample, reference = [A, X, C, Y, E], [A, B, C, D, E]
    assert [op for op, _, _ in alignment(sample, reference)] == ["equal", "edit", "equal", "edit", "equal"]
    joined = alignment(sample, reference, min_match=2)
    assert joined == [("equal", [A], [A]), ("edit", [X, C, Y], [B, C, D]), ("equal", [E], [E])]
    ex = aligned_example([], sample, reference, BT, None, min_match=2)
    assert ex.ids == [A, X, C, Y, BT, BT, BT, B, C, D, E]
    # a short match at either end stays kept: nothing before or after it to join
    assert alignment([A, X], [A, B], min_match=5)[0] == ("equal", [A], [A])


@pytest.mark.parametrize("seed", range(4))
def test_every_example_erases_exactly_the_unmatched_tokens(seed):
    """On 500 random (sample, reference) pairs: apply_backtrack(response) == reference + EOS, every error
    run is followed by as many BTs, and the kept + error tokens are the sample in order."""
    rng = random.Random(seed)
    for _ in range(500):
        reference = [rng.randrange(1, 12) for _ in range(rng.randrange(1, 30))]
        sample = [t if rng.random() < 0.7 else rng.randrange(1, 12) for t in reference]
        sample = sample[:rng.randrange(0, len(sample) + 1)] + [rng.randrange(1, 12) for _ in range(rng.randrange(3))]
        min_match = rng.choice([1, 1, 2, 3])
        ex = aligned_example([50, 51], sample, reference, BT, EOS, min_match)
        if sample == reference:
            assert ex is None
            continue
        response = ex.ids[2:]
        assert apply_backtrack(response, BT) == reference + [EOS]
        written = [t for t, r in zip(ex.ids, ex.roles) if r in (K, ER)][:-1]  # without EOS
        assert written == sample
        matched = sum(m.size for m in SequenceMatcher(None, sample, reference, autojunk=False).get_matching_blocks())
        assert ex.roles.count(K) - 1 <= matched and (min_match > 1 or ex.roles.count(K) - 1 == matched)
        for i, r in enumerate(ex.roles):  # an error run is followed by its BT run of the same length
            if r == ER and (i + 1 == len(ex.roles) or ex.roles[i + 1] != ER):
                run = 0
                while i - run >= 0 and ex.roles[i - run] == ER:
                    run += 1
                assert ex.roles[i + 1:i + 1 + run] == [BK] * run


def test_a_builder_that_drops_a_backtrack_fails_the_check():
    """Negative control: the invariant check is what refuses a wrong example."""
    from halluc.sources import aligned_errors

    real = aligned_errors.alignment

    def correction_one_short(sample, reference, min_match=1):
        return [(op, a, b[:-1] if op == "edit" else b) for op, a, b in real(sample, reference, min_match)]

    aligned_errors.alignment = correction_one_short
    try:
        with pytest.raises(ValueError, match="apply_backtrack"):
            aligned_example([], [A, X, C], [A, B, C], BT, EOS)
    finally:
        aligned_errors.alignment = real


def test_a_round_from_a_tiny_model_aligns_only_wrong_samples(bt_tokenizer, arith_problems):
    tok = copy.deepcopy(bt_tokenizer)
    bt = backtrack_id(tok)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, eos_token_id=tok.eos_token_id).eval()
    problems = arith_problems[:24]
    rows, stats = make_aligned_round(model, tok, arith, problems, k=2, sampling=Sampling(1.0, 1.0, 3),
                                     max_new_tokens=40, per_problem=1, bt_id=bt)
    assert stats.samples == 48 and stats.right + stats.wrong == 48
    assert 0 < stats.kept == len(rows) <= 24 and len({r["problem"] for r in rows}) == len(rows)
    assert stats.bt_runs == sum(stats.runs_per_example[k] * k for k in stats.runs_per_example)
    for row in rows:
        p = problems[row["problem"]]
        prompt = tok(p.prompt)["input_ids"]
        clean = apply_backtrack(row["input_ids"][len(prompt):], bt)
        assert tok.decode(clean, skip_special_tokens=True).strip() == p.solution.strip()
        assert all(lab == -100 for lab, r in zip(row["labels"], row["roles"]) if r in (Role.ERROR, Role.PROMPT))
        assert 0 < sum(bt_runs(row["roles"])) <= 32 and len(row["input_ids"]) <= 256
