"""The masked SFT stage (techniques 1 and 2; 3, 4 and 10 as options): recipes/masked_sft.py, and the
lab's SFT model every later recipe starts from (`lab_sft_model`: DPO, PRM, MCTS).

Steps of `train_sft`: (1) a base model that never saw a BT (the tiny lab base trained on clean
`arith`, cached, or model=DIR); (2) evaluate it in and out of distribution; (3) add the BT token,
initialise its rows; (4) SFT on examples with errors + BTs + corrections, errors masked out of the
loss (token cross-entropy, the trainer's default objective); (5) evaluate again; print the
before/after table; write checkpoint (or adapter), TensorBoard, eval.json, eval.md.

The settings (`SFTConfig`) load without the ML libraries, so a bad one fails in about a second.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from halluc.core.config import NonNegativeFloat, as_dict, check_run_rules
from halluc.pipeline.curriculum import Curriculum
from halluc.core.distributed import zero_stage
from halluc.sources.errors import ErrorConfig
from halluc.pipeline.run_config import RunConfig

log = logging.getLogger("masked_sft")


@dataclass
class SFTConfig(RunConfig):
    """The settings of recipes/masked_sft.py (its YAML: recipes/configs/masked_sft.yaml); the shared
    ones (output, model, lab chain, layout, launcher) are RunConfig's."""

    output_dir: str = "runs/masked_sft"  # checkpoint/ (or adapter/), tb/, eval.json, eval.md, config.yaml
    data: str | None = None             # a folder from tools/prepare_data.py: the SFT examples (else built here)
    curriculum: Curriculum = field(default_factory=Curriculum)  # technique 3: SFT in phases, easy to hard
    masked: bool = True                 # False: train on the error tokens too (ablation)
    bt_init: Literal["semantic", "mean", "random"] = "semantic"  # technique 2: how the new BT row starts
    overlong: Literal["drop", "truncate"] = "drop"
    reinit_bt: bool = False             # model=DIR that already has a BT token: re-initialise its row too
    # Technique 10: >0 trains a verifier head ("this step is wrong", at step ends) jointly with the
    # LM loss, weighted by this; saved beside the checkpoint (halluc/objectives/verifier_head.py)
    verifier_head_weight: NonNegativeFloat = 0.0

    def check(self) -> None:
        check_run_rules(self)
        if self.data and (self.errors != ErrorConfig() or not self.masked):
            raise ValueError("errors.* and masked are fixed when the data is prepared (tools/prepare_data.py "
                             f"--errors ... --unmasked); data={self.data} is used as it is")
        if self.lab.task != "arith" and not self.lab.train_file and not (self.data and self.model):
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (the tiny base trains on it, and SFT "
                             "examples are built from it), or model=DIR with a prepared data=DIR")
        if any(p.source == "own" for p in self.curriculum.phases):
            raise ValueError("curriculum phases with source=own need the model's own errors: recipes/self_correct.py")
        if self.curriculum.phases and self.data:
            raise ValueError("a curriculum builds its phases' data itself: drop data=DIR")
        if self.verifier_head_weight and self.curriculum.phases:
            raise ValueError("verifier_head_weight trains the head in one SFT stage: drop curriculum.phases")
        if self.verifier_head_weight and self.lora.enabled and zero_stage(self.deepspeed) == 3:
            raise ValueError("verifier_head_weight with LoRA under ZeRO-3 is not supported (the head is saved "
                             "from the live module, which ZeRO-3 shards): use ZeRO-2 or a full fine-tune")
        check_prepared_data(self)


def check_prepared_data(cfg) -> None:
    """data=DIR must be a folder tools/prepare_data.py wrote: checked at load, not after the base stage."""
    if getattr(cfg, "data", None) and not (Path(cfg.data) / "dataset_info.json").exists():
        raise ValueError(f"data={cfg.data}: not a dataset folder written by tools/prepare_data.py")
    if getattr(cfg, "data", None):  # its task, before the base is evaluated on the wrong one
        from halluc.sources.data import check_prepared_task

        check_prepared_task(cfg.data, cfg.lab.task)


