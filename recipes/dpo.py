"""Technique 6: token-level preference training, backtrack + correction over continuing an error.

    python recipes/dpo.py                          # the lab: masked SFT (cached), its own errors as pairs, DPO
    python recipes/dpo.py loss=tdpo2 beta=0.1 alpha=0.5
    python recipes/dpo.py model=runs/masked_sft/checkpoint data=runs/self_correct/round-1/data/pairs
    python recipes/dpo.py model=DIR ref_model=DIR data=pairs.jsonl loss=sigmoid beta=0.1 lr=0 steps=1 batch_size=8
    deepspeed --num_gpus 8 recipes/dpo.py model=DIR data=DIR deepspeed=ds_configs/zero3.json
    torchrun --nproc_per_node 2 recipes/dpo.py lora.enabled=true ...  ;  sbatch slurm/dpo.sh
(docs/dpo.md: losses, data format, reference model, packing, scale.)

Steps: (1) the policy to start from: model=DIR, or the lab's masked SFT model (the lab base +
technique 1, trained once and cached like the base); (2) the pairs: data=FILE.jsonl|DIR, or the
policy's own errors sampled and judged here (technique 5's round, cached): prompt = question +
right steps + the wrong step, chosen = BTs + correction + rest, rejected = the model's own
continuation (`pairs.step` and `pairs.balanced` add Step-DPO pairs and "after a right step, go
on" pairs from the same samples: halluc/sources/pair_forms.py); (3) the reference: ref_model=DIR,
else the starting model (under LoRA: the adapter disabled); (4) `steps` of the preference loss on
pairs laid out with the prompt once (packed with layout.pack=N); (5) evaluate, write checkpoint (or
adapter), train.json (the log history), eval.json.
steps=0 evaluates the starting model only (the baseline arm of a sweep).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from halluc.core.config import (PREFERENCE_KINDS, NonNegativeFloat, NonNegativeInt, PositiveInt, Range, Sampler, Stage,
                           as_dict, check_run_rules, recipe_entry)
from halluc.pipeline.run_config import RunConfig
from halluc.sources.pair_forms import PairWeights
from halluc.core.inputs import check_input_file, run_cli

log = logging.getLogger("dpo")
Beta = Annotated[float, Range(1e-6)]  # > 0: IPO divides by it


@dataclass
class Config(RunConfig):  # the shared settings (output, model, lab chain, layout, launcher): halluc.pipeline.run_config
    output_dir: str = "runs/dpo"          # checkpoint/ (or adapter/), tb/, train.json, eval.json, config.yaml
    model: str | None = None              # the policy to start from; None = the lab's masked SFT model
    max_len: PositiveInt = 512            # prompt + chosen + rejected; longer pairs are dropped
    ref_model: str | None = None          # the reference; None = the starting model (LoRA: adapter disabled)
    data: str | None = None               # pairs: .jsonl (prompt/chosen/rejected text) or a datasets folder; None = own errors
    loss: Literal["sigmoid", "ipo", "tdpo1", "tdpo2", "sft"] = "sigmoid"  # sft: the chosen side alone (control)
    beta: Beta = 0.1
    alpha: NonNegativeFloat = 0.5         # tdpo2: weight of the sequential-KL difference
    sft_weight: NonNegativeFloat = 0.0    # + this x the NLL of the chosen completions (TRL's "sft" loss)
    steps: NonNegativeInt = 300           # preference steps; 0 = evaluate the starting model only
    batch_size: PositiveInt = 16          # pairs (or packed rows) per process and step
    lr: NonNegativeFloat = 2e-4
    precompute_ref: bool = False          # sigmoid/ipo: reference log-probs once, cached (no live reference)
    sampler: Sampler = field(default_factory=lambda: Sampler(problems=2500, per_problem=2))
    # the pair forms trained on, per BT pair (halluc/sources/pair_forms.py): bt (BTs + correction over the
    # continued error), step (Step-DPO: right step over wrong step), balanced (after a right step: go on)
    pairs: PairWeights = field(default_factory=PairWeights)

    def check(self) -> None:
        check_run_rules(self, ("model", "ref_model"))
        if self.layout.backend == "native":
            raise ValueError("layout.backend=native runs one causal example per row: DPO lays a pair out with its "
                             "prompt once (an edit tree); use auto or an edit-tree backend")
        if self.precompute_ref and PREFERENCE_KINDS[self.loss].token_kl:
            raise ValueError(f"loss={self.loss} needs the reference's whole distribution at every token: "
                             "precompute_ref=true only stores log-prob sums (sigmoid, ipo)")
        if self.lab.task != "arith" and not self.lab.train_file and not (self.model and self.data):
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (problems to sample errors from), "
                             "or model=DIR with data=pairs")
        for name in ("model", "ref_model"):
            if getattr(self, name) and (Path(getattr(self, name)) / "halluc_adapter.json").exists():
                raise ValueError(f"{name}={getattr(self, name)} is a LoRA adapter: merge it first "
                                 "(tools/merge_adapter.py) and give the merged folder")
        if self.data and not Path(self.data).is_dir():
            check_input_file(self.data, "data")  # a .jsonl file (a datasets folder is read as it is)


def train(cfg: Config) -> dict | None:
    from halluc.structure.backends import choose_backend
    from halluc.training.checkpoint import record_training, save_stage
    from halluc.core.distributed import is_main, local_device, world_size
    from halluc.objectives.dpo import (PreferenceObjective, check_reference_tokenizer, disable_dropout, load_reference,
                            precomputed_reference)
    from collections import Counter

    from transformers import set_seed

    from halluc.sources.own_errors import own_pairs
    from halluc.sources.pair_forms import select_forms
    from halluc.training.lora import apply_lora, base_identity
    from halluc.structure.pairs import check_pairs_file, load_pairs, pair_rows
    from halluc.pipeline.sft import starting_policy
    from halluc.pipeline.stages import RunSettings, evaluate_on_main, finish_run, open_run, train_history, train_stage
    from halluc.core.tokens import backtrack_id

    if cfg.data:
        check_pairs_file(cfg.data)  # every row, before the lab's SFT model trains or any model loads
    out, task, splits, tests, t0 = open_run(cfg)  # gsm8k/jsonl without lab.train_file: the test split only
    run = RunSettings.of(cfg)

    # (1) the policy to start from, and its evaluation
    start, tokenizer, model, before = starting_policy(cfg, task, tests, "preference training")
    bt_id = backtrack_id(tokenizer)
    if cfg.ref_model:
        check_reference_tokenizer(cfg.ref_model, tokenizer)
    t_start = time.perf_counter() - t0

    # (2) the pairs
    pairs_from = cfg.data or own_pairs(cfg, start, model, tokenizer, task, splits["sft"], bt_id)
    pairs = select_forms(load_pairs(pairs_from, tokenizer, bt_id), as_dict(cfg.pairs), cfg.seed)
    forms = dict(Counter(p.get("form", "bt") for p in pairs))
    log.info("training on %d pairs: %s (pairs.* settings)", len(pairs), ", ".join(f"{n} {f}" for f, n in forms.items()))
    # a pair's positions run to its prompt + longer branch: keep the whole unit within the model's
    # positions (a model with learned positions, e.g. GPT-2, would index past its table)
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.max_len
    capped = f"the model's {limit} positions (max_len={cfg.max_len} is more)" if limit < cfg.max_len else None
    rows = pair_rows(pairs, cfg.layout.attention, cfg.layout.positions, min(cfg.max_len, limit), cfg.layout.pack,
                     limit=capped)

    # (3) the reference: never reloaded from the policy's name (the BT row would be missing). Under
    # LoRA with no ref_model it is the policy with its adapter off: the starting model.
    record_training(model, recipe="dpo", attention=cfg.layout.attention, positions=cfg.layout.positions,
                    backtrack_token_id=bt_id, loss=cfg.loss, seed=cfg.seed)
    disable_dropout(model)
    reference = None
    against_reference = bool(cfg.steps) and PREFERENCE_KINDS[cfg.loss].reference
    if against_reference and cfg.precompute_ref:
        source = load_reference(cfg.ref_model, tokenizer) if cfg.ref_model else model  # before any adapter
        disable_dropout(source)
        device = local_device()
        rows = precomputed_reference(source, rows, choose_backend(device) if cfg.layout.backend == "auto" else cfg.layout.backend,
                                     cfg.cache_dir, device=device)
    elif against_reference and (cfg.ref_model or not cfg.lora.enabled):
        reference = load_reference(cfg.ref_model or start, tokenizer)
        disable_dropout(reference)
    identity = base_identity(model, start) if cfg.lora.enabled else None
    if cfg.lora.enabled:
        set_seed(cfg.seed + 1)  # the adapter's init must not depend on what the lab chain drew before (cached or not)
        model = apply_lora(model, cfg.lora, bt_id)
        disable_dropout(model)

    # (4) preference training
    t1 = time.perf_counter()
    trainer = None
    if cfg.steps:
        objective = PreferenceObjective(cfg.loss, cfg.beta, cfg.alpha, cfg.sft_weight, reference)
        trainer = train_stage(model, rows, Stage(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr), str(out),
                              run, objective=objective, tokenizer=tokenizer,
                              adapter_info=identity)  # the objective brings its collator (pairs, laid out)
        if is_main():
            (out / "train.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        saved = out / ("adapter" if cfg.lora.enabled else "checkpoint")
        model = save_stage(trainer, model, tokenizer, saved, cfg.deepspeed, identity)
    else:
        saved = Path(start)
    t_dpo = time.perf_counter() - t1

    # (5) evaluate, report
    after = evaluate_on_main(model, tokenizer, tests, task, cfg.eval_max_new_tokens, cfg.loss) if cfg.steps else before
    if not is_main():
        return None
    report = {"config": as_dict(cfg), "backtrack_id": bt_id, "start": str(start), "pairs": len(pairs), "pair_forms": forms,
              "pairs_from": str(pairs_from), "rows": len(rows), "before": before or {}, "after": after or {},
              "saved": str(saved), "world_size": world_size(),
              "dpo_train": train_history(trainer) if trainer else None,
              "seconds": {"start": round(t_start, 1), "dpo": round(t_dpo, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    finish_run(out, cfg, report, trainer.state.global_step if trainer else 0,
               f"{cfg.loss}" if cfg.steps else "start (steps=0)", saved=("adapter" if cfg.lora.enabled else "checkpoint", saved),
               before_label="start", tags=("start", "dpo"))
    return report


load, main = recipe_entry(Config, train, __file__)  # configs/dpo.yaml, --config FILE, key=value

if __name__ == "__main__":
    run_cli(main)
