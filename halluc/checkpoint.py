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