def train_sft(cfg: SFTConfig, objective=None, recipe: str = "masked_sft") -> dict | None:
    """The whole recipe: base, its evaluation, BT token, masked SFT, evaluation, report (rank 0's).
    `objective`: what the SFT stage minimises (default: token cross-entropy over the trained tokens);
    a new SFT technique is a recipe that passes its own (README, "Adding a technique"). `recipe`: the
    name its checkpoint records (config.halluc)."""
    if objective is not None and (cfg.curriculum.phases or cfg.verifier_head_weight):
        raise ValueError(f"{recipe}: its objective trains one SFT stage: drop curriculum.phases and "
                         "verifier_head_weight (they bring objectives of their own)")
    # The ML libraries load here, after every setting was checked.
    from halluc.training.checkpoint import save_stage
    from halluc.pipeline.curriculum import phase_datasets, train_phases
    from halluc.sources.data import build_sft_dataset, load_prepared
    from halluc.core.distributed import is_main, world_size
    from halluc.pipeline.stages import (RunSettings, add_backtrack, base_and_evaluation, evaluate_on_main, finish_run,
                               open_run, train_history, train_stage)

    out, task, splits, tests, t0 = open_run(cfg)
    run = RunSettings.of(cfg)

    # (1) + (2): the base and its evaluation (cached with a cached lab base: every arm of a sweep shares it)
    model, tokenizer, base_path, before = base_and_evaluation(cfg, run, splits, tests, task)
    t_base = time.perf_counter() - t0

    # (3) the BT token, its initialisation (technique 2) and the record of how the model is trained
    model, bt_id, used, identity = add_backtrack(model, tokenizer, cfg, recipe, base_path)

    # (4) masked SFT with the default objective, token cross-entropy
    t1 = time.perf_counter()
    if cfg.curriculum.phases:  # technique 3: phases from easy to hard (order=shuffled: the control)
        cur = cfg.curriculum
        pool, probe = splits["sft"][:len(splits["sft"]) - cur.probe_size], splits["sft"][-cur.probe_size:]
        datasets, counts = phase_datasets(cur, pool, tokenizer, bt_id, cfg.errors, examples=len(pool),
                                          masked=cfg.masked, max_len=cfg.max_len, overlong=cfg.overlong,
                                          seed=cfg.seed + 1, num_proc=cfg.num_proc)
        trainer = train_phases(model, datasets, cur, counts, out, run, cfg.sft, tokenizer,
                               probe=(probe, task, cfg.eval_max_new_tokens))
    else:
        if cfg.data:
            data = load_prepared(cfg.data, tokenizer, task=cfg.lab.task)
            limit = getattr(model.config, "max_position_embeddings", None)
            longest = max(map(len, data["input_ids"]), default=0)
            if limit and longest > limit:  # prepared with a longer --max-len than this model has positions
                raise SystemExit(f"data={cfg.data} holds examples of up to {longest} tokens, more than the {limit} "
                                 f"positions of the model: prepare it again with --max-len {limit}")
        else:
            data = build_sft_dataset(splits["sft"], tokenizer, cfg.errors, bt_id, masked=cfg.masked,
                                     max_len=cfg.max_len, overlong=cfg.overlong, seed=cfg.seed + 1,
                                     num_proc=cfg.num_proc)
        if cfg.verifier_head_weight:  # technique 10: the head, trained on labels at the task's step ends
            from halluc.objectives.verifier_head import HeadObjective, attach_head

            attach_head(model)
            objective = HeadObjective(cfg.verifier_head_weight, task.STEP_SEPARATOR)
        trainer = train_stage(model, data, cfg.sft, str(out), run, tokenizer=tokenizer,
                              adapter_info=identity if cfg.lora.enabled else None, objective=objective)
    t_sft = time.perf_counter() - t1
    saved = out / ("adapter" if cfg.lora.enabled else "checkpoint")
    live = model
    model = save_stage(trainer, model, tokenizer, saved, cfg.deepspeed, identity if cfg.lora.enabled else None)
    if cfg.verifier_head_weight:
        from halluc.objectives.verifier_head import load_head, save_head_from, split_head

        if is_main():  # the head leaves the LM's weights, so AutoModelForCausalLM loads them as they are
            save_head_from(live, saved) if cfg.lora.enabled else split_head(saved)
        if model is not None and model is not live:  # reloaded after DeepSpeed
            load_head(saved, model)

    # (5) evaluate, report
    after = evaluate_on_main(model, tokenizer, tests, task, cfg.eval_max_new_tokens, "sft")
    if not is_main():
        return None
    report = {"config": as_dict(cfg), "backtrack_id": bt_id, "bt_init_words": used,
              "before": before, "after": after, "saved": str(saved), "world_size": world_size(),
              "sft_train": train_history(trainer),
              "seconds": {"base": round(t_base, 1), "sft": round(t_sft, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    kind = "clean SFT" if cfg.errors.source == "none" else ("masked SFT" if cfg.masked else "unmasked SFT")
    finish_run(out, cfg, report, trainer.state.global_step, kind,
               saved=("adapter" if cfg.lora.enabled else "checkpoint", saved))
    return report


# --------------------------------------------------------------------------- the lab's masked SFT model

SFT_SHARED = ("seed", "lab", "tiny", "base", "sft", "errors", "num_proc", "deepspeed", "eval_max_new_tokens")
LAYOUT_SHARED = ("attention", "positions", "backend")  # layout.pack stays masked_sft's own (0), like max_len
NEW_ERROR_SETTINGS = {"step_kind": "any", "step_rate": 0.0}  # errors.* added after models were cached


def lab_sft_settings(cfg, extra: dict | None = None) -> dict:
    """What the lab's masked SFT model depends on: its cache key (lab_sft_model)."""
    from halluc.core.distributed import world_size

    # max_len stays masked_sft's own, so the lab default starts from the main job's model (and shares its base)
    settings = {name: as_dict(getattr(cfg, name)) if dataclasses.is_dataclass(getattr(cfg, name))
                else getattr(cfg, name) for name in SFT_SHARED}
    settings.update({name: getattr(cfg.layout, name) for name in LAYOUT_SHARED})  # the keys they had when flat
    for name, default in NEW_ERROR_SETTINGS.items():  # added since: at their defaults, keys stay what they were
        if settings["errors"].get(name) == default:
            settings["errors"].pop(name)
    if cfg.base_retry.rate:  # a retry-pretrained base under the SFT model (a clean one keeps the old key)
        settings["base_retry"] = as_dict(cfg.base_retry)
    if world_size() > 1:  # batch sizes are per process (one process keeps the keys made before this)
        settings["world_size"] = world_size()
    settings.update(extra or {})  # only when given: the keys of plain SFT models stay what they were
    return settings


def lab_chain_config(cfg, output_dir: str, extra: dict | None = None) -> "SFTConfig":
    """The masked SFT settings the lab chain trains with for a later recipe's `cfg`: its SFT_SHARED
    settings, layout (LAYOUT_SHARED) and retry base, `extra`, and masked_sft's own defaults for the
    rest (max_len, layout.pack), so the lab base and SFT model are the main job's."""
    sft_cfg = SFTConfig(output_dir=output_dir, cache_dir=cfg.cache_dir, overwrite=True)
    for name in SFT_SHARED:
        setattr(sft_cfg, name, getattr(cfg, name))
    sft_cfg.layout = dataclasses.replace(sft_cfg.layout, **{n: getattr(cfg.layout, n) for n in LAYOUT_SHARED})
    sft_cfg.base_retry = cfg.base_retry
    sft_cfg.ddp_timeout = cfg.ddp_timeout  # how long ranks wait, not what is trained: no part of the cache key
    for name, value in (extra or {}).items():
        setattr(sft_cfg, name, value)
    return sft_cfg


def lab_sft_model(cfg, extra: dict | None = None) -> str:
    """The checkpoint folder of the lab's masked SFT model: `train_sft` with this run's SFT_SHARED
    settings (and `extra` SFTConfig settings, e.g. verifier_head_weight), the rest their defaults,
    trained once per settings under cfg.cache_dir. Later recipes (dpo, prm, mcts) start from it and
    evaluate it with `cached_evaluation` (its eval.json is the training run's, scored by the code of
    that day: a cache keyed by settings alone would keep it after the scoring code changed)."""
    from halluc.core.artifacts import artifact_path, build_once
    from halluc.core.distributed import barrier

    settings = lab_sft_settings(cfg, extra)
    folder = artifact_path(cfg.cache_dir, "sft", json.dumps(settings, sort_keys=True))
    with build_once(folder, "eval.json", what="the lab's masked SFT model") as build:  # eval.json: written last
        if build:
            log.info("training the lab's masked SFT model into %s", folder)
            train_sft(lab_chain_config(cfg, str(folder), extra))
    barrier()
    return str(folder / "checkpoint")


def cached_evaluation(model, tokenizer, checkpoint: str, tests: dict, task, max_new_tokens: int, label: str):
    """`evaluate_on_main` of a model cached in the lab chain (`lab_sft_model`, `lab_base_policy`), its
    results kept beside the checkpoint under a key of the problems, the budget and the scoring code's
    hash, so every arm of a sweep shares one evaluation and a change to the scoring code re-runs it."""
    from halluc.pipeline.stages import evaluate_on_main

    return evaluate_on_main(model, tokenizer, tests, task, max_new_tokens, label, cache_dir=Path(checkpoint).parent)


def lab_base_policy(cfg, splits: dict, tests: dict, task) -> str:
    """The checkpoint folder of the lab base with the BT token added and initialised (technique 2,
    SFTConfig's bt_init) and no SFT: the policy N-MARS's "GRPO from the base" starts from. Cached under
    cfg.cache_dir by the settings it depends on, like `lab_sft_model`."""
    from halluc.core.artifacts import artifact_path, build_once
    from halluc.core.distributed import barrier, is_main
    from halluc.pipeline.stages import RunSettings, add_backtrack, base_and_evaluation

    settings = {k: v for k, v in lab_sft_settings(cfg).items() if k not in ("sft", "errors", *LAYOUT_SHARED)}
    settings["bt_init"] = SFTConfig.bt_init
    folder = artifact_path(cfg.cache_dir, "base_bt", json.dumps(settings, sort_keys=True))
    with build_once(folder, "eval.json", what="the lab base with a BT token") as build:  # eval.json: last
        if build:  # every process (the base may have to be trained first); rank 0 writes
            log.info("adding a BT token to the lab base into %s", folder)
            # the lab base as the main job trains it (its max_len and layout.pack, not this run's)
            chain = lab_chain_config(cfg, str(folder))
            model, tokenizer, base_path, _ = base_and_evaluation(chain, RunSettings.of(chain), splits, tests, task)
            plain = SFTConfig(seed=cfg.seed, lab=cfg.lab)  # bt_init, no LoRA, causal layout (keep semantics)
            model, bt_id, used, _ = add_backtrack(model, tokenizer, plain, "base+bt", base_path)
            if is_main():
                model.save_pretrained(folder / "checkpoint")
                tokenizer.save_pretrained(folder / "checkpoint")
            cached_evaluation(model, tokenizer, str(folder / "checkpoint"), tests, task, cfg.eval_max_new_tokens,
                              "base+bt")  # what starting_policy reads next
            if is_main():
                (folder / "eval.json").write_text(json.dumps({"backtrack_id": bt_id, "bt_init_words": used}, indent=1))
    barrier()
    return str(folder / "checkpoint")


def starting_policy(cfg, task, tests: dict, what: str, start: str = "sft", splits: dict | None = None):
    """(folder, tokenizer, model, its evaluation) of the policy a later recipe (dpo, grpo) starts from:
    model=DIR, or the lab's masked SFT model (cached with its evaluation), or with start="base" the lab
    base with a BT token and no SFT (`lab_base_policy`, needs `splits`). A model without the BT token is
    refused: `what` starts from one that has it."""
    from halluc.core.model import load_causal_lm
    from halluc.core.tokens import has_backtrack, load_tokenizer
    from halluc.pipeline.stages import evaluate_on_main

    if cfg.model:
        start = cfg.model
    elif start == "base":
        start = lab_base_policy(cfg, splits, tests, task)
    else:
        start = lab_sft_model(cfg)
    tokenizer = load_tokenizer(start)
    if not has_backtrack(tokenizer):
        raise SystemExit(f"model={start} has no <|BACKTRACK|> token: {what} starts from a model that has it "
                         "(masked SFT, recipes/masked_sft.py)")
    model = load_causal_lm(start)
    before = None
    if tests and cfg.model:
        before = evaluate_on_main(model, tokenizer, tests, task, cfg.eval_max_new_tokens, "start")
    elif tests:
        before = cached_evaluation(model, tokenizer, start, tests, task, cfg.eval_max_new_tokens, "start")
    return start, tokenizer, model, before
