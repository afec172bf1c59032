"""Group-relative policy optimisation (GRPO) losses, as pure functions on per-token log-probs.

For each prompt a group of G sampled completions gets rewards r_1..r_G; each completion's advantage is
its reward against its group's:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)      scale="group" (GRPO; std with Bessel's correction)
    A_i = (r_i - mean(r)) / (std(all r) + 1e-4)  scale="batch"
    A_i =  r_i - mean(r)                          scale="none"  (Dr. GRPO)

Every scored token t of completion i then has the clipped surrogate of PPO with the importance ratio
rho = exp(logp - old_logp) against the policy that sampled it, and a KL penalty to a frozen reference by
the k3 estimator (Schulman), all as TRL 1.16's GRPOTrainer computes them (tests/test_grpo.py checks the
loss and its gradient against it):

    l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta (exp(ref - logp) - (ref - logp) - 1)

and the loss averages l over tokens in one of three ways (`loss_type`):

    grpo     mean over each completion's tokens, then over completions (DeepSeekMath)
    dapo     sum over all tokens / number of scored tokens in the batch (token-level, DAPO)
    dr_grpo  sum over all tokens / (completions x max_completion_length) (Dr. GRPO: no length bias)
"""
from __future__ import annotations

import torch

from halluc.core.example import IGNORE_INDEX, Role
from halluc.objectives.grpo_settings import LossType, RewardScale

# the training layout that reproduces each generation semantics (tests/test_generate.py proves the logits equal)
SEMANTICS_LAYOUT = {"keep": ("causal", "original"), "rewind": ("block_errors", "rewound")}


def group_advantages(rewards: torch.Tensor, group: int, scale: RewardScale = "group") -> torch.Tensor:
    """Advantages of rewards laid out as consecutive groups of `group` completions of one prompt."""
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards are not groups of {group}")
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    return centred / (std + 1e-4)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                ref_logps: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
                eps_high: float = 0.2, loss_type: LossType = "grpo",
                max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) of completions' per-token log-probs [B, T] under the policy being trained (`logps`),
    the policy that sampled them (`old_logps`) and the reference (`ref_logps`, for beta > 0); `mask` [B, T]
    is 1 on scored tokens; `advantages` [B]. Metrics use TRL's names (kl, clip_ratio/*)."""
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type=dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, not {loss_type!r}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        metrics = {"clip_ratio/low_mean": float((low * mask).sum() / n),
                   "clip_ratio/high_mean": float((high * mask).sum() / n),
                   "clip_ratio/region_mean": float((torch.maximum(low, high) * mask).sum() / n)}
        if kl is not None:
            metrics["kl"] = float((kl * mask).sum() / n)
    return loss, metrics


def trace_example(prompt: list[int], trace: list[int], bt_id: int | None) -> dict:
    """A sampled completion as a training example: every trace token is a target (BTs, and tokens a later
    BT erased: the policy sampled them all); the edit tree reads what each BT erases from the roles."""
    roles = [int(Role.PROMPT)] * len(prompt) + [int(Role.BACKTRACK if t == bt_id else Role.KEPT) for t in trace]
    return {"input_ids": list(prompt) + list(trace), "roles": roles,
            "labels": [IGNORE_INDEX] * len(prompt) + list(trace)}


def trace_log_probs(model, examples: list[dict], semantics: str, backend: str,
                    temperature: float = 1.0) -> list[torch.Tensor]:
    """log P(token) of every trace token of `trace_example`s, one forward in the layout of the semantics
    the traces were sampled with (keep: causal; rewind: erased tokens blocked, rewound positions), on
    `backend` (the model set up with halluc.structure.backends.use_backend), under the sampling
    temperature (the distribution the tokens were drawn from, as TRL scores them). With gradients if enabled."""
    from halluc.core.losses import target_log_probs
    from halluc.structure.backends import forward_targets
    from halluc.structure.packing import collate, concat_row, layout_example

    mode, positions = SEMANTICS_LAYOUT[semantics]
    batch = collate([concat_row([layout_example(e, mode, positions)]) for e in examples])
    targets = forward_targets(model, batch, backend)
    logps = target_log_probs(targets.logits.float() / temperature, targets.ids)
    return [logps[targets.row == r] for r in range(len(examples))]
