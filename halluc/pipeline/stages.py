"""The stages every recipe is made of: a base model, training stages, evaluation on rank 0.

A recipe gets a base (a local HF model, or the tiny lab base trained on clean data once and
cached), trains one or more stages with an objective (`train_stage`, halluc.training.train), saves them
(halluc.training.checkpoint) and evaluates on rank 0 while the other ranks wait (`evaluate_on_main`).
Under several processes every rank trains; only rank 0 evaluates and writes files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from transformers import AutoTokenizer

from halluc.core.artifacts import artifact_path, build_once, write_whole
from halluc.training.checkpoint import resume_from, save_full
from halluc.core.config import LayoutSettings, Stage, as_dict
from halluc.sources.data import build_sft_dataset
from halluc.core.distributed import barrier, is_main, world_size
from halluc.sources.errors import ErrorConfig
from halluc.inference.evaluate import evaluate_problems, evaluation_version
from halluc.pipeline.lab import LabConfig, ModelConfig, RetryData, base_settings, lab_tokenizer
from halluc.core.model import load_causal_lm, tiny_llama
from halluc.core.tokens import add_backtrack_token
from halluc.structure.packing import pack_examples
from halluc.training.train import make_trainer, training_args

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """How a recipe's stages train and save, whatever the objective: the same-named top-level
    settings of every recipe config (`RunSettings.of(cfg)`)."""

    seed: int = 0
    layout: LayoutSettings = dataclasses.field(default_factory=LayoutSettings)  # attention, positions, backend, pack
    deepspeed: str | None = None
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = False
    ddp_timeout: int = 1800  # seconds; the process group takes it from the first stage's TrainingArguments

    @classmethod
    def of(cls, cfg) -> "RunSettings":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def train_stage(model, data, stage: Stage, out_dir: str, run: RunSettings, objective=None, tokenizer=None,
                callbacks=(), adapter_info=None):
    """Train `model` on `data` (examples, packed into rows when run.layout.pack > 0) for one stage with
    `objective` (default: token cross-entropy); resumes from the stage's newest checkpoint when
    run.resume. Returns the trainer. The objective brings what it needs (halluc.training.train.Objective): its
    collator, `laid_out` rows (preference pairs: never packed again, never given to the plain causal
    backend), a backend it must run on (the PRM's own forward). With `tokenizer`, every checkpoint-N
    folder holds it too (so it can be evaluated as is), and with `adapter_info` (LoRA) its
    halluc_adapter.json; `callbacks` are added to the Trainer's."""
    layout = run.layout
    laid_out = getattr(objective, "laid_out", False)
    collator = objective.collator(layout, tokenizer) if hasattr(objective, "collator") else None
    if getattr(objective, "backend", None):  # one the objective must run on (the PRM's own forward)
        layout = dataclasses.replace(layout, backend=objective.backend)
    packed = layout.pack > 0 and not laid_out
    if packed:
        rows = pack_examples(list(data), layout.pack, layout.attention, layout.positions)
        log.info("packed %d examples into %d rows of %d tokens: %.1f%% real tokens", rows.n_units,
                 len(rows.rows), layout.pack, 100 * rows.real_fraction)
        if rows.n_dropped:
            log.warning("%d of %d examples are longer than layout.pack=%d tokens and were dropped: raise layout.pack",
                        rows.n_dropped, rows.n_dropped + rows.n_units, layout.pack)
        data = rows.rows
    if len(data) == 0:
        raise SystemExit(f"no training example left for {out_dir} (max_len / pack dropped them all)")
    args = training_args(out_dir, steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr, seed=run.seed,
                         deepspeed=run.deepspeed, save_steps=run.save_steps,
                         save_total_limit=run.save_total_limit, ddp_timeout=run.ddp_timeout,
                         drop_last=len(data) >= stage.batch_size * world_size())
    trainer = make_trainer(model, args, data, tb_dir=str(Path(out_dir) / "tb"), objective=objective,
                           layout=layout, packed=packed or laid_out, collator=collator, tokenizer=tokenizer)
    for callback in callbacks:
        trainer.add_callback(callback)
    if adapter_info is not None:
        from halluc.training.checkpoint import AdapterInfoCallback

        trainer.add_callback(AdapterInfoCallback(adapter_info, model))
    trainer.train(resume_from_checkpoint=resume_from(out_dir, run.resume))
    return trainer


def train_history(trainer) -> dict:
    """The logged losses of a finished stage, for reports."""
    losses = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    return {"final_loss": losses[-1][1] if losses else None, "steps": trainer.state.global_step,
            "losses": losses}


def lab_base_model(lab: LabConfig, tiny: ModelConfig, stage: Stage, train_problems, cache_dir: str,
                   run: RunSettings, max_len: int = 256, num_proc: int | None = None, retry: RetryData = RetryData()):
    """(model, tokenizer, folder) of the tiny lab base trained on clean problems (with `retry.rate`: retry
    data, Physics of LMs 2.2), cached under cache_dir by its settings: the first run trains it, later runs
    (any arm of a sweep) reuse it. A file lock makes concurrent runs with the same settings train it once."""
    # everything the base's weights depend on (the global batch through the number of processes)
    key = [base_settings(lab), as_dict(tiny), as_dict(stage), run.seed, run.layout.pack, max_len, world_size()]
    key = json.dumps(key + ([as_dict(retry)] if retry.rate else []), sort_keys=True)  # clean bases keep their keys
    cached = artifact_path(cache_dir, "base", key)
    with build_once(cached, "train.json", what="the cached base model") as build:  # train.json: written last
        if build:
            tokenizer = lab_tokenizer(train_problems, tiny.vocab_size)
            bt_id = add_backtrack_token(tokenizer) if retry.rate else None  # a row of its own from the start
            model = tiny_llama(len(tokenizer), tiny.hidden, tiny.layers, tiny.heads, init_range=tiny.init_range,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            data, stage, tokens = base_data(train_problems, tokenizer, bt_id, stage, retry, run, max_len, num_proc)
            log.info("training the tiny base (%.2fM params) on %s %s for %d steps", model.num_parameters() / 1e6,
                     f"retry data (rate {retry.rate:g}, {retry.kind})" if retry.rate else "clean", lab.task, stage.steps)
            # causal attention and original positions (the recipe's layout is for its own BT data; P2.2's
            # retry pretraining is causal)
            causal = dataclasses.replace(run, layout=dataclasses.replace(run.layout, attention="causal",
                                                                          positions="original"))
            trainer = train_stage(model, data, stage, str(cached) + ".run", causal, tokenizer=tokenizer)
            save_full(trainer, tokenizer, cached)
            (cached / "train.json").write_text(json.dumps({**train_history(trainer), **tokens}))
    if not build:
        return load_causal_lm(str(cached)), AutoTokenizer.from_pretrained(cached), cached
    if run.deepspeed:  # continue from the saved weights (under ZeRO-3 memory holds only shards)
        model = load_causal_lm(str(cached))
    return model, tokenizer, cached


def base_data(problems, tokenizer, bt_id, stage: Stage, retry: RetryData, run: RunSettings, max_len: int,
              num_proc: int | None):
    """(dataset, stage, token counts) of the base: clean examples, or retry data whose steps are first
    written wrong and erased with chance retry.rate. With retry.equal_tokens and no packing, the stage
    trains fewer steps so that steps x mean length equals the clean base's (P2.2's equal token budgets)."""
    clean = build_sft_dataset(problems, tokenizer, ErrorConfig(source="none"), None, max_len=max_len,
                              num_proc=num_proc, seed=run.seed)
    clean_mean = sum(len(x) for x in clean["input_ids"]) / max(len(clean), 1)
    if not retry.rate:
        return clean, stage, {"mean_tokens_per_example": clean_mean}
    errors = ErrorConfig(source="step", step_rate=retry.rate, step_kind=retry.kind)
    data = build_sft_dataset(problems, tokenizer, errors, bt_id, masked=retry.masked, max_len=max_len,
                             num_proc=num_proc, seed=run.seed)
    mean = sum(len(x) for x in data["input_ids"]) / max(len(data), 1)
    steps = stage.steps
    if retry.equal_tokens and not run.layout.pack:  # packed rows hold the same tokens per step already
        steps = max(1, round(stage.steps * clean_mean / mean))
    log.info("retry data: %.1f tokens per example against %.1f clean: %d steps for the clean base's %d",
             mean, clean_mean, steps, stage.steps)
    return data, dataclasses.replace(stage, steps=steps), {
        "mean_tokens_per_example": mean, "clean_mean_tokens_per_example": clean_mean, "clean_steps": stage.steps,
        "retry_examples": len(data), "bt_per_example": sum(x.count(bt_id) for x in data["input_ids"]) / max(len(data), 1)}


def evaluate_on_main(model, tokenizer, splits: dict, task, max_new_tokens: int, label: str,
                     cache_dir: Path | None = None) -> dict | None:
    """{split: metrics} on rank 0 while the others wait (raise the ddp_timeout setting for very long
    evaluations); None on the other ranks. With cache_dir (a cached base model's folder), reuse
    or write the results there: the base's evaluation is the same for every arm of a sweep.
    The file is keyed by the settings and the scoring code's hash."""
    def evaluate() -> dict:
        model.eval()
        return {name: evaluate_problems(model, tokenizer, problems, task, max_new_tokens, desc=f"eval {label} {name}")
                for name, problems in splits.items()}

    results = None
    if is_main() and cache_dir is None:
        results = evaluate()
    elif is_main():
        problems = json.dumps({k: [p.prompt for p in v] for k, v in sorted(splits.items())})
        cache_file = artifact_path(cache_dir, "eval", f"{max_new_tokens}-{problems}-{evaluation_version()}", ".json")
        with build_once(cache_file, what="the evaluation") as build:
            if build:
                results = evaluate()
                write_whole(cache_file, json.dumps(results))
            else:
                results = json.loads(cache_file.read_text())
    barrier()
    return results


# --------------------------------------------------------------------------- the steps every SFT recipe shares
# They read the recipe's settings by the names every halluc recipe config uses (output_dir,
# cache_dir, model, seed, lab, tiny, base, max_len, num_proc, bt_init, reinit_bt, attention,
# positions, lora, resume, overwrite, eval_max_new_tokens).

def start_run(cfg) -> Path:
    """Claim output_dir (never over an earlier run unless resume/overwrite), save and log the
    effective settings. Every rank calls it."""
    import yaml

    from halluc.training.checkpoint import claim_output_dir, hold_output_dir
    out = Path(cfg.output_dir)
    if is_main():
        hold_output_dir(out)  # before the claim: a live run in the folder is named as such
    claim_output_dir(cfg, delete=is_main())  # every rank checks (and refuses alike); rank 0 deletes
    barrier()
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(as_dict(cfg), sort_keys=False))
        log.info("settings that differ from the built-in defaults (all of them: %s):\n%s", out / "config.yaml",
                 changed_settings(cfg))
    barrier()
    return out


def changed_settings(cfg) -> str:
    """`  key = value` lines of the settings that differ from the config class's own defaults (the
    recipe's YAML file and the command line): what a log needs, where the whole dump was 70+ lines."""
    from halluc.core.config import flat_dict

    default = flat_dict(as_dict(type(cfg)()))
    lines = [f"  {k} = {v!r}" for k, v in flat_dict(as_dict(cfg)).items() if default.get(k) != v]
    return "\n".join(lines) or "  (none)"


class Opening(NamedTuple):
    """What every training recipe starts from (`open_run`)."""

    out: Path       # the claimed output_dir
    task: object    # the lab task (halluc.tasks): verifier, answer extraction, step separator
    splits: dict    # the lab's problems: train, sft, test_id, test_ood (those it has)
    tests: dict     # the splits evaluated: test_id, test_ood
    t0: float       # time.perf_counter() when the run started


def open_run(cfg, splits: bool = True) -> Opening:
    """The opening every training recipe shares: seed everything, claim output_dir (`start_run`),
    pick the task, draw the lab's splits (splits=False: none, for runs that read every input)."""
    from transformers import set_seed

    from halluc.pipeline.lab import lab_splits
    from halluc.tasks import get_task

    if getattr(cfg, "lora", None) and cfg.lora.enabled and cfg.model:  # before the model loads
        from halluc.core.inputs import check_lora_targets

        check_lora_targets(cfg.model, cfg.lora.targets)
    set_seed(cfg.seed)
    out = start_run(cfg)
    t0 = time.perf_counter()
    task = get_task(cfg.lab.task)
    drawn = lab_splits(cfg.lab, cfg.seed) if splits else {}
    tests = {name: drawn[name] for name in ("test_id", "test_ood") if name in drawn}
    if splits and not tests:  # a run reports before/after on its test problems: never an empty table
        raise SystemExit(f"lab.task={cfg.lab.task}: no test problems to evaluate on (set lab.test_file)")
    return Opening(out, task, drawn, tests, t0)


def check_lengths_fit(cfg, model_dir: str) -> None:
    """max_len and pack (the longest row a stage trains on) within the model's positions (its
    config.json), or one line saying what to set: a longer row indexes past the position table."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    for name in ("max_len", "pack"):
        value = (getattr(cfg, name, 0) if name == "max_len" else cfg.layout.pack) or 0
        key = name if name == "max_len" else "layout.pack"
        if limit and value > limit:
            raise SystemExit(f"{key}={value} is longer than the {limit} positions of model={model_dir}: "
                             f"set {key}={limit} or less")


def base_and_evaluation(cfg, run: RunSettings, splits: dict, tests: dict, task):
    """(model, tokenizer, base folder, its evaluation on `tests`): model=DIR, or the tiny lab base
    (trained once and cached with its evaluation, which every arm of a sweep shares)."""
    from halluc.pipeline.lab import eval_table
    from halluc.core.tokens import load_tokenizer

    if cfg.model:
        if (Path(cfg.model) / "halluc_adapter.json").exists():
            raise SystemExit(f"model={cfg.model} is a LoRA adapter: merge it first (tools/merge_adapter.py) "
                             "and train from the merged folder")
        log.info("model=%s: the tiny.* and base.* settings do not apply (they shape the lab base)", cfg.model)
        check_lengths_fit(cfg, cfg.model)  # before the model loads, the base evaluation and the data
        model, tokenizer, base_path = load_causal_lm(cfg.model), load_tokenizer(cfg.model), cfg.model
    else:
        model, tokenizer, base_path = lab_base_model(cfg.lab, cfg.tiny, cfg.base, splits["train"], cfg.cache_dir,
                                                     run, cfg.max_len, cfg.num_proc, cfg.base_retry)
    before = evaluate_on_main(model, tokenizer, tests, task, cfg.eval_max_new_tokens, "base",
                              cache_dir=None if cfg.model else base_path)
    if is_main():
        print("\n" + eval_table({"base": before}) + "\n", flush=True)
    return model, tokenizer, base_path, before


def add_backtrack(model, tokenizer, cfg, recipe: str, base_path):
    """Technique 2 and the record: add <|BACKTRACK|> (a model that has it keeps its trained row
    unless reinit_bt), initialise its rows, record how the model is trained (config.halluc), and
    wrap it in LoRA if asked. Returns (model, BT id, the words the init used, the base identity)."""
    from transformers import set_seed

    from halluc.training.checkpoint import record_training
    from halluc.training.lora import apply_lora, base_identity
    from halluc.core.model import init_backtrack_embedding
    from halluc.core.tokens import BACKTRACK_TOKEN, add_backtrack_token, has_backtrack

    # The SFT stage's random draws (a random BT row, LoRA's init) must not depend on whether the
    # base was trained in this process or read from the cache (a resumed run reads it).
    set_seed(cfg.seed + 1)
    identity = base_identity(model, str(base_path))  # what an adapter's base must match, before BT
    had_bt = has_backtrack(tokenizer)
    bt_id = add_backtrack_token(tokenizer, model)
    used = None
    if had_bt and not cfg.reinit_bt:  # a halluc checkpoint, or a retry-pretrained base: its BT row is trained
        log.warning("%s already has %s (id %d): keeping its trained row (reinit_bt=true re-initialises it)",
                    f"model={cfg.model}" if cfg.model else "the retry-pretrained base", BACKTRACK_TOKEN, bt_id)
    else:
        used = init_backtrack_embedding(model, tokenizer, bt_id, cfg.bt_init)
    # generation reads attention/positions to pick its inference twin (keep / rewind)
    record_training(model, recipe=recipe, attention=cfg.layout.attention, positions=cfg.layout.positions,
                    backtrack_token_id=bt_id, lab=as_dict(cfg.lab), seed=cfg.seed)
    if cfg.lora.enabled:  # after the BT row is initialised: PEFT starts the trained row from it
        model = apply_lora(model, cfg.lora, bt_id)
    return model, bt_id, used, identity


def finish_run(out: Path, cfg, report: dict, step: int, label: str, saved: tuple[str, object] | None = None,
               before_label: str = "base", tags: tuple[str, str] = ("base", "sft")) -> dict:
    """eval.json, eval.md, TensorBoard (evaluation scalars and the settings), the console table, a few
    samples that backtracked, and a closing line: `saved` = (what, folder), then where the files are
    and the run's time. `report` holds "before" (the table calls it `before_label`: the lab base, or
    the model a DPO / GRPO / PRM run starts from), "after" and "seconds"; `tags` name the two in
    TensorBoard (eval/<tag>/<split>/<metric>)."""
    from halluc.core.config import flat_dict
    from halluc.inference.evaluate import TABLE_NOTE, backtrack_samples, log_to_tensorboard
    from halluc.pipeline.lab import eval_table

    write_whole(out / "eval.json", json.dumps(report, indent=2))  # what marks a run finished: never half written
    log_to_tensorboard(out / "tb", report["before"], tags[0], step)
    log_to_tensorboard(out / "tb", report["after"], tags[1], step, hparams=flat_dict(as_dict(cfg)))
    table = eval_table({before_label: report["before"], label: report["after"]}) + "\n\n" + TABLE_NOTE
    (out / "eval.md").write_text(table + "\n")
    print("\n" + table)
    if examples := backtrack_samples(report["after"]):
        print("\nsamples that backtracked (⌫ = one BT):\n" + examples)
    where = [f"{saved[0]}: {saved[1]}"] if saved else []
    where += [f"eval: {out / 'eval.json'}", f"tensorboard: {out / 'tb'}", f"total {report['seconds']['total']:.0f} s"]
    # a lab model a later recipe trains on its way (lab_sft_model) is not the run: say so
    cached = Path(out).resolve().is_relative_to(Path(cfg.cache_dir).resolve())
    print("\n" + ("the lab's model, cached for this and later runs: " if cached else "") + "   ".join(where))
    return report
