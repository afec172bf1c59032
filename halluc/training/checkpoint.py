"""Checkpoints in one place: saving what a stage trained, reloading it, resuming, and the record
of how a model was trained.

- `save_stage`: full weights (ZeRO-3 shards gathered by `save_model`) or a LoRA adapter with the
  BT rows (halluc.training.lora), the tokenizer beside them, and the model to continue with on this rank:
  after a DeepSpeed stage memory holds only shards (ZeRO-3), so rank 0 reloads what was saved.
- `latest_checkpoint` / `resume_from`: the newest complete `checkpoint-N` the HF Trainer wrote.
- `record_training` / `training_record`: `config.halluc`, saved in config.json with the model:
  the attention and positions it was trained with (generation picks its inference twin from
  them), the BT id, the recipe and its task settings.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from halluc.core.distributed import barrier, is_main, release_deepspeed_config, zero_stage

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
    from halluc.training.lora import load_adapter, save_adapter
    from halluc.core.model import load_causal_lm

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


# What a recipe run leaves in its output folder (a sweep's own run.log is not one of them;
# config.yaml alone is a run that failed before it trained anything).
RUN_ARTEFACTS = ("eval.json", "eval.md", "checkpoint", "adapter", "tb")
NOT_COMPARED = ("resume", "overwrite", "output_dir")  # may differ between a run and its resumption


_HELD: dict[str, object] = {}  # output folders this process holds: their locks live as long as it does


def hold_output_dir(out: Path) -> None:
    """An exclusive lock on output_dir (`.halluc.lock`, holding the pid) for the life of this process:
    a second run into the same folder, resumed or not, is refused while this one is alive, and a
    killed run's lock goes with it. A process running several stages into one folder holds it once."""
    import fcntl
    import os

    key = str(out.resolve())
    if key in _HELD:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".halluc.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"another process (pid {pid}) is using output_dir={out}: wait for it to end, "
                         "or choose another output_dir") from None
    except OSError as e:  # a filesystem without flock (some cluster mounts): run, unguarded
        f.close()
        log.warning("cannot lock output_dir=%s (%s): a second run into it would not be refused", out, e)
        _HELD[key] = None
        return
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = f


def claim_output_dir(cfg, delete: bool = True) -> None:
    """Refuse to run into a folder that holds an earlier run, unless told what to do with it.

    resume=true continues it (from its newest complete checkpoint-N, said in the log) if it was
    made with the same settings (config.yaml; the differences are named otherwise), and refuses a
    finished run with nothing to resume from; overwrite=true deletes the earlier run's files
    first (only with `delete`: under a launcher every rank checks, rank 0 deletes), but never a
    folder the run reads (model=, data=). Nothing of two runs is ever mixed.
    """
    import shutil

    import yaml

    from halluc.core.config import as_dict, flat_dict

    out = Path(cfg.output_dir)
    artefacts = RUN_ARTEFACTS + getattr(cfg, "run_artefacts", ())  # a recipe's own (MCTS: trees.jsonl, ...)
    found = sorted(p.name for p in out.glob("*")
                   if p.name in artefacts or p.name.startswith(("checkpoint-", "round-", "phase-"))) \
        if out.is_dir() else []
    if not found:
        if cfg.resume:
            log.warning("resume=true, but %s holds no earlier run: starting from scratch", out)
        return
    finished = (out / "eval.json").exists()
    if cfg.overwrite:
        from halluc.core.inputs import check_reads_outside

        reads = {name: getattr(cfg, name, None) for name in ("model", "data")}
        check_reads_outside(str(out), {k: v for k, v in reads.items() if isinstance(v, str)},  # MCTS's data: settings
                            "overwrite=true would delete {name}={source}, which this run reads: choose another output_dir")
        log.warning("overwrite=true: deleting the earlier run in %s (%s)", out, ", ".join(found))
        if delete:
            for name in found:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    if cfg.resume:
        saved = out / "config.yaml"
        if saved.exists():
            before = flat_dict(yaml.safe_load(saved.read_text()) or {})
            now = flat_dict(as_dict(cfg))
            changed = sorted(k for k in set(before) | set(now)
                             if k not in NOT_COMPARED and _normal(before.get(k)) != _normal(now.get(k)))
            if changed:
                raise SystemExit(f"resume=true: {out} was made with other settings ("
                                 + ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
                                 + "): resume with the same settings, or overwrite=true")
        start = latest_checkpoint(out)
        if finished and start is None and not any(n.startswith("round-") for n in found):
            raise SystemExit(f"resume=true: {out} holds a finished run with no checkpoint-N to resume from; "
                             "overwrite=true replaces it")
        log.warning("resume=true: continuing the %s run in %s from %s", "finished" if finished else "partial",
                    out, start or "its start (no complete checkpoint-N; save_steps=N writes them)")
        return
    raise SystemExit(f"output_dir={out} already holds a {'finished' if finished else 'partial'} run "
                     f"({', '.join(found)}): pass resume=true to continue it, overwrite=true to replace it, "
                     f"or another output_dir")


def _normal(value):
    """Settings as YAML reads them back (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def load_trained(path, dtype=None, base: str | None = None):
    """(model, tokenizer) of anything halluc saved: a full checkpoint folder (plain HF), an
    adapter folder or a LoRA run's checkpoint-N (LoRA + BT rows on the base it records, or on
    `base`). Errors name the folder."""
    import torch

    from halluc.training.lora import ADAPTER_INFO, load_adapter, read_adapter_info
    from halluc.core.model import check_model_path, load_causal_lm
    from halluc.core.tokens import ensure_pad_token, load_tokenizer

    dtype = dtype or torch.float32
    check_model_path(str(path))
    folder = Path(path)
    if (folder / ADAPTER_INFO).exists():
        recorded = read_adapter_info(folder).get("base_path")
        base = base or recorded
        if base and not Path(base).exists() and recorded == base and Path(str(base)).is_absolute():
            raise FileNotFoundError(f"the adapter {path} was trained on {base}, which is not there any more: "
                                    "give the base's folder (--base DIR)")
        model, tokenizer = load_adapter(path, base_dir=base, dtype=dtype)
        return model, ensure_pad_token(tokenizer)
    if (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} holds a PEFT adapter without {ADAPTER_INFO} (not saved by halluc): "
                                "load it with peft, or merge it first")
    return load_causal_lm(str(path), dtype=dtype), load_tokenizer(path)


class AdapterInfoCallback(TrainerCallback):
    """Writes halluc_adapter.json (the base it needs, how it was trained) into every checkpoint-N of
    a LoRA run, so an intermediate checkpoint loads like the final adapter folder."""

    def __init__(self, info: dict, model):
        self.info, self.model = info, model

    def on_save(self, args, state, control, **kwargs):
        import json

        from halluc.training.lora import ADAPTER_INFO

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main() and folder.is_dir():
            (folder / ADAPTER_INFO).write_text(json.dumps({**self.info, "halluc": training_record(self.model)},
                                                          indent=2))
        return control
