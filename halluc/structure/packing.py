"""Packing many examples (and two-branch prompt+chosen+rejected units) into rows.

Everything is expressed with the one `attn_end` array of halluc.structure.attention: an example laid
out at offset o keeps its own tree, shifted by o, so no token attends across examples
(every end stays inside its example), and a second branch is a sibling subtree of the
prompt's last token. Labels are HF style (unshifted: labels[j] = ids[j] if trained else
-100); `pred_pos[j]` says which position's logits predict token j, which is what makes the
second branch's first token predicted from the prompt's last token rather than from the
token laid out before it. `branch_ids` says which branch of its unit a token is on (0 for an
example; -1 for a shared prompt, 0 chosen, 1 rejected for a two-branch unit), and `collate`
numbers the units of a batch (`unit_id`), so per-branch sums work on packed batches.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from halluc.structure.attention import edit_tree, pad_end, position_ids, pred_pos
from halluc.core.example import IGNORE_INDEX


@dataclass
class Layout:
    """One unit laid out on its own (offset 0): an example, or prompt + two branches."""

    input_ids: np.ndarray
    labels: np.ndarray
    roles: np.ndarray
    attn_end: np.ndarray
    position_ids: np.ndarray
    pred_pos: np.ndarray
    branch_ids: np.ndarray        # per token: 0 for an example; -1 shared prompt, 0 chosen, 1 rejected
    branches: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) spans

    def __len__(self) -> int:
        return len(self.input_ids)


def _arr(x, dtype=np.int64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def layout_example(example: dict, mode: str = "block_errors", positions: str = "original") -> Layout:
    """Lay out one example dict with `input_ids`, `labels`, `roles`."""
    ids, labels, roles = _arr(example["input_ids"]), _arr(example["labels"]), _arr(example["roles"])
    if not len(ids) == len(labels) == len(roles):
        raise ValueError(f"lengths differ: ids {len(ids)}, labels {len(labels)}, roles {len(roles)}")
    end, depth = edit_tree(roles, mode)
    return Layout(ids, labels, roles, end, position_ids(depth=depth, scheme=positions), pred_pos(len(ids)),
                  branch_ids=np.zeros(len(ids), dtype=np.int64))


def layout_two_branch(prompt: dict, chosen: dict, rejected: dict, mode: str = "block_errors",
                      positions: str = "original") -> Layout:
    """Prompt, then branch A (chosen), then branch B (rejected), sharing the prompt once.

    `prompt` has `input_ids` (and optional `roles`, default PROMPT); each branch has
    `input_ids`, `labels`, `roles` of the continuation only. B cannot see A, B's positions
    continue from the prompt as if A were absent, and B's first token is predicted from the
    prompt's last token. `branches` holds the two spans (for per-branch log-probs in DPO).
    """
    p_ids = _arr(prompt["input_ids"])
    p_roles = _arr(prompt.get("roles", np.zeros(len(p_ids))))
    n_p = len(p_ids)
    if n_p == 0:
        raise ValueError("two branches need a non-empty prompt to branch from")
    parts = []
    for branch in (chosen, rejected):
        roles = np.concatenate([p_roles, _arr(branch["roles"])])
        # Each branch's tree is built with the prompt in front; the prompt is never popped
        # (edit_tree protects the leading PROMPT run), so it is an ancestor of both branches.
        end, depth = edit_tree(roles, mode)
        if (end[:n_p] < len(roles)).any():
            raise ValueError("a branch pops into the prompt: roles must start with a PROMPT run")
        pos = position_ids(depth=depth, scheme=positions)
        parts.append((_arr(branch["input_ids"]), _arr(branch["labels"]), _arr(branch["roles"]), end[n_p:], pos[n_p:]))
    (a_ids, a_lab, a_roles, a_end, a_pos), (b_ids, b_lab, b_roles, b_end, b_pos) = parts
    n_a, n_b = len(a_ids), len(b_ids)
    total = n_p + n_a + n_b
    attn_end = np.concatenate([np.full(n_p, total), a_end, b_end + n_a]).astype(np.int32)
    # B's ends were computed with B right after the prompt: shift them past A.
    return Layout(
        input_ids=np.concatenate([p_ids, a_ids, b_ids]),
        labels=np.concatenate([np.full(n_p, IGNORE_INDEX), a_lab, b_lab]),
        roles=np.concatenate([p_roles, a_roles, b_roles]),
        attn_end=attn_end,
        position_ids=np.concatenate([np.arange(n_p), a_pos, b_pos]).astype(np.int32),
        pred_pos=pred_pos(total, [0, n_p + n_a], [-1, n_p - 1]),
        branch_ids=np.concatenate([np.full(n_p, -1), np.zeros(n_a), np.ones(n_b)]).astype(np.int64),
        branches=[(n_p, n_p + n_a), (n_p + n_a, total)],
    )


@dataclass
class PackResult:
    rows: list[dict]          # numpy arrays per row, see `concat_row`
    n_units: int              # units packed
    n_dropped: int            # units longer than max_len, dropped
    n_tokens: int             # real tokens packed
    max_len: int

    @property
    def real_fraction(self) -> float:
        """Real tokens / (rows * max_len): the share of a fixed-shape batch that is not padding."""
        return self.n_tokens / max(len(self.rows) * self.max_len, 1)


def best_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """Unit indices per row: longest first, each into the row it fills most tightly."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []      # sorted remaining capacities
    free_row: list[int] = []  # row index for each entry of `free`
    rows: list[list[int]] = []
    for i in order:
        at = bisect.bisect_left(free, lengths[i])
        if at == len(free):
            rows.append([i])
            row, left = len(rows) - 1, max_len - lengths[i]
        else:
            row, left = free_row.pop(at), free.pop(at) - lengths[i]
            rows[row].append(i)
        at = bisect.bisect_left(free, left)
        free.insert(at, left)
        free_row.insert(at, row)
    return rows


