"""GRPO's settings, torch-free: recipes/grpo.py reads and checks them before any ML library loads
(halluc.sources.rollouts and halluc.objectives.grpo use them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from halluc.core.config import NonNegativeFloat, PositiveInt, TopP

LossType = Literal["grpo", "dapo", "dr_grpo"]
RewardScale = Literal["group", "batch", "none"]


@dataclass
class RewardSettings:
    """The reward of one completion (N-MARS, research-wave3.md): R = R_inc + R_pen.

    R_inc = +1 if the final answer of the visible (BT-applied) text is right, else -1.
    R_pen (bt_term) = +1 if right with at most kappa x |trace| BTs, +0.5 if right with more, -1 if wrong.
    R_step (step_weight > 0) = step_weight x s, a process reward in [0, 1] from `process`:
      oracle: the fraction of the visible text's steps the task's verifier checks right (steps it cannot
              check do not count; the skyline);
      prm / head: the mean P(right) a learned verifier gives the visible text at the end of each of its
              steps (halluc.inference.verifiers; `process_model`: a PRM folder from recipes/prm.py, or a
              model folder with a verifier head from recipes/masked_sft.py verifier_head_weight=...; frozen,
              and reading the policy's token ids, so it needs the policy's tokenizer)."""

    bt_term: bool = True
    kappa: NonNegativeFloat = 0.1
    step_weight: NonNegativeFloat = 0.0
    process: Literal["oracle", "prm", "head"] = "oracle"
    process_model: str | None = None

    def check(self) -> None:
        if self.process != "oracle" and not self.process_model:
            raise ValueError(f"reward.process={self.process} needs reward.process_model (the {self.process}'s folder)")
        if self.process_model and self.process == "oracle":
            raise ValueError("reward.process_model is read only by reward.process=prm or head, not oracle")
        if self.process_model and not self.step_weight:
            raise ValueError("reward.process_model without reward.step_weight: the process reward would weigh 0")


@dataclass
class GroupSampling:
    """How GRPO samples its groups."""

    group: PositiveInt = 8               # completions per prompt (G)
    iterations: PositiveInt = 1          # optimisation steps on one generation batch (mu; old log-probs after the first)
    temperature: NonNegativeFloat = 1.0
    top_p: TopP = 1.0
    max_new_tokens: PositiveInt = 192
    scale_rewards: RewardScale = "group"
