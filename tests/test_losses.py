"""Losses are pure functions of target logits: golden values worked out by hand, and per-branch
sums on a packed two-branch batch equal scoring each branch's sequence on its own."""
import math

import numpy as np
import pytest
import torch

from halluc.structure.backends import forward_targets, use_backend
from halluc.core.example import IGNORE_INDEX, Role
from halluc.core.losses import sum_per_branch, target_log_probs, token_cross_entropy
from halluc.core.model import tiny_llama
from halluc.structure.packing import collate, layout_example, layout_two_branch, pack

# softmax([0, ln 3]) = [1/4, 3/4]
LOGITS = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])


def test_token_cross_entropy_golden():
    assert token_cross_entropy(LOGITS, torch.tensor([1, 0])).item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2)
    with pytest.raises(ValueError, match="no trained token"):
        token_cross_entropy(LOGITS[:0], torch.tensor([], dtype=torch.long))


def test_target_log_probs_golden():
    got = target_log_probs(LOGITS, torch.tensor([0, 1]))
    torch.testing.assert_close(got, torch.tensor([math.log(1 / 4), math.log(3 / 4)]))


def test_sum_per_branch_golden():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    unit, branch = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 0, 1])
    torch.testing.assert_close(sum_per_branch(values, unit, branch), torch.tensor([[1.0, 2.0], [7.0, 5.0]]))
    torch.testing.assert_close(sum_per_branch(values, unit, branch, n_units=3)[2], torch.zeros(2))
    with pytest.raises(ValueError, match="branch ids"):
        sum_per_branch(values, unit, torch.tensor([0, 0, 0, 0, 2]))


def _branch(ids, roles):
    roles = np.asarray(roles)
    return {"input_ids": np.asarray(ids), "roles": roles,
            "labels": np.where(roles == Role.ERROR, IGNORE_INDEX, np.asarray(ids))}


def test_per_branch_log_prob_sums_on_a_packed_batch_equal_separate_scoring():
    """Three pairs (prompt + chosen + rejected, prompt stored once) and a plain example packed in
    two rows: each pair's chosen and rejected log-prob sums equal those of prompt+chosen and
    prompt+rejected scored as ordinary sequences. Negative control: summing by row mixes pairs."""
    torch.manual_seed(0)
    model = tiny_llama(40, hidden=32, layers=2, heads=2).eval()
    rng = np.random.default_rng(0)
    K, BT = Role.KEPT, 39
    pairs = []
    for n_p in (3, 5, 4):
        prompt = {"input_ids": rng.integers(3, 39, n_p), "roles": np.zeros(n_p, dtype=int)}
        chosen = _branch([7, 8, 9, BT, 10, 11], [K, K, Role.ERROR, Role.BACKTRACK, Role.CORRECTION, K])
        rejected = _branch(rng.integers(3, 39, 4), [K] * 4)
        pairs.append((prompt, chosen, rejected))
    plain = {"input_ids": rng.integers(3, 39, 6), "roles": np.r_[0, 0, [K] * 4]}
    plain["labels"] = np.where(plain["roles"] == 0, IGNORE_INDEX, plain["input_ids"])
    units = [layout_two_branch(*p, mode="block_errors") for p in pairs] + [layout_example(plain, "block_errors")]
    packed = pack(units, max_len=40)
    assert len(packed.rows) == 2
    batch = collate(packed.rows)
    backend = use_backend(model, "dense")
    with torch.no_grad():
        t = forward_targets(model, batch, backend)
        sums = sum_per_branch(target_log_probs(t.logits, t.ids), t.unit, t.branch, n_units=t.n_units)
        by_row = sum_per_branch(target_log_probs(t.logits, t.ids), t.row, t.branch)
    # the units in the order collate numbered them: find each pair by its prompt
    expected = {}
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for b, branch in enumerate((chosen, rejected)):
            seq = {k: np.concatenate([prompt[k], branch[k]]) for k in ("input_ids", "roles")}
            seq["labels"] = np.concatenate([np.full(len(prompt["input_ids"]), IGNORE_INDEX), branch["labels"]])
            one = collate([vars(layout_example(seq, "block_errors"))])
            with torch.no_grad():
                s = forward_targets(model, one, backend)
                expected[i, b] = target_log_probs(s.logits, s.ids).sum().item()
    found = 0
    for unit in range(t.n_units):
        row, col = torch.nonzero(batch["unit_id"] == unit)[0].tolist()
        ids = batch["input_ids"][row, col:].tolist()
        for i, (prompt, _, _) in enumerate(pairs):
            if ids[:len(prompt["input_ids"])] == prompt["input_ids"].tolist():
                found += 1
                assert sums[unit].tolist() == pytest.approx([expected[i, 0], expected[i, 1]], abs=1e-4)
    assert found == 3
    assert not torch.allclose(by_row[:2], sums[:2], atol=1e-2)  # rows hold several units: mixed
