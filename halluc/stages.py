"""The stages every recipe is made of: a base model, training stages, evaluation on rank 0.

A recipe gets a base (a local HF model, or the tiny lab base trained on clean data once and
cached), trains one or more stages with an objective (`train_stage`, halluc.train), saves them
(halluc.checkpoint) and evaluates on rank 0 while the other ranks wait (`evaluate_on_main`).
Under several processes every rank trains; only rank 0 evaluates and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from halluc.checkpoint import resume_from, save_full
from halluc.config import Stage, as_dict
from halluc.data import build_sft_dataset
from halluc.distributed import barrier, is_main, world_size
from halluc.errors import ErrorConfig
from halluc.evaluate import evaluate_problems, evaluation_version
from halluc.lab import LabConfig, ModelConfig, base_settings, lab_tokenizer
from halluc.model import load_causal_lm, tiny_llama
from halluc.packing import pack_examples
from halluc.train import make_trainer, training_args

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """How a recipe's stages train and save, whatever the objective: the same-named top-level
    settings of every recipe config (`RunSettings.of(cfg)`)."""

    seed: int = 0
    backend: str = "auto"
    pack: int = 0                   # >0: best-fit-decreasing packing into rows of this many tokens
    deepspeed: str | None = None
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = False

    @classmethod
    def of(cls, cfg) -> "RunSettings":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def train_stage(model, data, stage: Stage, out_dir: str, run: RunSettings, attention: str = "causal",
                positions: str = "original", objective=None, tokenizer=None):
    """Train `model` on `data` (examples, packed into rows when run.pack > 0) for one stage;
    resumes from the stage's newest checkpoint when run.resume. Returns the trainer.
    With `tokenizer`, every checkpoint-N folder holds it too (so it can be evaluated as is)."""
    packed = run.pack > 0
    if packed:
        rows = pack_examples(list(data), run.pack, attention, positions)
        log.info("packed %d examples into %d rows of %d tokens: %.1f%% real tokens", rows.n_units,
                 len(rows.rows), run.pack, 100 * rows.real_fraction)
        if rows.n_dropped:
            log.warning("%d of %d examples are longer than pack=%d tokens and were dropped: raise pack",
                        rows.n_dropped, rows.n_dropped + rows.n_units, run.pack)
        data = rows.rows
    if len(data) == 0:
        raise SystemExit(f"no training example left for {out_dir} (max_len / pack dropped them all)")
    args = training_args(out_dir, steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr, seed=run.seed,
                         deepspeed=run.deepspeed, save_steps=run.save_steps,
                         save_total_limit=run.save_total_limit,
                         drop_last=len(data) >= stage.batch_size * world_size())
    trainer = make_trainer(model, args, data, tb_dir=str(Path(out_dir) / "tb"), objective=objective,
                           attention=attention, positions=positions, backend=run.backend, packed=packed,
                           tokenizer=tokenizer)
    trainer.train(resume_from_checkpoint=resume_from(out_dir, run.resume))
    return trainer


def train_history(trainer) -> dict:
    """The logged losses of a finished stage, for reports."""
    losses = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    return {"final_loss": losses[-1][1] if losses else None, "steps": trainer.state.global_step,
            "losses": losses}


def lab_base_model(lab: LabConfig, tiny: ModelConfig, stage: Stage, train_problems, cache_dir: str,
                   run: RunSettings, max_len: int = 256, num_proc: int | None = None):
    """(model, tokenizer, folder) of the tiny lab base trained on clean problems, cached under
    cache_dir by its settings: the first run trains it, later runs (any arm of a sweep) reuse it.
    A file lock makes concurrent runs with the same settings train it once."""
    # everything the base's weights depend on (the global batch through the number of processes)
    key = json.dumps([base_settings(lab), as_dict(tiny), as_dict(stage), run.seed, run.pack, max_len, world_size()],
                     sort_keys=True)
    cached = Path(cache_dir) / f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    with _lock(cached.with_suffix(".lock")):
        if (cached / "train.json").exists():  # written last: a base killed while saving is trained again
            log.info("reusing the cached base model %s", cached)
            return load_causal_lm(str(cached)), AutoTokenizer.from_pretrained(cached), cached
        tokenizer = lab_tokenizer(train_problems, tiny.vocab_size)
        model = tiny_llama(len(tokenizer), tiny.hidden, tiny.layers, tiny.heads, init_range=tiny.init_range,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        log.info("training the tiny base (%.2fM params) on clean %s for %d steps", model.num_parameters() / 1e6,
                 lab.task, stage.steps)
        data = build_sft_dataset(train_problems, tokenizer, ErrorConfig(source="none"), None, max_len=max_len,
                                 num_proc=num_proc, seed=run.seed)
        trainer = train_stage(model, data, stage, str(cached) + ".run", run, tokenizer=tokenizer)
        save_full(trainer, tokenizer, cached)
        (cached / "train.json").write_text(json.dumps(train_history(trainer)))
    if run.deepspeed:  # continue from the saved weights (under ZeRO-3 memory holds only shards)
        model = load_causal_lm(str(cached))
    return model, tokenizer, cached


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive file lock (one process; under a launcher every rank trains together instead)."""
    if world_size() > 1:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evaluate_on_main(model, tokenizer, splits: dict, task, max_new_tokens: int, label: str,
                     cache_dir: Path | None = None) -> dict | None:
    """{split: metrics} on rank 0 while the others wait (raise ddp_timeout for very long
    evaluations); None on the other ranks. With cache_dir (a cached base model's folder), reuse
    or write the results there: the base's evaluation is the same for every arm of a sweep.
    The file is keyed by the settings and the scoring code's hash."""
    results = None
    cache_file = None
    if cache_dir is not None:
        problems = json.dumps({k: [p.prompt for p in v] for k, v in sorted(splits.items())})
        key = f"{max_new_tokens}-{problems}-{evaluation_version()}"
        cache_file = Path(cache_dir) / f"eval-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    if is_main():
        if cache_file is not None and Path(cache_file).exists():
            log.info("reusing the evaluation in %s", cache_file)
            results = json.loads(Path(cache_file).read_text())
        else:
            model.eval()
            results = {name: evaluate_problems(model, tokenizer, problems, task, max_new_tokens,
                                               desc=f"eval {label} {name}")
                       for name, problems in splits.items()}
            if cache_file is not None:  # written whole or not at all: a run reading it never sees half
                tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(results))
                os.replace(tmp, cache_file)
    barrier()
    return results
