"""Glue between our examples and the HF Trainer (so DeepSpeed and PEFT plug in unchanged)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from halluc.backends import forward_loss
from halluc.data import IGNORE
from halluc.distributed import is_main, prepare_deepspeed, world_size
from halluc.example import Role
from halluc.packing import collate, layout_example

log = logging.getLogger(__name__)


@dataclass
class LabelStats:
    """Counts the collator sees, read and reset by TokenStatsCallback at each log step."""

    tokens: int = 0          # real (non-pad) tokens
    response_tokens: int = 0  # non-prompt tokens: the ones that could carry a label
    masked_response: int = 0  # of those, labelled -100 (errors in masked mode)
    started: float = 0.0

    def count(self, row: dict) -> None:
        response = [lab for lab, role in zip(row["labels"], row["roles"]) if role != Role.PROMPT]
        self.tokens += len(row["input_ids"])
        self.response_tokens += len(response)
        self.masked_response += sum(lab == IGNORE for lab in response)


class PadCollator:
    """Right-pads input_ids / labels / attention_mask; counts what the labels mask."""

    def __init__(self, pad_id: int, stats: LabelStats | None = None):
        self.pad_id, self.stats = pad_id, stats

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attn[i, :n] = 1
            if self.stats is not None:
                self.stats.count(r)
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


class TreeCollator:
    """Batches for the edit-tree backends: each example laid out with its `attn_end` and
    positions (technique 4), or rows already packed by `halluc.packing.pack_examples`."""

    def __init__(self, mode: str = "block_errors", positions: str = "original",
                 stats: LabelStats | None = None):
        self.mode, self.positions, self.stats = mode, positions, stats

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "attn_end" not in rows[0]:
            rows = [vars(layout_example(r, self.mode, self.positions)) for r in rows]
        if self.stats is not None:
            for r in rows:
                self.stats.count(r)
        batch = collate(rows)
        # The Trainer counts the tokens a step trains from `shift_labels` when a batch has it,
        # summed over devices and accumulation steps (num_items_in_batch). Our targets are the
        # labels that some position predicts (backends._targets), not HF's labels[..., 1:].
        batch["shift_labels"] = torch.where(batch["pred_pos"] >= 0, batch["labels"], IGNORE)
        return batch


class WrappedModel:
    """What forward_loss needs, when the Trainer hands compute_loss a DeepSpeedEngine or DDP.

    The wrapper must be *called* (its hooks gather ZeRO-3 shards and sync gradients) but has no
    HF attributes (config, device, dtype, set_attn_implementation): those come from the model
    inside. A PeftModel forwards both itself, so it needs no help.
    """

    def __init__(self, wrapper, inner):
        self.wrapper, self.inner = wrapper, inner

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class BacktrackTrainer(Trainer):
    """The HF Trainer with one change: the loss comes from `halluc.backends.forward_loss`,
    which realizes `attn_end` (a plain model(**batch) would silently ignore it)."""

    def __init__(self, *args, attention_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.attention_backend = attention_backend

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        loss, _ = forward_loss(model if inner is model else WrappedModel(model, inner), inputs,
                               self.attention_backend)
        if num_items_in_batch is not None and "shift_labels" in inputs:
            # The mean over this micro-batch -> its share of the mean over every token the
            # optimizer step trains (all devices, all accumulation steps), as the stock Trainer
            # does: DDP/DeepSpeed average gradients over processes, so scale that back up.
            # Then 2 processes x batch 4 train exactly like 1 process x batch 8.
            here = (inputs["shift_labels"] != IGNORE).sum()
            loss = loss * here / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


class RestoreAttentionCallback(TrainerCallback):
    """The edit-tree backends switch the model's attention function while training; put the
    original back at the end so generation and save_pretrained see an ordinary model."""

    def __init__(self, model):
        self.original = model.config._attn_implementation

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and model.config._attn_implementation != self.original:
            model.set_attn_implementation(self.original)


class TokenStatsCallback(TrainerCallback):
    """Adds tokens/s and the fraction of response tokens whose label is masked to each log."""

    def __init__(self, stats: LabelStats):
        self.stats = stats

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        s, now = self.stats, time.perf_counter()
        if logs is not None and s.tokens and "loss" in logs:
            extra = {"tokens_per_s": round(s.tokens / max(now - s.started, 1e-9), 1),
                     "masked_label_fraction": round(s.masked_response / max(s.response_tokens, 1), 4)}
            logs.update(extra)  # seen by the callbacks after this one (TensorBoard, progress)
            if state.log_history:  # and kept in trainer_state.json
                state.log_history[-1].update(extra)
        s.tokens = s.response_tokens = s.masked_response = 0
        s.started = now


def training_args(out_dir: str, *, steps: int, batch_size: int, lr: float, warmup: float = 0.05,
                  weight_decay: float = 0.0, seed: int = 0, log_every: int = 25,
                  save_steps: int = 0, save_total_limit: int | None = 2, drop_last: bool = False,
                  deepspeed: str | None = None, **extra) -> TrainingArguments:
    """fp32 on CPU (bf16 is ~23x slower there), bf16 on a GPU that supports it.

    save_steps > 0 writes `checkpoint-N` folders (model or adapter, optimizer, scheduler, RNG
    states, data position) that `trainer.train(resume_from_checkpoint=...)` continues from;
    the newest `save_total_limit` are kept. `deepspeed`: a ds_configs/*.json file; on CPU it
    runs over gloo (use_cpu=True, else accelerate sees one process and the batch check fails).
    drop_last: only full batches, so N processes x batch b see exactly the examples 1 process x
    batch N*b sees, epoch after epoch (with a short last batch, the shards are padded with
    examples from the start and the epochs drift apart). Needs one full global batch of data
    (the recipes turn it on when they have it).
    """
    on_gpu = torch.cuda.is_available()
    prepare_deepspeed(deepspeed)
    if not on_gpu and world_size() > 1:
        extra.setdefault("ddp_backend", "gloo")  # what DeepSpeed and DDP can use on CPU
    settings = dict(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=weight_decay,
        logging_steps=max(1, min(log_every, steps // 4)),  # short runs still log a curve
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        save_total_limit=save_total_limit, seed=seed, data_seed=seed, report_to="none",
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_drop_last=drop_last,
        disable_tqdm=False, deepspeed=deepspeed)
    return TrainingArguments(**{**settings, **extra})  # extra may override a default


def latest_checkpoint(out_dir) -> str | None:
    """The newest COMPLETE `checkpoint-N` in out_dir, or None.

    The Trainer writes a checkpoint in place, trainer_state.json last; a job killed while saving
    (preemption, kill -9) leaves a newer folder without it, which resuming must skip.
    """
    folder = Path(out_dir)
    found = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit()) if folder.is_dir() else []
    for step, path in reversed(found):
        if (path / "trainer_state.json").exists():
            return str(path)
        log.warning("skipping %s: incomplete (no trainer_state.json), killed while saving?", path)
    return None


def make_trainer(model, args: TrainingArguments, train_dataset, pad_id: int, tb_dir: str,
                 attention: str = "causal", positions: str = "original", backend: str = "auto",
                 packed: bool = False) -> Trainer:
    """TensorBoard gets loss, lr, tokens/s and the masked-label fraction.

    Plain causal attention on unpacked rows uses the stock Trainer and the model's own causal
    kernel. `block_errors`, rewound positions or packed rows go through the edit-tree
    backends (`backend`: auto, dense, dense_units, flex, varlen, varlen_kv).
    """
    stats = LabelStats()
    # Our stats callback must come before TensorBoard's so its additions reach the event file.
    callbacks = [TokenStatsCallback(stats)]
    if is_main():  # one event file per run, not one per process
        callbacks.append(TensorBoardCallback(SummaryWriter(tb_dir)))
    if attention == "causal" and positions == "original" and not packed:
        log.info("attention: causal, unpacked -> the model's own causal kernel")
        return Trainer(model=model, args=args, train_dataset=train_dataset,
                       data_collator=PadCollator(pad_id, stats), callbacks=callbacks)
    log.info("attention: %s, positions %s, %s -> edit-tree backend %s", attention, positions,
             "packed rows" if packed else "one example per row", backend)
    return BacktrackTrainer(model=model, args=args, train_dataset=train_dataset,
                            data_collator=TreeCollator(attention, positions, stats),
                            callbacks=callbacks + [RestoreAttentionCallback(model)],
                            attention_backend=backend)