def concat_row(units: list[Layout]) -> dict:
    """One packed row: ends, pred_pos and branch spans shifted by each unit's offset."""
    offsets = np.cumsum([0] + [len(u) for u in units])[:-1]
    labels = []
    for u in units:
        lab = u.labels.copy()
        lab[0] = IGNORE_INDEX  # nothing in this row predicts a unit's first token
        labels.append(lab)
    return {
        "input_ids": np.concatenate([u.input_ids for u in units]),
        "labels": np.concatenate(labels),
        "roles": np.concatenate([u.roles for u in units]),
        "attn_end": np.concatenate([u.attn_end + o for u, o in zip(units, offsets)]).astype(np.int32),
        "position_ids": np.concatenate([u.position_ids for u in units]).astype(np.int32),
        "pred_pos": np.concatenate([np.where(u.pred_pos >= 0, u.pred_pos + o, -1) for u, o in zip(units, offsets)]),
        "branch_ids": np.concatenate([u.branch_ids for u in units]),
        "unit_starts": offsets,
        "branches": [(s + o, e + o) for u, o in zip(units, offsets) for s, e in u.branches],
    }


def pack(layouts: list[Layout], max_len: int) -> PackResult:
    """Best-fit-decreasing packing of laid-out units into rows of at most max_len tokens."""
    kept = [u for u in layouts if 0 < len(u) <= max_len]
    n_dropped = sum(1 for u in layouts if len(u) > max_len)
    groups = best_fit_decreasing([len(u) for u in kept], max_len)
    rows = [concat_row([kept[i] for i in g]) for g in groups]
    return PackResult(rows, len(kept), n_dropped, sum(len(u) for u in kept), max_len)


def pack_examples(examples: list[dict], max_len: int, mode: str = "block_errors",
                  positions: str = "original") -> PackResult:
    """Lay out and pack example dicts (`input_ids`, `labels`, `roles`)."""
    return pack([layout_example(e, mode, positions) for e in examples], max_len)


def collate(rows: list[dict], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack rows into the batch every backend takes, padded to `pad_to` (or the longest).

    Keys: input_ids, labels, attn_end, position_ids, pred_pos, unit_id, branch_id (B, L) int64
    and is_real (B, L) bool. unit_id numbers the units of the whole batch in order (a row
    without `unit_starts` is one unit); branch_id is the row's `branch_ids` (0 if absent).
    Padded positions: id 0, label -100, end[k] = k + 1 (they see only themselves),
    position 0, pred_pos -1, unit -1, branch -1.
    """
    length = pad_to or max(len(r["input_ids"]) for r in rows)
    units, n_units = [], 0
    for r in rows:  # each token's unit: the last unit start at or before it, numbered over the batch
        starts = np.asarray(r.get("unit_starts", [0]))
        units.append(n_units + np.searchsorted(starts, np.arange(len(r["input_ids"])), side="right") - 1)
        n_units += len(starts)

    def pad_values(values, fill):
        out = np.full((len(rows), length), fill, dtype=np.int64)
        for b, v in enumerate(values):
            out[b, : len(v)] = v
        return torch.from_numpy(out)

    def pad(key, fill):
        return pad_values([r[key] for r in rows], fill)

    is_real = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, r in enumerate(rows):
        is_real[b, : len(r["input_ids"])] = True
    return {
        "input_ids": pad("input_ids", 0),
        "labels": pad("labels", IGNORE_INDEX),
        "attn_end": torch.from_numpy(np.stack([pad_end(r["attn_end"], length) for r in rows]).astype(np.int64)),
        "position_ids": pad("position_ids", 0),
        "pred_pos": pad("pred_pos", -1),
        "unit_id": pad_values(units, -1),
        "branch_id": pad_values([r.get("branch_ids", np.zeros(len(r["input_ids"]), dtype=np.int64))
                                 for r in rows], -1),
        "is_real": is_real,
    }
