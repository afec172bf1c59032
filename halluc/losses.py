"""Losses as pure functions of the logits at target positions (halluc.backends.Targets).

Nothing here runs a model: an objective (halluc.train) asks the backend for `Targets` (the
logits that predict each trained token, and that token's unit and branch), then calls these.
Every function has golden values worked out by hand in tests/test_losses.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over targets of -log softmax(logits)[id]: (N, V), (N,) -> scalar, in fp32."""
    if len(ids) == 0:
        raise ValueError("batch has no trained token (all labels -100 or unpredictable)")
    return F.cross_entropy(logits.float(), ids)


def target_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[id] per target, (N, V), (N,) -> (N,), in fp32 (as TRL's oracle runs)."""
    logits = logits.float()
    return logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def sum_per_branch(values: torch.Tensor, unit: torch.Tensor, branch: torch.Tensor,
                   n_units: int | None = None, n_branches: int = 2) -> torch.Tensor:
    """(N,) per-target values summed into a (units, n_branches) table by each target's unit and
    branch, e.g. a DPO pair's chosen (branch 0) and rejected (branch 1) log-prob sums on a
    packed batch. Units without a target in a branch get 0."""
    n_units = int(unit.max()) + 1 if n_units is None else n_units
    if len(values) and (int(branch.min()) < 0 or int(branch.max()) >= n_branches):
        raise ValueError(f"branch ids must be in [0, {n_branches}), got {branch.unique().tolist()}")
    out = torch.zeros(n_units * n_branches, dtype=values.dtype, device=values.device)
    return out.index_add(0, unit * n_branches + branch, values).view(n_units, n_branches)
