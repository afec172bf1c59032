"""GRPO's rollouts (issue 25): groups of completions sampled from the current policy with the batched
rewinding generator, rewarded on their visible text, and the objective that trains on them through the
shared trainer. The losses and the log-probs of a trace are pure functions in halluc/objectives/grpo.py."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from halluc.objectives.grpo import group_advantages, policy_loss, trace_example, trace_log_probs
# the settings (torch-free, so recipes/grpo.py checks them before torch loads), re-exported
from halluc.objectives.grpo_settings import GroupSampling, LossType, RewardScale, RewardSettings  # noqa: F401


# --------------------------------------------------------------------------- rewards

def completion_reward(right: bool, n_backtracks: int, trace_len: int, settings: RewardSettings,
                      steps_right: float | None = None) -> float:
    """R of one completion; `steps_right`: the fraction of its checked steps that verify (for step_weight)."""
    reward = 1.0 if right else -1.0
    if settings.bt_term:
        reward += (1.0 if n_backtracks <= settings.kappa * trace_len else 0.5) if right else -1.0
    if settings.step_weight and steps_right is not None:
        reward += settings.step_weight * steps_right
    return reward


def steps_right(kinds: list[str]) -> float | None:
    """The fraction of a verifier report's checked steps that are right (None: no step could be checked)."""
    from halluc.tasks.base import UNCHECKED

    checked = [k for k in kinds if k != UNCHECKED]
    return sum(k == "ok" for k in checked) / len(checked) if checked else None


def learned_steps_right(verifier, prompts: list[list[int]], visibles: list[list[int]], ends) -> list[float | None]:
    """Per completion, the mean P(right) that `verifier` (halluc.inference.verifiers: its solution_scores)
    gives the visible text at the end of each of its steps (cut after every token in `ends`); None: no step."""
    from halluc.inference.verifiers import split_steps_ids

    steps = [split_steps_ids(v, ends) for v in visibles]
    keep = [i for i, s in enumerate(steps) if s]
    scores = verifier.solution_scores([prompts[i] for i in keep], [steps[i] for i in keep]) if keep else []
    out: list[float | None] = [None] * len(visibles)
    for i, s in zip(keep, scores):
        out[i] = sum(s) / len(s)
    return out


def load_process_verifier(settings: RewardSettings, tokenizer):
    """The frozen learned verifier of `settings.process` (prm or head) on this process's device; None for
    the oracle (the task's verifier needs no model)."""
    if settings.process == "oracle" or not settings.step_weight:
        return None
    from halluc.core.distributed import local_device
    from halluc.core.model import load_causal_lm
    from halluc.core.tokens import check_same_vocab, load_tokenizer
    from halluc.inference.verifiers import make_verifier

    folder = settings.process_model
    check_same_vocab("reward.process_model", folder, tokenizer)
    if settings.process == "prm":
        from halluc.objectives.prm import load_prm

        prm = load_prm(folder).eval().to(local_device()).requires_grad_(False)
        return make_verifier("prm", tokenizer=tokenizer, prm=prm, prm_tokenizer=load_tokenizer(folder))
    from halluc.objectives.verifier_head import load_head

    model = load_causal_lm(folder).eval().to(local_device()).requires_grad_(False)
    load_head(folder, model)
    return make_verifier("head", policy=model, tokenizer=tokenizer, head_reads="text")


# --------------------------------------------------------------------------- the objective

@contextmanager
def generation_attention(model):
    """The model's attention set to sdpa while it generates (a tree backend's attention function expects
    the collator's units), restored after."""
    before = model.config._attn_implementation
    if before != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if before != "sdpa":
            model.set_attn_implementation(before)


def gathered_for_generation(model):
    """Under ZeRO-3 the policy's parameters are shards: gathered once on every process, with DeepSpeed's
    forward hooks removed, while it generates (each process samples its own prompts and stops when they are
    done, so no collective may run per token), then released and the hooks put back (DeepSpeed's
    unwrap_model_for_generation, as TRL does). `model`: the trainer's TargetModel. Otherwise nothing."""
    from contextlib import nullcontext

    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or not hasattr(model.module, "optimizer"):
        return nullcontext()
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    return unwrap_model_for_generation(model.module)  # the DeepSpeedEngine


@dataclass
class Samples:
    examples: list[dict]
    advantages: torch.Tensor
    old: list[torch.Tensor] | None  # None: the first iteration's own log-probs, detached (TRL's shortcut)
    ref: list[torch.Tensor] | None
    metrics: dict[str, float]


