"""Glue between our examples and the HF Trainer (so DeepSpeed and PEFT plug in unchanged).

A recipe trains with `make_trainer(model, args, data, tb_dir, objective=...)`: the collator lays
every example out as an edit tree (halluc.structure.packing), the backend that realises it is chosen once
(halluc.structure.backends), and the objective turns the targets of one forward into a loss. Token
cross-entropy is the default; preference and step-classification objectives plug in the same way.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

if not torch.cuda.is_available():  # DeepSpeed (accelerate imports it) warns on every run that it guessed the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.integrations import TensorBoardCallback  # noqa: E402

from halluc.structure.backends import TargetModel, use_backend
from halluc.core.config import LayoutSettings
from halluc.core.distributed import is_main, prepare_deepspeed, world_size
from halluc.core.example import IGNORE_INDEX, Role
from halluc.core.losses import token_cross_entropy
from halluc.structure.packing import collate, layout_example

log = logging.getLogger(__name__)


@dataclass
class LabelStats:
    """Counts the collator sees, read and reset by TokenStatsCallback at each log step."""

    tokens: int = 0          # real (non-pad) tokens
    response_tokens: int = 0  # non-prompt tokens: the ones that could carry a label
    masked_response: int = 0  # of those, labelled -100 (errors in masked mode)
    started: float = 0.0

    def count(self, row: dict) -> None:
        # numpy, not a Python loop over tokens: this runs for every row of every batch (a
        # per-token loop with enum comparisons was ~9 ms of a ~90 ms step on the lab base)
        roles, labels = np.asarray(row["roles"]), np.asarray(row["labels"])
        n = min(len(roles), len(labels))
        response = roles[:n] != Role.PROMPT
        self.tokens += len(row["input_ids"])
        self.response_tokens += int(response.sum())
        self.masked_response += int((labels[:n][response] == IGNORE_INDEX).sum())


class TreeCollator:
    """Batches for every backend (halluc.structure.packing.collate): each example laid out with its
    `attn_end`, positions and branch ids (technique 4), or rows already packed by
    `halluc.structure.packing.pack_examples`. Counts what the labels mask into `stats`."""

    def __init__(self, mode: str = "causal", positions: str = "original", stats: LabelStats | None = None):
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
        batch["shift_labels"] = torch.where(batch["pred_pos"] >= 0, batch["labels"], IGNORE_INDEX)
        return batch


class Objective(Protocol):
    """What a trainer minimises: `(model, batch) -> (loss, metrics)`.

    `model` is a `halluc.structure.backends.TargetModel` (its `targets(batch)` gives the logits that
    predict every trained token, with unit and branch); `metrics` are floats or 0-d tensors,
    averaged over the steps between two logs and logged under their own names (TensorBoard,
    trainer_state.json). `item_mean`: the loss is a mean over the items the collator marks in
    `shift_labels` (trained tokens for TreeCollator, pairs for halluc.objectives.dpo.PairCollator), so the
    trainer weighs micro-batches by their item counts (exact means over accumulation steps and
    devices); otherwise micro-batches weigh the same. An objective may define `attach(trainer)`,
    called once the trainer exists (e.g. to prepare a reference model with its accelerator),
    `fp32_inputs`, batch keys the trainer must not cast to DeepSpeed's bf16/fp16, and what it needs
    from a training stage (halluc.pipeline.stages.train_stage reads them): `collator(layout, tokenizer)` (how its batches are made; default TreeCollator), `laid_out = True` (its rows come laid
    out, e.g. preference pairs: never packed again) and `backend` (one it must run on).
    """

    item_mean: bool

    def __call__(self, model: TargetModel, batch: dict) -> tuple[torch.Tensor, dict]: ...


class TokenCrossEntropy:
    """The default objective: mean cross-entropy over the trained tokens (labels from roles)."""

    item_mean = True

    def __call__(self, model: TargetModel, batch: dict) -> tuple[torch.Tensor, dict]:
        t = model.targets(batch)
        return token_cross_entropy(t.logits, t.ids), {}


class ObjectiveTrainer(Trainer):
    """The HF Trainer (DeepSpeed, PEFT, checkpoints, logging unchanged) minimising an `Objective`.

    The backend that realises `attn_end` is set up once, here; the objective's metrics are
    averaged per log step (and across processes) and logged beside the loss.
    """

    def __init__(self, *args, objective: Objective, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:  # nn.DataParallel would split logits_to_keep across replicas
            raise ValueError("one process sees several GPUs: launch one process per GPU (torchrun / deepspeed)")
        self.objective = objective
        if hasattr(objective, "attach"):
            objective.attach(self)
        # the device the model will train on (under DeepSpeed it is not there yet)
        self.backend = use_backend(self.model, backend, device=self.args.device)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.objective(TargetModel(model, self.backend, self.accelerator.unwrap_model(model)), inputs)
        if model.training:  # evaluation passes do not leak into the training log
            for key, value in metrics.items():
                self._metrics[key].append(float(value))
        rescale = self.objective.item_mean and num_items_in_batch is not None and "shift_labels" in inputs
        if rescale:
            # The mean over this micro-batch -> its share of the mean over every item (token, pair)
            # the optimizer step trains (all devices, all accumulation steps), as the stock Trainer
            # does: DDP/DeepSpeed average gradients over processes, so scale that back up.
            # Then 2 processes x batch 4 train exactly like 1 process x batch 8.
            here = (inputs["shift_labels"] != IGNORE_INDEX).sum()
            loss = loss * here / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        # Read by training_step right after this call: divide by the accumulation steps unless
        # the token weighting above already did.
        self.loss_is_scaled_for_ga = bool(rescale)
        return (loss, None) if return_outputs else loss

    def _prepare_inputs(self, inputs):
        # Under DeepSpeed the Trainer casts float inputs to its bf16/fp16; an objective names the
        # batch values that must stay fp32 (`fp32_inputs`, e.g. precomputed log-prob sums).
        kept = {k: inputs.pop(k) for k in getattr(self.objective, "fp32_inputs", ()) if k in inputs}
        inputs = super()._prepare_inputs(inputs)
        inputs.update({k: v.to(self.args.device) for k, v in kept.items()})
        return inputs

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            means = {key: sum(v) / len(v) for key, v in self._metrics.items()}
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # every rank logs; one collective whatever keys each rank saw (objectives may
                # report a metric only for some batches)
                everyone = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(everyone, means)
                keys = sorted({k for m in everyone for k in m})
                means = {k: sum(m[k] for m in everyone if k in m) / sum(k in m for m in everyone) for k in keys}
            logs.update({key: round(value, 6) for key, value in means.items()})
            self._metrics.clear()
        super().log(logs, start_time)


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


def make_trainer(model, args: TrainingArguments, train_dataset, tb_dir: str, objective: Objective | None = None,
                 layout: LayoutSettings = LayoutSettings(), packed: bool = False, collator=None,
                 tokenizer=None) -> ObjectiveTrainer:
    """A Trainer for `objective` (default: token cross-entropy) on examples or packed rows.

    backend "auto": the model's own causal kernel ("native") for causal attention with original
    positions on one example per row, else the edit-tree backend for this device (dense_units
    on CPU, flex on GPU). TensorBoard gets loss, lr, tokens/s, the masked-label fraction and
    the objective's metrics.
    """
    attention, positions, backend = layout.attention, layout.positions, layout.backend
    plain = attention == "causal" and positions == "original" and not packed
    if backend == "auto" and plain:
        backend = "native"
    if backend == "native" and not plain:
        raise ValueError(f"backend=native runs the model's own causal kernel: it cannot realise "
                         f"attention={attention}, positions={positions}{', packed rows' if packed else ''}")
    stats = LabelStats()
    if collator is not None and getattr(collator, "stats", False) is None:
        collator.stats = stats  # tokens/s and the masked fraction for a tree collator passed in, too
    # Our stats callback must come before TensorBoard's so its additions reach the event file.
    callbacks = [TokenStatsCallback(stats), RestoreAttentionCallback(model)]
    if is_main():  # one event file per run, not one per process
        callbacks.append(TensorBoardCallback(SummaryWriter(tb_dir)))
    log.info("attention: %s, positions %s, %s, backend %s", attention, positions,
             "packed rows" if packed else "one example per row", backend)
    return ObjectiveTrainer(model=model, args=args, train_dataset=train_dataset,
                            data_collator=collator or TreeCollator(attention, positions, stats),
                            callbacks=callbacks, objective=objective or TokenCrossEntropy(), backend=backend,
                            processing_class=tokenizer)  # saved into every checkpoint-N
