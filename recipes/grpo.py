"""Reinforcement learning with a backtrack-aware reward: GRPO (issue 25; N-MARS, research-wave3.md).

    python recipes/grpo.py                                  # the lab: masked SFT (cached), then GRPO on SFT problems
    python recipes/grpo.py reward.bt_term=false             # answer reward only
    python recipes/grpo.py start=base                       # from the lab base with a BT token, no SFT
    python recipes/grpo.py reward.step_weight=0.5 reward.process=prm reward.process_model=runs/prm/prm   # + a PRM's step scores
    python recipes/grpo.py loss_type=dapo eps_high=0.28 rollout.group=16
    python recipes/grpo.py model=runs/masked_sft/checkpoint lab.task=gsm8k lab.train_file=... lab.test_file=...
    python recipes/grpo.py lora.enabled=true                 # adapters; the reference is the adapter disabled
    deepspeed --num_gpus 2 recipes/grpo.py deepspeed=ds_configs/zero3.json ...   # ZeRO-2/3 (gathered to generate)

Steps: (1) the policy: model=DIR, or the lab's masked SFT model (the lab base + technique 1, cached), or
(start=base) the lab base with a BT token added and no SFT;
(2) each step, for `batch_size` SFT problems, `rollout.group` completions sampled from the current policy
by the batched generator with the semantics it was trained for (keep, or rewind: a BT removes cache
entries), rewarded on their visible text (halluc/sources/rollouts.py: +1/-1 for the answer, plus
N-MARS's BT term), group-relative advantages; (3) the clipped policy-gradient loss with a k3 KL to the
reference (ref_model=DIR, else the starting model), over every sampled token scored in the layout of its
semantics (halluc/objectives/grpo.py; equal to TRL's GRPOTrainer loss on identical inputs); (4) evaluate,
write checkpoint, train.json, eval.json. TensorBoard: reward, reward_std, kl, clip_ratio/*,
completions/mean_length (TRL's names), accuracy, bt_per_completion, wasted_per_completion.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

from halluc.core.config import NonNegativeFloat, NonNegativeInt, PositiveInt, Stage, as_dict, check_run_rules, recipe_entry
from halluc.core.inputs import check_model_path, run_cli
from halluc.pipeline.run_config import RunConfig
from halluc.objectives.grpo_settings import GroupSampling, RewardSettings

log = logging.getLogger("grpo")


@dataclass
class Config(RunConfig):  # the shared settings (output, model, lab chain, layout, launcher): halluc.pipeline.run_config
    output_dir: str = "runs/grpo"          # checkpoint/, tb/, train.json, eval.json, config.yaml
    model: str | None = None               # the policy to start from; None = the lab's model named by `start`
    start: Literal["sft", "base"] = "sft"  # without model=: the lab's SFT model, or its base with a BT token
                                           # added (semantic init) and no SFT (N-MARS's "GRPO from the base")
    ref_model: str | None = None           # the KL reference; None = the starting model
    steps: NonNegativeInt = 200            # optimisation steps; 0 = evaluate the starting model only
    batch_size: PositiveInt = 4            # prompts per process and step (each with rollout.group completions)
    lr: NonNegativeFloat = 2e-5
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"  # per-sequence mean | token mean | / (G x max length)
    beta: NonNegativeFloat = 0.04          # KL weight (k3 estimator); 0 = no reference forward
    eps_low: NonNegativeFloat = 0.2        # clip range of the importance ratio: [1 - eps_low, 1 + eps_high]
    eps_high: NonNegativeFloat = 0.2       # (DAPO's clip-higher: 0.28)
    semantics: Literal["auto", "keep", "rewind"] = "auto"  # auto: what the policy was trained for
    rollout: GroupSampling = field(default_factory=GroupSampling)
    reward: RewardSettings = field(default_factory=RewardSettings)

    def check(self) -> None:
        check_run_rules(self, ("model", "ref_model"))
        if self.start == "base" and self.model:
            raise ValueError(f"start=base starts from the lab base, model={self.model} names another policy: drop one")
        if self.lab.task != "arith" and not self.lab.train_file:
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (the problems to sample)")
        if self.reward.step_weight and self.reward.process == "oracle" and self.lab.task == "jsonl":
            raise ValueError("reward.step_weight: the jsonl task's verifier checks no step (every step is unchecked), "
                             "so the oracle's process reward would be 0 for every completion; drop it, or score "
                             "steps with a learned verifier (reward.process=prm|head reward.process_model=DIR)")
        if self.reward.process_model:
            try:
                check_model_path(self.reward.process_model, "reward.process_model")
            except FileNotFoundError as e:
                raise ValueError(str(e)) from None
        if self.rollout.group < 2:
            raise ValueError("rollout.group must be at least 2: advantages are relative to the group")
        if self.rollout.iterations > 1 and self.save_steps % self.rollout.iterations:
            raise ValueError(f"save_steps={self.save_steps} must be a multiple of rollout.iterations="
                             f"{self.rollout.iterations}: a run resumed inside a group would sample afresh")


def train(cfg: Config) -> dict | None:
    import time

    from transformers import set_seed

    from halluc.core.distributed import is_main
    from halluc.inference.generate import semantics_for
    from halluc.objectives.dpo import disable_dropout, load_reference
    from halluc.objectives.grpo import SEMANTICS_LAYOUT
    from halluc.pipeline.sft import starting_policy
    from halluc.pipeline.stages import RunSettings, evaluate_on_main, finish_run, open_run, train_history, train_stage
    from halluc.objectives.verifier_head import step_end_ids
    from halluc.sources.rollouts import GRPOObjective, load_process_verifier
    from halluc.core.tokens import backtrack_id
    from halluc.training.checkpoint import record_training, save_stage
    from halluc.training.lora import apply_lora, base_identity

    out, task, splits, tests, t0 = open_run(cfg)
    run = RunSettings.of(cfg)
    start, tokenizer, model, before = starting_policy(cfg, task, tests, "GRPO", cfg.start, splits)
    semantics = semantics_for(model, None if cfg.semantics == "auto" else cfg.semantics, has_backtrack=True)
    attention, positions = SEMANTICS_LAYOUT[semantics]
    record_training(model, recipe="grpo", attention=attention, positions=positions, seed=cfg.seed,
                    loss=cfg.loss_type)
    disable_dropout(model)
    # the KL reference: ref_model, else the starting model; under LoRA without ref_model, the policy with
    # its adapter disabled (no copy)
    live_reference = cfg.beta and cfg.steps and (cfg.ref_model or not cfg.lora.enabled)
    reference = load_reference(cfg.ref_model or start, tokenizer) if live_reference else None
    if reference is not None:
        disable_dropout(reference)
    identity = base_identity(model, start) if cfg.lora.enabled else None
    if cfg.lora.enabled:
        set_seed(cfg.seed + 1)  # the adapter's init must not depend on what the lab chain drew before (cached or not)
        model = apply_lora(model, cfg.lora, backtrack_id(tokenizer))
        disable_dropout(model)

    problems = splits["sft"]
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    # a prompt with its longest completion must fit the model's positions (a learned position table, e.g.
    # GPT-2's, would be indexed past its end): the others are not sampled, and the log says how many
    limit = getattr(model.config, "max_position_embeddings", None) or float("inf")
    usable = [i for i, ids in enumerate(prompts) if len(ids) + cfg.rollout.max_new_tokens <= limit]
    if not usable:
        raise SystemExit(f"no SFT problem fits the model's {limit} positions with rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens}: lower rollout.max_new_tokens")
    if len(usable) < len(prompts):
        log.warning("%d of %d SFT problems are longer than the model's %d positions minus rollout.max_new_tokens=%d: "
                    "not sampled", len(prompts) - len(usable), len(prompts), limit, cfg.rollout.max_new_tokens)
    t1 = time.perf_counter()
    trainer = None
    if cfg.steps:
        objective = GRPOObjective(problems, task, tokenizer, prompts, sampling=cfg.rollout, rewards=cfg.reward,
                                  semantics=semantics, loss_type=cfg.loss_type, beta=cfg.beta, eps_low=cfg.eps_low,
                                  eps_high=cfg.eps_high, reference=reference, seed=cfg.seed,
                                  process_verifier=load_process_verifier(cfg.reward, tokenizer),
                                  step_ends=frozenset(step_end_ids(tokenizer, getattr(task, "STEP_SEPARATOR", "\n"))))
        trainer = train_stage(model, [{"problem": i} for i in usable],
                              Stage(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr), str(out), run,
                              objective=objective, tokenizer=tokenizer, adapter_info=identity)
        if is_main():
            (out / "train.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        saved = out / ("adapter" if cfg.lora.enabled else "checkpoint")
        model = save_stage(trainer, model, tokenizer, saved, cfg.deepspeed, identity)
    else:
        saved = start
    t_rl = time.perf_counter() - t1
    after = evaluate_on_main(model, tokenizer, tests, task, cfg.eval_max_new_tokens, "grpo") if cfg.steps else before
    if not is_main():
        return None
    report = {"config": as_dict(cfg), "start": str(start), "semantics": semantics, "before": before or {},
              "after": after or {}, "saved": str(saved), "grpo_train": train_history(trainer) if trainer else None,
              "seconds": {"grpo": round(t_rl, 1), "total": round(time.perf_counter() - t0, 1)}}
    finish_run(out, cfg, report, trainer.state.global_step if trainer else 0, "grpo" if cfg.steps else "start (steps=0)",
               saved=("adapter" if cfg.lora.enabled else "checkpoint", saved), before_label="start",
               tags=("start", "grpo"))
    return report


load, main = recipe_entry(Config, train, __file__)  # configs/grpo.yaml, --config FILE, key=value

if __name__ == "__main__":
    run_cli(main)
