"""One attention structure for error blocking, packing and prefix sharing.

A backtracking trace is a depth-first walk of an *edit tree*: a normal token is a child of
the token on top of the visible stack and is pushed; a BT token is a child of the token just
before it (so a BT run sees the tokens it erases and the earlier BTs of its run) and pops
the stack. Laid out in time order the tokens are in DFS preorder, so every subtree is a
contiguous range and the whole structure is one integer array:

    end[k] = one past the last token of k's subtree
    query q may attend key k  iff  k <= q < end[k]      (k is q itself or an ancestor)

Modes:
- "causal": every token sees every earlier token (end[k] = L); errors stay visible and
  inference keeps them in the KV cache (Physics-of-LM "retry" style).
- "block_errors": erased tokens (whatever their role) and BT tokens form a side branch;
  the token after a BT run is a child of the visible-stack top, so it sees neither the
  erased tokens nor the BTs. The first correction token is still predicted from the last
  BT's logits (usual next-token shift), and that BT saw the error.

`depth` is the token's depth in the tree ("rewound" positions): exactly the position a KV
cache cropped after every BT run gives at inference; the first token after a run gets the
position of the first token the run erased.

Prompt tokens (the leading Role.PROMPT run) are never popped: BTs act on the response only,
as in `Example.clean_response`. Apart from that, only Role.BACKTRACK matters.

Padding convention used by every consumer of `end`: a padded position k has end[k] = k + 1,
so it attends only to itself (no NaN row) and no real query attends to it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from halluc.core.example import Role

MODES = ("causal", "block_errors")
POSITION_SCHEMES = ("original", "rewound")


def _as_int_array(roles: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(roles, torch.Tensor):
        roles = roles.cpu().numpy()
    return np.asarray(roles, dtype=np.int64).reshape(-1)


def _prompt_len(roles: np.ndarray) -> int:
    not_prompt = np.flatnonzero(roles != Role.PROMPT)
    return int(not_prompt[0]) if len(not_prompt) else len(roles)


def edit_tree(roles, mode: str = "block_errors") -> tuple[np.ndarray, np.ndarray]:
    """The edit tree of one trace, as `(end, depth)` int32 arrays of length L.

    `roles`: one Role per token (list, numpy or torch). O(L) numpy plus a Python step per
    BT *run* (not per token), so a 2048-token row takes well under a millisecond.
    """
    roles = _as_int_array(roles)
    n = len(roles)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    is_bt = roles == Role.BACKTRACK
    if mode == "causal" or not is_bt.any():
        return np.full(n, n, dtype=np.int32), np.arange(n, dtype=np.int32)

    floor = _prompt_len(roles)  # prompt tokens are never popped
    # BT runs as [start, stop) pairs: the places where is_bt switches.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], is_bt.view(np.int8), [0]))))
    starts, stops = edges[0::2], edges[1::2]

    # Depth without a per-token loop. Visible count after each token is a walk (+1 normal,
    # -1 BT) reflected at the prompt floor; a normal token's depth is the count before it.
    step = np.where(is_bt, -1, 1)
    step[:floor] = 1
    walk = np.cumsum(step)
    below_floor = walk - floor
    below_floor[:floor] = 0
    visible_after = walk - np.minimum(np.minimum.accumulate(below_floor), 0)
    depth = np.concatenate(([0], visible_after[:-1])).astype(np.int32)
    # A BT is a child of the token before it: depth counts on from the token before its run.
    run_len = stops - starts
    run_base = np.where(starts > 0, depth[np.maximum(starts - 1, 0)] + 1, 0)
    offset_in_run = np.arange(n)[is_bt] - np.repeat(starts, run_len)
    depth[is_bt] = np.repeat(run_base, run_len) + offset_in_run

    # end: every BT's subtree (the rest of its run) closes where the run stops; a popped
    # token's subtree closes there too, since the next normal token re-attaches to the
    # stack top. Only the pops need the stack, so the Python loop is per run, not per token.
    end = np.full(n, n, dtype=np.int32)
    end[is_bt] = np.repeat(stops, run_len)
    stack: list[int] = []  # visible tokens, bottom to top
    popped: list[int] = []
    popped_end: list[int] = []
    prev = 0
    for s, e in zip(starts.tolist(), stops.tolist()):
        stack.extend(range(prev, s))
        n_pop = min(e - s, len(stack) - floor)
        if n_pop > 0:
            popped.extend(stack[-n_pop:])
            popped_end.extend([e] * n_pop)
            del stack[-n_pop:]
        prev = e
    end[popped] = popped_end
    return end, depth


def position_ids(*, depth=None, roles=None, scheme: str = "original", mode: str = "block_errors") -> np.ndarray:
    """Position ids of one trace: "original" = 0..L-1, "rewound" = tree depth.

    Give `depth` (from `edit_tree`) or `roles` (the tree is then built with `mode`).
    Under "causal" the tree is a chain, so both schemes agree.
    """
    if scheme not in POSITION_SCHEMES:
        raise ValueError(f"scheme must be one of {POSITION_SCHEMES}, got {scheme!r}")
    if (depth is None) == (roles is None):
        raise ValueError("give exactly one of depth= or roles=")
    if depth is None:
        depth = edit_tree(roles, mode)[1]
    depth = _as_int_array(depth).astype(np.int32)
    if scheme == "original":
        return np.arange(len(depth), dtype=np.int32)
    return depth


def pred_pos(length: int, segment_starts: Sequence[int] = (0,), predicted_from: Sequence[int] | None = None) -> np.ndarray:
    """For each token, the index of the position whose logits predict it (-1: none).

    Inside a trace this is j - 1 (after a BT run, the last BT predicts the correction).
    A segment starting at s is predicted from `predicted_from[i]` (-1 for a new example,
    the branch point, e.g. the last prompt token, for a second branch).
    """
    out = np.arange(-1, length - 1, dtype=np.int64)
    if predicted_from is None:
        predicted_from = [-1] * len(segment_starts)
    for s, p in zip(segment_starts, predicted_from):
        if s < length:
            out[s] = p
    return out


def visible_keys(end: np.ndarray, q: int) -> np.ndarray:
    """Indices of the keys query q may attend (for tests and debugging)."""
    k = np.arange(q + 1)
    return k[np.asarray(end)[: q + 1] > q]


def pad_end(end: np.ndarray, length: int) -> np.ndarray:
    """Extend `end` to `length` with padded positions that see only themselves."""
    out = np.arange(1, length + 1, dtype=np.int32)
    out[: len(end)] = end
    return out


def dense_mask(end, dtype: torch.dtype = torch.bool, device=None) -> torch.Tensor:
    """The (L, L) mask of `end` (1D), or (B, 1, L, L) for a batch `end` of shape (B, L).

    bool: True = attend (for sdpa). Floating dtype: additive 0 / finfo(dtype).min (for
    eager, which ADDS the mask to the scores: a bool mask would be silently wrong there).
    Padded positions must follow the `pad_end` convention (end[k] = k + 1).
    """
    end = torch.as_tensor(end, device=device)
    n = end.shape[-1]
    q = torch.arange(n, device=end.device)[:, None]
    # q < end[k], then keep k <= q with an in-place tril (3-4x faster than a second compare)
    if end.dim() == 1:
        allowed = (q < end[None, :]).tril_()
    else:
        allowed = (q < end[:, None, :]).tril_()[:, None]  # (B, 1, L, L)
    if dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=end.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
