"""The PRM recipe's cached stages (recipes/prm.py, technique 7): step-labelled solutions made from a
policy (`step_rows`) and a PRM trained on them (`train_prm`), each an artifact of halluc.core.artifacts
keyed by what made it. They read the recipe's settings by name: cache_dir, data, test_data, verifier,
step_data, seed, lab, eval_max_new_tokens; prm_base, max_len, steps, batch_size, lr, lora,
deepspeed, save_steps, save_total_limit, resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from halluc.core.config import Stage, as_dict

log = logging.getLogger(__name__)


def step_rows(cfg, policy, tokenizer, task, splits) -> tuple[list, list, dict]:
    """(train rows, held-out rows, their statistics): data= / test_data=, or labelled here from the
    lab and cached under cache_dir by (policy weights, settings, problems)."""
    from halluc.core.artifacts import artifact_path, build_once
    from halluc.core.distributed import local_device
    from halluc.inference.generate import Sampling
    from halluc.training.lora import fingerprint
    from halluc.objectives.prm import read_stepwise, write_stepwise
    from halluc.sources.step_labels import agreement, labelled_solutions, rollout_labels

    s = cfg.step_data
    if cfg.data and (cfg.test_data or cfg.verifier == "oracle"):
        return read_stepwise(cfg.data), read_stepwise(cfg.test_data) if cfg.test_data else [], {"data": cfg.data}
    key = json.dumps([fingerprint(policy), as_dict(s), cfg.seed, as_dict(cfg.lab), cfg.eval_max_new_tokens])
    folder = artifact_path(cfg.cache_dir, "steps", key)
    with build_once(folder, "stats.json", ranks="main", what="the labelled solutions") as build:
        if build:
            sampling = Sampling(s.temperature, 1.0, cfg.seed)
            policy.eval().to(local_device())
            stats = {}
            made = {}
            for name, problems in (("train", splits["sft"][:s.problems]), ("test", splits["test_id"][:s.test_problems])):
                rows, stats[name] = labelled_solutions(policy, tokenizer, task, problems, wrong_steps=s.wrong_steps,
                                                       samples=s.samples, sampling=sampling,
                                                       max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed + len(name))
                made[name] = rows
            by_prompt = {p.prompt: p for p in splits["sft"][:s.problems]}
            own = [r for r in made["train"] if r["source"] == "sample"]
            check = own[:s.agreement] if s.labels == "verifier" else made["train"]
            if check:  # Math-Shepherd labels where asked, and their agreement with the verifier's
                items = [(by_prompt[r["prompt"]], r["completions"]) for r in check]
                rolled = rollout_labels(policy, tokenizer, task, items, s.rollouts, sampling, cfg.eval_max_new_tokens)
                stats["agreement"] = agreement([r["labels"] for r in check], [x.hard for x in rolled])
                if s.labels == "rollouts":
                    for r, x in zip(check, rolled):
                        r["verifier_labels"], r["labels"], r["soft_labels"] = r["labels"], x.hard, x.soft
            write_stepwise(folder / "train.jsonl", made["train"])
            write_stepwise(folder / "test.jsonl", made["test"])
            (folder / "stats.json").write_text(json.dumps(stats, indent=1))
            log.info("labelled solutions in %s: %s", folder, json.dumps(stats))
    stats = json.loads((folder / "stats.json").read_text())
    train_rows = read_stepwise(cfg.data) if cfg.data else read_stepwise(folder / "train.jsonl")
    test_rows = read_stepwise(cfg.test_data) if cfg.test_data else read_stepwise(folder / "test.jsonl")
    return train_rows, test_rows, {**stats, "folder": str(folder)}


def train_prm(cfg, policy, policy_dir: str, tokenizer, rows: list[dict]) -> tuple[str, dict]:
    """(folder, training log) of a PRM trained on `rows`, cached under cache_dir by its data and settings."""
    from halluc.training.checkpoint import record_training, save_full
    from halluc.core.distributed import barrier, is_main
    from halluc.objectives.prm import StepClassification, load_prm, prm_example
    from halluc.core.distributed import world_size
    from halluc.training.lora import fingerprint
    from halluc.core.artifacts import artifact_path, build_once
    from halluc.core.tokens import check_same_vocab
    from halluc.pipeline.stages import RunSettings, train_history, train_stage

    base = cfg.prm_base or policy_dir
    if cfg.prm_base:
        check_same_vocab("prm_base", cfg.prm_base, tokenizer)
    examples = [prm_example(r, tokenizer) for r in rows]
    kept = [e for e in examples if len(e["input_ids"]) <= cfg.max_len]
    if len(kept) < len(examples):
        log.warning("%d of %d labelled solutions are longer than max_len=%d and were dropped",
                    len(examples) - len(kept), len(examples), cfg.max_len)
    if not kept:
        raise SystemExit("no labelled solution left to train the PRM on")
    data_key = hashlib.sha1(json.dumps([[e["input_ids"], e["labels"]] for e in kept]).encode()).hexdigest()
    # the base by its weights (a retrained policy in the same folder is another base); batch sizes are per process
    base_key = fingerprint(policy) if base == policy_dir else [str(base), _weights_stamp(base)]
    settings = [data_key, base_key, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, as_dict(cfg.lora), cfg.deepspeed,
                world_size()]
    folder = artifact_path(cfg.cache_dir, "prm", json.dumps(settings))
    # rows unpacked; StepClassification brings its collator and the native backend (its own plain forward)
    run = RunSettings(seed=cfg.seed, deepspeed=cfg.deepspeed, save_steps=cfg.save_steps,
                      save_total_limit=cfg.save_total_limit, resume=cfg.resume, ddp_timeout=cfg.ddp_timeout)
    with build_once(folder, "train.json", what="the trained PRM") as build:  # train.json: written last
        if build:
            from transformers import set_seed

            set_seed(cfg.seed + 1)  # the new head's (and LoRA's) init, whatever the labelling drew before
            model = load_prm(base, new_head=True)
            record_training(model, recipe="prm", labels=cfg.step_data.labels, seed=cfg.seed)
            if cfg.lora.enabled:
                from halluc.training.lora import apply_lora

                model = apply_lora(model, dataclasses.replace(cfg.lora, train_bt_rows=False), None,
                                   task_type="TOKEN_CLS")
            trainer = train_stage(model, kept, Stage(cfg.steps, cfg.batch_size, cfg.lr), str(folder) + ".run", run,
                                  objective=StepClassification(), tokenizer=tokenizer)
            if cfg.lora.enabled:  # a plain HF folder: the adapter merged into the PRM
                merged = trainer.model.merge_and_unload()
                if is_main():
                    merged.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                barrier()
            else:
                save_full(trainer, tokenizer, folder)
            if is_main():
                (folder / "train.json").write_text(json.dumps(train_history(trainer)))
                (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    barrier()
    return str(folder), json.loads((folder / "train.json").read_text())


def _weights_stamp(folder: str) -> list:
    """(name, size, mtime) of a checkpoint's weight files: a cheap identity of weights not loaded here."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
