"""Glue between our examples and the HF Trainer (so DeepSpeed and PEFT plug in unchanged)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from halluc.data import IGNORE

log = logging.getLogger(__name__)


@dataclass
class LabelStats:
    """Counts the collator sees, read and reset by TokenStatsCallback at each log step."""

    tokens: int = 0          # real (non-pad) tokens
    response_tokens: int = 0  # non-prompt tokens: the ones that could carry a label
    masked_response: int = 0  # of those, labelled -100 (errors in masked mode)
    started: float = 0.0


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
                response = [lab for lab, role in zip(r["labels"], r["roles"]) if role != 0]
                self.stats.tokens += n
                self.stats.response_tokens += len(response)
                self.stats.masked_response += sum(lab == IGNORE for lab in response)
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


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
                  save_steps: int = 0, deepspeed: str | None = None, **extra) -> TrainingArguments:
    """fp32 on CPU (bf16 is ~23x slower there), bf16 on a GPU that supports it."""
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=weight_decay,
        logging_steps=max(1, min(log_every, steps // 4)),  # short runs still log a curve save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, seed=seed, data_seed=seed, report_to="none",
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        deepspeed=deepspeed, **extra)


def make_trainer(model, args: TrainingArguments, train_dataset, pad_id: int, tb_dir: str) -> Trainer:
    """A plain Trainer with our collator; TensorBoard gets loss, lr, tokens/s, masked fraction."""
    stats = LabelStats()
    # Our stats callback must come before TensorBoard's so its additions reach the event file.
    callbacks = [TokenStatsCallback(stats), TensorBoardCallback(SummaryWriter(tb_dir))]
    return Trainer(model=model, args=args, train_dataset=train_dataset,
                   data_collator=PadCollator(pad_id, stats), callbacks=callbacks)
