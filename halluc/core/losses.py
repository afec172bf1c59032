"""Losses as pure functions of the logits at target positions (halluc.structure.backends.Targets).

Nothing here runs a model: an objective (halluc.training.train) asks the backend for `Targets` (the
logits that predict each trained token, and that token's unit and branch), then calls these.
Every function has golden values worked out by hand (tests/test_losses.py; the preference losses
in tests/test_dpo.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from halluc.core.config import PREFERENCE_KINDS


def token_cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over targets of -log softmax(logits)[id]: (N, V), (N,) -> scalar, in fp32."""
    if len(ids) == 0:
        raise ValueError("batch has no trained token (all labels -100 or unpredictable)")
    return F.cross_entropy(logits.float(), ids)


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the positive class weighed by negatives / positives of the batch, so
    both classes count alike: unweighted, a verifier on ~10% wrong steps learns "right" everywhere
    (issue 23). With one class only (no positives, or no negatives) it is the plain loss."""
    positives = labels.sum()
    negatives = labels.numel() - positives
    weight = negatives / positives if positives > 0 and negatives > 0 else labels.new_tensor(1.0)  # one class: plain
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with each class present weighed by n / (classes present x its count): the mean
    over classes of each class's mean loss (the PRM's right / wrong steps, issue 23)."""
    counts = torch.bincount(labels, minlength=logits.shape[-1]).to(logits.dtype)
    present = counts > 0
    weight = torch.where(present, labels.numel() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    return F.cross_entropy(logits, labels, weight=weight)


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


# --------------------------------------------------------------------------- preferences (technique 6)
# Per pair: `policy` and `reference` are (P, 2) tables of log-prob sums over the completion tokens,
# column 0 the chosen completion, column 1 the rejected one (sum_per_branch of target_log_probs).

PREFERENCE_LOSSES = tuple(name for name, kind in PREFERENCE_KINDS.items() if kind.reference)


def sequential_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per target, KL(pi_ref || pi_theta) over the vocabulary at that position (TDPO's sequential
    KL, summed over a branch's tokens by `sum_per_branch`): (N, V), (N, V) -> (N,), in fp32."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    pol = F.log_softmax(policy_logits.float(), dim=-1)
    return (ref.exp() * (ref - pol)).sum(-1)


def preference_loss(kind: str, policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1,
                    alpha: float = 0.5, kl: torch.Tensor | None = None,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss (P,) of `kind`, with u = (c - ref_c) - (r - ref_r):

    sigmoid  -logsigmoid(beta * u)                                   (DPO; TRL's "sigmoid")
    ipo      ((c - ref_c) / n_c - (r - ref_r) / n_r - 1 / (2 beta))^2 (TRL's IPO: per-token means,
             `lengths` (P, 2) = completion tokens)
    tdpo1    -logsigmoid(beta * (u - (kl_r - kl_c)))                 (Zeng et al. 2024)
    tdpo2    -logsigmoid(beta * (u - alpha * (kl_r - sg(kl_c))))     (stop-gradient on the chosen KL)
    where `kl` (P, 2) is the sequential KL(ref || policy) summed over each completion."""
    if kind not in _FORMULAS:
        raise ValueError(f"loss must be one of {', '.join(PREFERENCE_LOSSES)}, not {kind!r}")
    needs = PREFERENCE_KINDS[kind]
    if needs.lengths and lengths is None:
        raise ValueError(f"{kind} needs the completion lengths")
    if needs.token_kl and kl is None:
        raise ValueError(f"{kind} needs the sequential KL of each completion (a live reference)")
    return _FORMULAS[kind](policy - reference, beta, alpha, kl, lengths)


def _dpo(ratios, beta, alpha, kl, lengths):
    return -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))


def _ipo(ratios, beta, alpha, kl, lengths):
    means = ratios / lengths.clamp(min=1)
    return (means[:, 0] - means[:, 1] - 1 / (2 * beta)) ** 2


def _tdpo1(ratios, beta, alpha, kl, lengths):
    return -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1] - (kl[:, 1] - kl[:, 0])))


def _tdpo2(ratios, beta, alpha, kl, lengths):
    return -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1] - alpha * (kl[:, 1] - kl[:, 0].detach())))


_FORMULAS = {"sigmoid": _dpo, "ipo": _ipo, "tdpo1": _tdpo1, "tdpo2": _tdpo2}
