"""Techniques 7 and 10: a process reward model (or the policy's verifier head) that decides when to backtrack.

    python recipes/prm.py                                   # the lab: step labels, a PRM, PRM-guided decoding
    python recipes/prm.py verifier=head                     # the policy's own head (masked SFT + head, cached)
    python recipes/prm.py decode=best_of_n n=4              # the baselines: best-of-N, weighted voting (vote)
    python recipes/prm.py verifier=oracle                   # the task's verifier guides: the skyline
    python recipes/prm.py model=DIR data=train.jsonl test_data=test.jsonl lab.task=gsm8k lab.test_file=...
    torchrun --nproc_per_node 2 recipes/prm.py deepspeed=ds_configs/zero3.json ;  sbatch slurm/prm.sh
(docs/verifiers.md: labels, the two verifiers, guided decoding, scores.)

Steps: (1) the policy: model=DIR, or the lab's masked SFT model (with a verifier head when
verifier=head), trained once and cached; its plain greedy evaluation is `before`; (2) step labels
(halluc.sources.step_labels): data=FILE.jsonl|DIR in TRL's stepwise format, or made here from the lab:
references, references with one synthetic wrong step, and the policy's own samples, labelled by the
task verifier (labels=rollouts: by Math-Shepherd rollouts instead), with a held-out set from the test
problems (cached); (3) the PRM (verifier=prm): prm=DIR, or a token-classification model started
from prm_base (default: the policy) and trained with the shared trainer, saved as a plain HF folder
(cached); (4) ProcessBench scores of the verifier on the held-out rows; (5) the policy decodes the
test problems: greedy, guided by the verifier, best-of-N or weighted voting; eval.json, eval.md.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from halluc.core.config import (Fraction, HEAD_WEIGHTS, LoraSettings, NonNegativeFloat, NonNegativeInt, PositiveInt,
                           as_dict, check_run_rules, has_head, recipe_entry)
from halluc.core.distributed import zero_stage
from halluc.pipeline.run_config import RunConfig
from halluc.core.inputs import check_input_file, run_cli

log = logging.getLogger("prm")


@dataclass
class StepData:
    """The labelled solutions made from the lab when no data= is given."""

    problems: PositiveInt = 2000          # SFT-split problems: reference + wrong-step copies + own samples
    wrong_steps: NonNegativeInt = 2       # reference copies with one synthetic wrong step, per problem
    samples: NonNegativeInt = 2           # the policy's own solutions per problem
    temperature: NonNegativeFloat = 0.8   # ... sampled at this temperature
    labels: Literal["verifier", "rollouts"] = "verifier"  # rollouts: Math-Shepherd hard labels
    rollouts: PositiveInt = 4             # continuations per step prefix (labels=rollouts, agreement)
    agreement: NonNegativeInt = 100       # solutions whose verifier and rollout labels are compared
    test_problems: PositiveInt = 500      # held-out problems (test_id) for the ProcessBench scores


@dataclass
class Config(RunConfig):  # the shared settings (output, model, lab chain, layout, launcher): halluc.pipeline.run_config
    # eval.json, eval.md, config.yaml; prm/ and data/: links to the PRM and the labelled solutions, which are
    # built once per settings under cache_dir (prm-*, steps-*) and shared by the runs that use them
    output_dir: str = "runs/prm"
    model: str | None = None              # the policy; None = the lab's masked SFT model
    max_len: PositiveInt = 256            # labelled solutions longer than this are dropped
    lora: LoraSettings = field(default_factory=LoraSettings)  # the PRM: adapters + its new head, merged at the end
    verifier: Literal["prm", "head", "oracle", "none"] = "prm"  # what judges steps; head: the policy's own
    decode: Literal["greedy", "guided", "best_of_n", "vote"] = "guided"  # vote with verifier=none: majority
    prm: str | None = None                # a trained PRM folder (skips training)
    prm_base: str | None = None           # the checkpoint a new PRM starts from; None = the policy
    data: str | None = None               # stepwise training rows (.jsonl or datasets folder); None = made here
    test_data: str | None = None          # held-out stepwise rows (ProcessBench scores); None = made here
    steps: NonNegativeInt = 400           # PRM training steps
    batch_size: PositiveInt = 32          # labelled solutions per process and step
    lr: NonNegativeFloat = 1e-3
    head_weight: NonNegativeFloat = 1.0   # verifier=head with the lab model: the head's loss weight in SFT
    # guided: a step scored below this is erased and rewritten; None: the threshold with the best ProcessBench
    # F1 on half the held-out rows (the other half is scored), or 0.5 for the oracle (its scores are 0 or 1)
    threshold: Fraction | None = None
    budget: NonNegativeInt = 4            # guided: verifier-triggered BT runs per solution
    resample: Literal["ban", "sample"] = "sample"  # guided: how the erased step is rewritten (ban: greedy, cannot repair an operand)
    resample_temperature: NonNegativeFloat = 1.0  # guided, resample=sample
    # guided: rewind (the erased step leaves the KV cache; the policy rewrites it from the clean prefix)
    # or keep (the policy sees its erased step and the BTs, as in causal SFT data); the policy's own
    # BTs keep the semantics it was trained for
    erase: Literal["rewind", "keep"] = "rewind"
    n: PositiveInt = 4                    # best_of_n / vote: samples per problem
    temperature: NonNegativeFloat = 0.8   # best_of_n / vote: their temperature
    step_data: StepData = field(default_factory=StepData)

    def check(self) -> None:
        check_run_rules(self, ("model", "prm", "prm_base"))
        if self.layout.pack:
            raise ValueError("layout.pack: the PRM trains one labelled solution per row (and the lab's SFT model "
                             "is trained unpacked); drop layout.pack")
        if self.verifier == "none" and self.decode not in ("greedy", "vote"):
            raise ValueError(f"decode={self.decode} needs a verifier (prm, head or oracle); without one, "
                             "decode=vote is plain majority voting")
        if self.lab.task != "arith" and not self.lab.train_file and not self.model:
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (or model=DIR)")
        if self.lab.task != "arith" and not self.lab.test_file:
            raise ValueError(f"lab.task={self.lab.task} needs lab.test_file: the problems decoded and scored")
        if self.lora.enabled and zero_stage(self.deepspeed) == 3:
            raise ValueError("the PRM merges its LoRA adapter at the end: use ZeRO-2 or no DeepSpeed with lora.enabled")
        if self.verifier == "head" and self.model and not has_head(self.model):
            raise ValueError(f"verifier=head: model={self.model} has no verifier head ({HEAD_WEIGHTS}); train one "
                             "with recipes/masked_sft.py verifier_head_weight=0.5, or drop model= to use the lab's")
        if self.verifier == "head" and not self.model and not self.head_weight:
            raise ValueError("verifier=head with the lab model needs head_weight > 0 (the head's loss weight in SFT)")
        if self.decode == "guided" and self.resample == "sample" and not self.resample_temperature:
            raise ValueError("resample=sample needs resample_temperature > 0 (0 is greedy: use resample=ban)")
        for name in ("data", "test_data"):
            if getattr(self, name) and not Path(getattr(self, name)).is_dir():
                check_input_file(getattr(self, name), name)  # a .jsonl file (a datasets folder is read as it is)


def train(cfg: Config) -> dict | None:
    from halluc.core.distributed import is_main, local_device, world_size
    from halluc.inference.evaluate import evaluate_best_of_n, evaluate_problems
    from halluc.inference.generate import Guide, Sampling
    from halluc.core.model import load_causal_lm
    from halluc.pipeline.prm_stages import step_rows, train_prm
    from halluc.core.tokens import check_same_vocab
    from halluc.pipeline.sft import cached_evaluation, lab_sft_model
    from halluc.pipeline.stages import evaluate_on_main, finish_run, open_run
    from halluc.core.tokens import load_tokenizer
    from halluc.objectives.verifier_head import load_head
    from halluc.inference.verifiers import make_verifier, process_bench

    from halluc.objectives.prm import read_stepwise

    for name in ("data", "test_data"):  # every row, before the lab's models train or any model loads
        if getattr(cfg, name):
            read_stepwise(getattr(cfg, name))
    out, task, splits, tests, t0 = open_run(cfg)

    # (1) the policy, and the plain greedy decoding every arm is compared with
    if cfg.model:
        policy_dir = labeller_dir = cfg.model
    else:
        policy_dir = lab_sft_model(cfg)  # the plain masked SFT model: the shared baseline
        labeller_dir = policy_dir  # its samples are the labelled data of every arm (one PRM, one held-out set)
        if cfg.verifier == "head":
            policy_dir = lab_sft_model(cfg, {"verifier_head_weight": cfg.head_weight})
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir)
    if cfg.verifier == "head":
        load_head(policy_dir, policy)
    plain = policy if labeller_dir == policy_dir else load_causal_lm(labeller_dir)
    if cfg.model:
        before = evaluate_on_main(plain, tokenizer, tests, task, cfg.eval_max_new_tokens, "policy")
    else:  # shared by every arm, kept beside the cached SFT model (keyed by the scoring code too)
        before = cached_evaluation(plain, tokenizer, labeller_dir, tests, task, cfg.eval_max_new_tokens, "policy")

    # (2) step labels, (3) the PRM: made on rank 0 (the PRM trains on every rank)
    train_rows, test_rows, data_stats = [], [], {}
    if cfg.verifier in ("prm", "head"):
        train_rows, test_rows, data_stats = step_rows(cfg, plain, tokenizer, task, splits)  # the labeller
    prm_dir, prm_train = cfg.prm, None
    if cfg.prm:
        check_same_vocab("prm", cfg.prm, tokenizer)
    if cfg.verifier == "prm" and not cfg.prm:
        prm_dir, prm_train = train_prm(cfg, policy, policy_dir, tokenizer, train_rows)
    if not is_main():
        return None
    for name, made in (("prm", prm_dir if prm_train else None), ("data", data_stats.get("folder"))):
        if made:  # output_dir shows what the run used, where the cache keeps it
            link = out / name
            link.unlink(missing_ok=True)
            link.symlink_to(Path(made).resolve(), target_is_directory=True)

    # (4) ProcessBench scores of the verifier on the held-out rows
    from halluc.objectives.prm import load_prm

    policy.to(local_device())
    prm = load_prm(prm_dir).eval().to(local_device()) if prm_dir else None

    def verifier_for(problems):  # halluc.inference.verifiers: the same object guides, ranks samples and is scored
        return make_verifier(cfg.verifier, policy=policy, tokenizer=tokenizer, task=task, problems=problems, prm=prm,
                             prm_tokenizer=load_tokenizer(prm_dir) if prm_dir else None)

    bench, threshold = None, cfg.threshold if cfg.threshold is not None else 0.5
    if cfg.verifier in ("prm", "head"):
        bench = process_bench(verifier_for([]), test_rows, tokenizer, cfg.threshold)
    if bench:
        threshold = bench["all"]["threshold"]  # calibrated on held-out rows unless set
        log.info("ProcessBench-style scores of the %s on %d held-out solutions: %s", cfg.verifier, len(test_rows),
                 json.dumps(bench["all"]))

    def equal_scores(prompt_ids, steps):  # verifier=none, decode=vote: every sample counts 1 (self-consistency)
        return [[1.0] * max(len(s), 1) for s in steps]

    # (5) decode the test problems
    t1 = time.perf_counter()
    guide = Guide(threshold, cfg.budget, cfg.resample, cfg.resample_temperature, cfg.erase)
    after = {}
    for name, problems in tests.items():
        desc = f"eval {cfg.decode} {cfg.verifier} {name}"
        if cfg.decode in ("best_of_n", "vote"):
            scores = verifier_for(problems).solution_scores if cfg.verifier != "none" else equal_scores
            after[name] = evaluate_best_of_n(policy, tokenizer, problems, task, scores,
                                             cfg.n, "best" if cfg.decode == "best_of_n" else "vote",
                                             Sampling(cfg.temperature, 1.0, cfg.seed), cfg.eval_max_new_tokens,
                                             desc=desc)
        else:
            after[name] = evaluate_problems(policy, tokenizer, problems, task, cfg.eval_max_new_tokens, desc=desc,
                                            verifier=verifier_for(problems) if cfg.decode == "guided" else None,
                                            guide=guide)
    t_decode = time.perf_counter() - t1

    report = {"config": as_dict(cfg), "policy": str(policy_dir), "prm": prm_dir, "step_data": data_stats,
              "process_bench": bench, "prm_train": prm_train, "before": before or {}, "after": after,
              "world_size": world_size(),
              "seconds": {"decode": round(t_decode, 1), "total": round(time.perf_counter() - t0, 1)}}
    label = f"{cfg.decode} ({cfg.verifier})" if cfg.verifier != "none" else cfg.decode  # greedy | vote (majority)
    finish_run(out, cfg, report, cfg.steps, label, saved=("PRM", prm_dir) if prm_dir else None,
               before_label="policy, plain decoding", tags=("policy", "decoded"))
    return report


load, main = recipe_entry(Config, train, __file__)  # configs/prm.yaml, --config FILE, key=value

if __name__ == "__main__":
    run_cli(main)
