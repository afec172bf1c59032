"""Checkpoints in one place: saving what a stage trained, reloading it, resuming, and the record
of how a model was trained.

- `save_stage`: full weights (ZeRO-3 shards gathered by `save_model`) or a LoRA adapter with the
  BT rows (halluc.lora), the tokenizer beside them, and the model to continue with on this rank:
  after a DeepSpeed stage memory holds only shards (ZeRO-3), so rank 0 reloads what was saved.
- `latest_checkpoint` / `resume_from`: the newest complete `checkpoint-N` the HF Trainer wrote.
- `record_training` / `training_record`: `config.halluc`, saved in config.json with the model:
  the attention and positions it was trained with (generation picks its inference twin from
  them), the BT id, the recipe and its task settings.
"""
from __future__ import annotations

import logging
from pathlib import Path

from halluc.distributed import barrier, is_main, release_deepspeed_config, zero_stage

log = logging.getLogger(__name__)


def record_training(model, **fields) -> dict:
    """Set (update) `model.config.halluc`; returns the whole record."""
    record = {**(getattr(model.config, "halluc", None) or {}), **fields}
    model.config.halluc = record
    return record


def training_record(model) -> dict:
    """`config.halluc` of a model (or {} for a model halluc did not train)."""
    return dict(getattr(model.config, "halluc", None) or {})


def latest_checkpoint(out_dir) -> str | None:
    """The newest COMPLETE `checkpoint-N` in out_dir, or None.

    The Trainer writes a checkpoint in place, trainer_state.json last; a job killed while saving
    (preemption, kill -9) leaves a newer folder without it, which resuming must skip.
    """
    folder = Path(out_dir)
    found = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit()) if folder.is_dir() else []
    for _, path in reversed(found):
        if (path / "trainer_state.json").exists():
            return str(path)
        log.warning("skipping %s: incomplete (no trainer_state.json), killed while saving?", path)
    return None


def resume_from(out_dir, resume: bool) -> str | None:
    """Where a stage in `out_dir` continues from (logged), or None to start afresh."""
    start = latest_checkpoint(out_dir) if resume else None
    if start:
        log.info("resuming from %s", start)
    return start


def save_full(trainer, tokenizer, out_dir) -> None:
    """Every rank calls it (ZeRO-3 gathers the shards); rank 0 writes model + tokenizer."""
    trainer.save_model(str(out_dir))
    if is_main():
        tokenizer.save_pretrained(out_dir)
    barrier()
    release_deepspeed_config()  # from_pretrained would otherwise build a sharded model


def save_stage(trainer, model, tokenizer, out_dir, deepspeed: str | None = None,
               adapter_info: dict | None = None):
    """Save a finished stage; return the model to go on with on this rank.

    adapter_info (LoRA runs): written as halluc_adapter.json with the adapter (what its base
    must match). Every rank must call this. Without DeepSpeed the in-memory model is returned;
    with it, rank 0 reloads what was written and the other ranks get None.
    """
    from halluc.lora import load_adapter, save_adapter
    from halluc.model import load_causal_lm

    if adapter_info is None:
        save_full(trainer, tokenizer, out_dir)
        reload = lambda: load_causal_lm(str(out_dir))  # noqa: E731
    else:
        # ZeRO-3 holds shards: gather them (a collective, every rank) for rank 0 to write.
        state = trainer.accelerator.get_state_dict(trainer.deepspeed) if zero_stage(deepspeed) == 3 else None
        if is_main():
            save_adapter(model, tokenizer, out_dir, {**adapter_info, "halluc": training_record(model)},
                         state_dict=state)
        barrier()
        release_deepspeed_config()
        reload = lambda: load_adapter(out_dir)[0]  # noqa: E731
    if not deepspeed:
        return model
    return reload() if is_main() else None


# What a recipe run leaves in its output folder (a sweep's own run.log is not one of them).
RUN_ARTEFACTS = ("eval.json", "eval.md", "checkpoint", "adapter", "tb", "config.yaml")


def claim_output_dir(out_dir, resume: bool, overwrite: bool) -> None:
    """Refuse to run into a folder that holds an earlier run, unless told what to do with it.

    resume=true continues it (from its newest complete checkpoint-N, said in the log; with none,
    the log says the run starts from scratch); overwrite=true deletes the earlier run's files
    first. Either way nothing of two runs is mixed (checkpoints, eval.json, TensorBoard).
    """
    import shutil

    out = Path(out_dir)
    found = sorted(p.name for p in out.glob("*") if p.name in RUN_ARTEFACTS or p.name.startswith("checkpoint-")) \
        if out.is_dir() else []
    if not found:
        if resume:
            log.warning("resume=true, but %s holds no earlier run: starting from scratch", out)
        return
    finished = (out / "eval.json").exists()
    if overwrite:
        log.warning("overwrite=true: deleting the earlier run in %s (%s)", out, ", ".join(found))
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    if resume:
        start = latest_checkpoint(out)
        log.warning("resume=true: continuing the %s run in %s from %s", "finished" if finished else "partial",
                    out, start or "its start (no complete checkpoint-N; save_steps=N writes them)")
        return
    raise SystemExit(f"output_dir={out} already holds a {'finished' if finished else 'partial'} run "
                     f"({', '.join(found)}): pass resume=true to continue it, overwrite=true to replace it, "
                     f"or another output_dir")


def load_trained(path, dtype=None):
    """(model, tokenizer) of anything halluc saved: a full checkpoint folder (plain HF) or an
    adapter folder (LoRA + BT rows on the base it records). Errors name the folder."""
    import torch

    from halluc.lora import ADAPTER_INFO, load_adapter
    from halluc.model import check_model_path, load_causal_lm
    from halluc.tokens import ensure_pad_token, load_tokenizer

    dtype = dtype or torch.float32
    check_model_path(str(path))
    if (Path(path) / ADAPTER_INFO).exists():
        model, tokenizer = load_adapter(path, dtype=dtype)
        return model, ensure_pad_token(tokenizer)
    return load_causal_lm(str(path), dtype=dtype), load_tokenizer(path)