class GRPOObjective:
    """GRPO through the shared trainer (halluc.training.train's objective seam). A batch names problems;
    for each, `group` completions are sampled from the current policy with the batched generator (the
    semantics the policy was trained for: keep, or rewind with its cache entries removed), rewarded on
    their visible text, and given group-relative advantages; the loss is `policy_loss` over every sampled
    token, scored in the layout of the semantics it was sampled with. With iterations > 1 the same samples
    train that many consecutive steps (their old log-probs computed once, before the first), and the
    batches of the steps in between are not sampled."""

    item_mean = False
    laid_out = True  # a batch is problem indices; the completions are laid out here, never packed

    def __init__(self, problems, task, tokenizer, prompts: list[list[int]], *, sampling: GroupSampling,
                 rewards: RewardSettings, semantics: str, guards=None, loss_type: LossType = "grpo",
                 beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2, reference=None, seed: int = 0,
                 process_verifier=None, step_ends=frozenset()):
        from halluc.core.tokens import backtrack_id
        from halluc.inference.generate import LoopGuards

        self.problems, self.task, self.tokenizer, self.prompts = problems, task, tokenizer, prompts
        self.sampling, self.rewards, self.semantics = sampling, rewards, semantics
        self.guards = guards or LoopGuards()
        self.loss_type, self.beta, self.eps_low, self.eps_high = loss_type, beta, eps_low, eps_high
        self.reference, self.seed = reference, seed
        self.process_verifier, self.step_ends = process_verifier, step_ends  # a learned process reward's scorer
        self.bt_id = backtrack_id(tokenizer)
        self._temperature = sampling.temperature or 1.0  # log-probs under the distribution sampled (greedy: 1)
        self._samples: Samples | None = None
        self._ref = None  # the reference prepared for the trainer's backend and launcher
        self._left = 0
        self._trainer = None

    def collator(self, layout, tokenizer):
        return lambda rows: {"problem": torch.tensor([int(r["problem"]) for r in rows])}

    def attach(self, trainer) -> None:
        self._trainer = trainer  # its step seeds the sampling (a resumed run samples what it would have)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        if self._left == 0 or self._samples is None:
            self._samples = self._sample(model, batch["problem"].tolist())
            self._left = self.sampling.iterations
        self._left -= 1
        s = self._samples
        logps = trace_log_probs(model, s.examples, self.semantics, model.backend, self._temperature)
        old = s.old if s.old is not None else [x.detach() for x in logps]
        new, mask = _pad(logps)
        loss, metrics = policy_loss(new, _pad(old)[0], s.advantages.to(new.device), mask,
                                    ref_logps=None if s.ref is None else _pad(s.ref)[0].to(new.device),
                                    beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high,
                                    loss_type=self.loss_type, max_completion_length=self.sampling.max_new_tokens)
        return loss, {**metrics, **s.metrics}

    def _sample(self, model, problem_ids: list[int]) -> Samples:
        from halluc.inference.generate import Sampling, generate
        from halluc.objectives.dpo import prepare_reference

        g = self.sampling
        inner = model.inner
        step = self._trainer.state.global_step if self._trainer is not None else 0
        prompts = [self.prompts[i] for i in problem_ids for _ in range(g.group)]
        was_training = inner.training
        inner.eval()
        with torch.no_grad(), generation_attention(inner), gathered_for_generation(model):
            gens = generate(inner, prompts, max_new_tokens=g.max_new_tokens, backtrack_id=self.bt_id,
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            semantics=self.semantics, guards=self.guards,
                            sampling=Sampling(g.temperature, g.top_p, self.seed * 1_000_003 + step))
        inner.train(was_training)
        eos = self.tokenizer.eos_token_id
        learned = None
        if self.process_verifier is not None and self.rewards.step_weight:
            with torch.no_grad():
                learned = learned_steps_right(self.process_verifier, prompts, [list(x.visible) for x in gens],
                                              self.step_ends)
        examples, rewards, right_count, process = [], [], 0, []
        for k, (i, prompt, gen) in enumerate(zip([i for i in problem_ids for _ in range(g.group)], prompts, gens)):
            text = self.tokenizer.decode(gen.visible, skip_special_tokens=True)
            report = self.task.verify_steps(self.problems[i], self.task.split_steps(text))
            right = bool(report.answer_correct)
            right_count += right
            step_score = learned[k] if learned is not None else steps_right(report.kinds)
            process.append(step_score or 0.0)
            rewards.append(completion_reward(right, gen.n_backtracks, len(gen.trace), self.rewards, step_score))
            completion = list(gen.trace) + ([eos] if gen.stop == "eos" else [])  # stopping is an action too
            examples.append(trace_example(prompt, completion or [eos], self.bt_id))
        reward = torch.tensor(rewards)
        advantages = group_advantages(reward, g.group, g.scale_rewards)
        old = ref = None
        with torch.no_grad():
            if g.iterations > 1:
                old = trace_log_probs(model, examples, self.semantics, model.backend, self._temperature)
            if self.beta and self.reference is not None:
                if self._ref is None:  # once the trainer chose the backend: placed, sharded under ZeRO-3 (as DPO's)
                    self._ref = prepare_reference(self.reference, model,
                                                  self._trainer.accelerator if self._trainer is not None else None)
                ref = trace_log_probs(self._ref, examples, self.semantics, model.backend, self._temperature)
            elif self.beta and hasattr(inner, "disable_adapter"):  # LoRA: the starting model is the adapter off
                with inner.disable_adapter():
                    ref = trace_log_probs(model, examples, self.semantics, model.backend, self._temperature)
            elif self.beta:
                raise ValueError("beta > 0 needs a reference model (or a LoRA policy, whose adapter is disabled)")
        n = len(gens)
        grouped = reward.view(-1, g.group)
        metrics = {"reward": float(reward.mean()), "reward_std": float(grouped.std(dim=1).mean()) if g.group > 1 else 0.0,
                   "frac_reward_zero_std": float((grouped.std(dim=1) == 0).float().mean()) if g.group > 1 else 1.0,
                   "completions/mean_length": sum(len(e["input_ids"]) - len(p) for e, p in zip(examples, prompts)) / n,
                   "accuracy": right_count / n, "bt_per_completion": sum(x.n_backtracks for x in gens) / n,
                   "wasted_per_completion": sum(x.n_erased + x.n_backtracks for x in gens) / n}
        if self.rewards.step_weight:  # the process term's mean, before its weight
            metrics["process_score"] = sum(process) / n
        return Samples(examples, advantages, old, ref, metrics)


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion log-probs -> [B, T] (zeros past each end) and the mask of real tokens."""
    length = max(len(r) for r in rows)
    out = torch.zeros(len(rows), length, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros(len(rows), length, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return out, mask
