"""Technique 5: the model's own mistakes as training data, round after round.

    python recipes/self_correct.py                                  # the lab: 1 round from the lab base
    python recipes/self_correct.py rounds=3 sampler.k=4 mix.own=0.5 mix.clean=0.5
    python recipes/self_correct.py model=runs/masked_sft/checkpoint rounds=2   # start from a trained model
    python recipes/self_correct.py lab.task=gsm8k lab.train_file=... lab.test_file=... model=DIR
    python recipes/self_correct.py resume=true ...                  # after a kill: the round it was in

Each round (halluc/sources/own_errors.py):
1. sample `sampler.k` solutions for `sampler.problems` SFT problems from the current model;
2. judge them with the task's step verifier and cut each wrong one at its first wrong step;
3. correct it, preferably with the model's own resample from the same prefix that verifies,
   else with the reference; build an example (prefix, the wrong step's divergent tail as ERROR,
   BTs, correction, rest) and a preference pair from the model's own token ids;
4. train one SFT stage on a mix (`mix.own` of the model's error examples, `mix.synthetic` of
   synthetic-error examples, `mix.clean` of clean ones, as fractions of `round_examples`),
   masked as in technique 1, then evaluate; the next round samples from the new model.
`OUT/round-N/` holds the round's data (`data/sft`, `data/pairs`, `data/stats.json`), its
checkpoint and evaluation; a killed run resumes at the round it was in (resume=true).
`mix.own=0` trains on synthetic errors only (masked SFT through the same code). `error_source=mcts`
makes the own share from MCTS traces instead (technique 8, halluc/sources/mcts.py, docs/mcts.md): a search
of the current model on the sampler's problems, valued by the task's step verifier. `error_source=aligned`
locates the errors of the model's wrong samples by aligning them to the references instead of judging
their steps (halluc/sources/aligned_errors.py, N-MARS): no step verifier needed, so GSM8K and jsonl tasks
give own errors where the judge cannot place them. With
`curriculum.phases` (technique 3, halluc/pipeline/curriculum.py) a round trains its phases in order
instead of one mix: error length, sites, rate, difficulty and source (synthetic, then own).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from halluc.core.config import (Fraction, LoraSettings, PositiveInt, Sampler, Stage, as_dict,
                           check_run_rules, recipe_entry)
from halluc.pipeline.curriculum import Curriculum
from halluc.pipeline.run_config import RunConfig
from halluc.sources.aligned_errors import AlignSettings
from halluc.sources.mcts import SearchConfig, TraceData
from halluc.core.inputs import run_cli

log = logging.getLogger("self_correct")


@dataclass
class Mix:
    own: Fraction = 0.5                # examples built from the model's own errors
    synthetic: Fraction = 0.0          # examples with synthetic errors (errors.*)
    clean: Fraction = 0.5              # clean examples

    def check(self) -> None:
        total = self.own + self.synthetic + self.clean
        if not 0 < total <= 1 + 1e-9:
            raise ValueError(f"mix.own + mix.synthetic + mix.clean = {total:g}: must be in (0, 1]")


@dataclass
class Config(RunConfig):  # the shared settings (output, model, lab chain, layout, launcher): halluc.pipeline.run_config
    output_dir: str = "runs/self_correct"  # round-N/ (data, checkpoint, eval), tb/, eval.json, config.yaml
    model: str | None = None               # a local HF causal-LM folder to start from; None = tiny lab base
    sft: Stage = field(default_factory=lambda: Stage(steps=600, batch_size=32, lr=1e-3))  # per round
    lora: LoraSettings = field(default_factory=LoraSettings)  # not for rounds: each round samples a full model
    resume: bool = False                   # continue at the round (and checkpoint-N) a killed run was in
    rounds: PositiveInt = 1
    round_examples: PositiveInt = 10000    # training examples per round (the mix's fractions of it)
    sampler: Sampler = field(default_factory=Sampler)
    # what makes the mix's "own" share: the model's sampled errors (technique 5) or the traces of a
    # step-level MCTS of the model (technique 8) on sampler.problems problems
    # or the model's samples aligned to the references (N-MARS: no step verifier, any task with references)
    error_source: Literal["own", "mcts", "aligned"] = "own"
    align: AlignSettings = field(default_factory=AlignSettings)  # error_source=aligned
    mcts: SearchConfig = field(default_factory=SearchConfig)     # error_source=mcts: the search
    mcts_data: TraceData = field(default_factory=TraceData)      # ... and its traces
    mix: Mix = field(default_factory=Mix)  # without a curriculum: what one round trains on
    curriculum: Curriculum = field(default_factory=Curriculum)  # technique 3: the round's data in phases
    masked: bool = True                    # False: train on the error tokens too (ablation)
    bt_init: Literal["semantic", "mean", "random"] = "semantic"
    overlong: Literal["drop", "truncate"] = "drop"
    reinit_bt: bool = False

    def uses_own_errors(self) -> bool:
        """Whether a round trains on an own share (mix.own, or a curriculum phase with source own)."""
        phases = self.curriculum.phases
        return any(p.source == "own" for p in phases) if phases else self.mix.own > 0

    def check(self) -> None:
        check_run_rules(self, ())
        if self.lora.enabled:
            raise ValueError("lora.enabled: each round samples from the full model it trained; merge adapters "
                             "between rounds is not supported here (train with masked_sft for LoRA)")
        if self.lab.task != "arith" and not self.lab.train_file:
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (the problems to sample)")
        if self.error_source != "own" and not self.uses_own_errors():
            raise ValueError(f"error_source={self.error_source} makes the own share of the mix: set mix.own > 0 (or a phase with "
                             "source: own), else no search runs")


def train(cfg: Config) -> dict | None:
    # The ML libraries load here, after every setting was checked.
    import json

    from halluc.training.checkpoint import save_stage
    from halluc.pipeline.curriculum import phase_datasets, train_phases
    from halluc.core.distributed import is_main
    from halluc.core.model import load_causal_lm
    from halluc.pipeline.rounds import log_round, own_examples, round_mix
    from halluc.pipeline.stages import (RunSettings, add_backtrack, base_and_evaluation, evaluate_on_main, finish_run,
                               open_run, train_history, train_stage)

    out, task, splits, tests, t0 = open_run(cfg)
    run = RunSettings.of(cfg)
    model, tokenizer, base_path, before = base_and_evaluation(cfg, run, splits, tests, task)
    model, bt_id, used, _ = add_backtrack(model, tokenizer, cfg, "self_correct", base_path)

    rounds, trainer, after = [], None, before
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        if (rdir / "round.json").exists():  # finished before a kill: continue from its model
            log.info("round %d finished already: continuing from %s", r, rdir / "checkpoint")
            rounds.append(json.loads((rdir / "round.json").read_text()))
            model, after = load_causal_lm(str(rdir / "checkpoint")), rounds[-1]["eval"]
            continue
        t_round = time.perf_counter()
        cur = cfg.curriculum
        # with a competence-based curriculum the last probe_size SFT problems are its held-out probe
        pool = splits["sft"][:len(splits["sft"]) - cur.probe_size] if cur.phases else splits["sft"]
        own, stats = own_examples(cfg, r, rdir / "data", model, tokenizer, task, pool, bt_id)
        if cur.phases:  # technique 3: the round's data in phases, easy to hard (or shuffled: the control)
            datasets, counts = phase_datasets(cur, pool, tokenizer, bt_id, cfg.errors, examples=cfg.round_examples,
                                              masked=cfg.masked, max_len=cfg.max_len, overlong=cfg.overlong,
                                              seed=cfg.seed * 1_000 + r, num_proc=cfg.num_proc, own_rows=own)
            trainer = train_phases(model, datasets, cur, counts, rdir, run, cfg.sft, tokenizer,
                                   probe=(splits["sft"][len(pool):], task, cfg.eval_max_new_tokens))
        else:
            data, counts = round_mix(cfg, r, own, pool, tokenizer, bt_id)
            trainer = train_stage(model, data, cfg.sft, str(rdir), run, tokenizer=tokenizer)
        model = save_stage(trainer, model, tokenizer, rdir / "checkpoint", cfg.deepspeed)
        if model is None:  # DeepSpeed, rank > 0: the next round samples and trains on every rank too
            model = load_causal_lm(str(rdir / "checkpoint"))
        after = evaluate_on_main(model, tokenizer, tests, task, cfg.eval_max_new_tokens, f"round {r}")
        if is_main():
            summary = {"round": r, "stats": stats, "mix": counts, "eval": after, "train": train_history(trainer),
                       "seconds": round(time.perf_counter() - t_round, 1)}
            (rdir / "round.json").write_text(json.dumps(summary, indent=1))
            log_round(out / "tb", summary)
            rounds.append(summary)
            recall = after["test_id"]["bt_recall"]
            log.info("round %d: %s; ID answer acc %.1f%%, BT recall %s", r, counts, 100 * after["test_id"]["answer_acc"],
                     "n/a (no error to catch)" if recall is None else f"{100 * recall:.1f}%")
    if not is_main():
        return None
    report = {"config": as_dict(cfg), "backtrack_id": bt_id, "bt_init_words": used, "before": before,
              "after": after, "saved": str(out / f"round-{cfg.rounds}" / "checkpoint"),
              "rounds": [{k: v for k, v in x.items() if k != "eval"} for x in rounds],
              "sft_train": rounds[-1]["train"] if rounds else None,
              "seconds": {"total": round(time.perf_counter() - t0, 1)}}
    finish_run(out, cfg, report, cfg.rounds, f"after {cfg.rounds} round(s)", saved=("checkpoint", report["saved"]))
    return report


load, main = recipe_entry(Config, train, __file__)  # configs/self_correct.yaml, --config FILE, key=value

if __name__ == "__main__":
    run_cli(main)
