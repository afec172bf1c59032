"""Technique 7: a process reward model, a causal LM with a token-classification head.

Data: TRL's stepwise rows (`prompt`, `completions` = steps, `labels` = per step, True = the text so
far is right), e.g. from halluc.sources.step_labels. A row becomes one sequence, prompt then the steps, with
the label at the last token of each step (TRL's PRMTrainer convention; halluc's steps carry their
separator, so TRL's `step_separator` is ""): `prm_example`. tests/test_prm.py checks it against
TRL's own `tokenize_row`.

Model: `AutoModelForTokenClassification` with 2 labels from any causal-LM checkpoint (the head is
new; the trunk is the checkpoint's), trained by the shared trainer with `StepClassification`
(cross-entropy at the labelled step ends; the trainer weighs micro-batches by their step counts)
and saved as a plain HF folder. `step_scores` reads P(right) at given positions.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from halluc.core.example import IGNORE_INDEX
from halluc.core.losses import balanced_cross_entropy
from halluc.core.inputs import InputError

log = logging.getLogger(__name__)


def prm_example(row: dict, tokenizer=None) -> dict:
    """{input_ids, labels, step_ends} of one stepwise row: its stored token ids (`prompt_ids`,
    `completion_ids`) or, without them, the texts tokenized piece by piece (the prompt with the
    tokenizer's special tokens, each step without)."""
    if row.get("prompt_ids") is not None and row.get("completion_ids") is not None:
        prompt, steps = list(row["prompt_ids"]), [list(s) for s in row["completion_ids"]]
    elif tokenizer is not None:
        prompt = tokenizer(row["prompt"])["input_ids"]
        from halluc.core.tokens import continuation_ids

        steps = continuation_ids(tokenizer, row["completions"])
    else:
        raise ValueError("a stepwise row without token ids needs a tokenizer")
    if len(steps) != len(row["labels"]):
        raise ValueError(f"{len(steps)} steps but {len(row['labels'])} labels")
    ids, labels, ends = list(prompt), [IGNORE_INDEX] * len(prompt), []
    for step, label in zip(steps, row["labels"]):
        if not step:
            raise ValueError(f"an empty step in {row.get('prompt', '')[:60]!r}")
        ids += step
        labels += [IGNORE_INDEX] * (len(step) - 1) + [int(bool(label))]
        ends.append(len(ids) - 1)
    return {"input_ids": ids, "labels": labels, "step_ends": ends}


def read_stepwise(path) -> list[dict]:
    """Stepwise rows from a .jsonl file or a `datasets` folder; errors name the file and line."""
    from halluc.tasks.jsonl import iter_jsonl_rows

    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        return [dict(r) for r in load_from_disk(str(path))]
    rows = []
    for n, row in iter_jsonl_rows(path):
        missing = [k for k in ("prompt", "completions", "labels") if k not in row]
        if missing:
            raise InputError(f"{path}:{n}: a stepwise row needs prompt, completions and labels; "
                             f"missing {', '.join(missing)}")
        if not row["completions"]:
            raise InputError(f"{path}:{n}: completions is empty: a stepwise row needs at least one step")
        if len(row["completions"]) != len(row["labels"]):
            raise InputError(f"{path}:{n}: {len(row['completions'])} completions but {len(row['labels'])} labels")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no stepwise rows")
    return rows


def write_stepwise(path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class StepCollator:
    """Right-padded batches of prm_example dicts; `shift_labels` marks the items (labelled steps) the
    trainer counts to weigh micro-batches."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = right_padded([r["input_ids"] for r in rows], self.pad_id)
        labels, _ = right_padded([r["labels"] for r in rows], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "shift_labels": labels}


def right_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, longest), of sequences padded on the right with `pad`."""
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(list(s), dtype=torch.long), 1
    return ids, mask


class StepClassification:
    """Cross-entropy of the PRM's 2-way logits at the labelled step ends (label 1 = still right), the two
    classes weighed alike (halluc.core.losses.balanced_cross_entropy)."""

    item_mean = True
    backend = "native"  # the PRM runs its own plain forward over one solution per row

    def collator(self, layout, tokenizer):
        return StepCollator(tokenizer.pad_token_id or 0)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at = batch["labels"] != IGNORE_INDEX
        if not bool(at.any()):  # every step end cut off by max_len: nothing to learn, and no NaN
            return 0.0 * logits.sum(), {}
        picked, labels = logits[at].float(), batch["labels"][at]
        loss = balanced_cross_entropy(picked, labels)  # wrong steps are rare: both classes weigh alike
        right = labels == 1
        metrics = {"step_acc": (picked.argmax(-1) == labels).float().mean()}
        if bool((~right).any()):
            metrics["wrong_step_recall"] = (picked[~right].argmax(-1) == 0).float().mean()
        return loss, metrics


def load_prm(path: str, dtype=torch.float32, new_head: bool = False):
    """A trained PRM folder; with new_head, also any causal-LM checkpoint to start one from (2 labels,
    a fresh classification head)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    from halluc.core.inputs import check_model_path

    check_model_path(path, "PRM")
    config = AutoConfig.from_pretrained(path)
    fresh = not any(a.endswith("ForTokenClassification") for a in (config.architectures or []))
    if fresh and not new_head:
        raise InputError(f"{path} is not a PRM (its architectures are {config.architectures}; a PRM is a "
                         "...ForTokenClassification folder from recipes/prm.py), and it has no verifier head")
    kwargs = {"num_labels": 2, "id2label": {0: "wrong", 1: "right"}, "label2id": {"wrong": 0, "right": 1}} if fresh else {}
    if not fresh:
        return AutoModelForTokenClassification.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new head's weights missing: they are, by design
    try:
        prm = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    log.info("a PRM from %s with a new 2-label head (score.*: initialised, not loaded)", path)
    return prm


@torch.no_grad()
def step_scores(prm, sequences: list[list[int]], positions: list[list[int]], batch_size: int = 64,
                pad_id: int = 0) -> list[list[float]]:
    """P(right) that `prm` gives at `positions[i]` of `sequences[i]` (right-padded batches)."""
    def right(ids, mask):
        return prm(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., 1]

    return scores_at(prm, right, sequences, positions, batch_size, pad_id)


@torch.no_grad()
def scores_at(model, score, sequences: list[list[int]], positions: list[list[int]], batch_size: int,
              pad_id: int) -> list[list[float]]:
    """`score(ids, mask) -> (B, L)` over right-padded batches of `sequences`, read at `positions`."""
    device = next(model.parameters()).device
    model.eval()
    out: list[list[float]] = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = right_padded(sequences[start:start + batch_size], pad_id)
        values = score(ids.to(device), mask.to(device)).float().cpu()
        out += [[float(values[b, p]) for p in positions[start + b]] for b in range(len(ids))]
    return out
