"""Technique 10: a verifier head on the policy that predicts "this step is wrong".

The head is one linear unit on the policy's last hidden state (the input of the LM head), trained
jointly with the LM loss (`HeadObjective`: token cross-entropy + weight x BCE at step ends). It
rides on the LM head through a forward hook, so every edit-tree backend, packing, DeepSpeed and
`logits_to_keep` work unchanged:
- training (`lm_head.training`): the hook appends the head's logit to the LM logits, (..., V+1);
  `forward_targets` gathers the positions some target needs, and the objective splits them again.
  A step end's hidden state is the position that predicts the next token (after a wrong step: the
  first BT), so the collator attaches each step label to the target that position predicts.
- evaluation and generation: the logits are left alone; the head's logits at the positions the
  LM head saw are kept in `head.last` (generation: the newest token of every row), which is what
  guided decoding (halluc.inference.verifiers.HeadVerifier) reads, at the cost of one dot product.

Labels (`step_end_labels`): at the last token of every step of the trace (a token whose text holds
the task's step separator, the token before EOS, or the token before a BT run), 1 if a token of the
still-visible step is an error (Role.ERROR; a BT run that erased it makes the step right again),
else 0. The token before a BT run is where an error step is complete in the data (a wrong
`answer = 5` is followed by BTs, never by EOS): without it the head never saw a wrong answer step
(issue 23: all answer-step labels were "right", and its AUC fell below chance). Labels are
imbalanced (about one step in ten is wrong): the loss weighs the wrong ones by negatives/positives
of the batch (`balanced_bce`).

Saving: the head's weights leave the LM's safetensors for `verifier_head.safetensors` (and
`verifier_head.json`), so plain `AutoModelForCausalLM.from_pretrained` loads the LM without
unexpected keys, and `load_head(folder, model)` puts the head back.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# re-exported: torch-free, so recipes check a model folder for a head before torch loads
from halluc.core.config import HEAD_WEIGHTS, has_head  # noqa: F401
from halluc.core.example import IGNORE_INDEX, Role

HEAD_INFO = "verifier_head.json"
PREFIX = "verifier_head."


class VerifierHead(nn.Module):
    """logit of "the step that ends here is wrong" from the final hidden state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.last: torch.Tensor | None = None  # (B, positions) logits of the latest eval forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


def _hook(head: VerifierHead):
    def after_lm_head(module, args, logits):
        wrong = head(args[0])
        if module.training:
            return torch.cat([logits, wrong.unsqueeze(-1).to(logits.dtype)], dim=-1)
        head.last = wrong.detach().float()
        return logits
    return after_lm_head


def attach_head(model, head: VerifierHead | None = None) -> VerifierHead:
    """Give `model` (a causal LM, or a PeftModel around one) a verifier head: `model.verifier_head`
    (a submodule, so optimizers, DeepSpeed and state dicts see it) and the hook on its LM head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "verifier_head"):
        return inner.verifier_head
    head = head or VerifierHead(inner.config.hidden_size)
    inner.verifier_head = head.to(device=inner.device, dtype=inner.dtype)
    inner.get_output_embeddings().register_forward_hook(_hook(inner.verifier_head))
    return inner.verifier_head


def get_head(model) -> VerifierHead | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "verifier_head", None)


def split_head(folder) -> None:
    """Move the head's tensors out of a saved checkpoint's safetensors into HEAD_WEIGHTS."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    head: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        state = load_file(str(path))
        mine = {k: v for k, v in state.items() if k.startswith(PREFIX)}
        if mine:
            head.update({k[len(PREFIX):]: v for k, v in mine.items()})
            save_file({k: v for k, v in state.items() if k not in mine}, str(path), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith(PREFIX)}
        index.write_text(json.dumps(data, indent=2))
    if not head:
        raise ValueError(f"{folder}: the saved model holds no {PREFIX}* tensors (was the head attached?)")
    save_file(head, str(folder / HEAD_WEIGHTS), metadata={"format": "pt"})
    (folder / HEAD_INFO).write_text(json.dumps({"hidden": int(head["proj.weight"].shape[1]),
                                                "predicts": "logit that the step ending here is wrong"}))


def save_head_from(model, folder) -> None:
    """Write the live head (LoRA runs: the adapter folder has no full state dict to split)."""
    from safetensors.torch import save_file

    head = get_head(model)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(Path(folder) / HEAD_WEIGHTS), metadata={"format": "pt"})
    (Path(folder) / HEAD_INFO).write_text(json.dumps({"hidden": head.proj.in_features,
                                                      "predicts": "logit that the step ending here is wrong"}))


def load_head(folder, model) -> VerifierHead:
    """Attach the head saved in `folder` to `model` (loaded from the same folder)."""
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {HEAD_WEIGHTS} (train one with recipes/masked_sft.py "
                                "verifier_head_weight=0.5)")
    state = load_file(str(path))
    head = VerifierHead(state["proj.weight"].shape[1])
    head.load_state_dict(state)
    return attach_head(model, head)


def step_end_ids(tokenizer, separator: str) -> set[int]:
    """Ids of the tokens whose text holds the step separator (e.g. ";" or a newline)."""
    return {i for tok, i in tokenizer.get_vocab().items()
            if separator in tokenizer.convert_tokens_to_string([tok])}


def step_end_labels(ids: list[int], roles: list[int], ends: set[int], eos_id: int | None,
                    at_bt_runs: bool = True) -> list[int]:
    """Per token: 1 / 0 at the last token of a step whose visible tokens hold / lack an error,
    IGNORE_INDEX elsewhere (module docstring). A step ends at a separator token, before EOS, or
    before a BT run (at_bt_runs=False: the labels before issue 23, kept as a negative control)."""
    out = [IGNORE_INDEX] * len(ids)
    visible: list[bool] = []   # per visible response token: is it an error
    step_start = 0             # where the current step starts in `visible`
    for i, (t, r) in enumerate(zip(ids, roles)):
        if r == Role.PROMPT or t == eos_id:
            continue
        if r == Role.BACKTRACK:
            if visible:
                visible.pop()
            step_start = min(step_start, len(visible))
            continue
        visible.append(r == Role.ERROR)
        last = i + 1 == len(ids) or ids[i + 1] == eos_id
        before_bt = at_bt_runs and i + 1 < len(ids) and roles[i + 1] == Role.BACKTRACK
        if t in ends or last or before_bt:
            out[i] = int(any(visible[step_start:]))
            if not before_bt or t in ends or last:  # a BT run may erase part of the step: it goes on
                step_start = len(visible)
    return out


class HeadCollator:
    """TreeCollator batches plus `head_labels`: each target token gets the step label of the
    position that predicts it (IGNORE_INDEX where that position is no step end).

    A step end followed by a masked token (a right step, then an error step whose first token is
    no LM target) still needs its head label: that token becomes a target the LM loss skips
    (`head_only`), so the trainer's token count (`shift_labels`, made before) is unchanged."""

    def __init__(self, tree_collator, ends: set[int], eos_id: int | None):
        self.tree, self.ends, self.eos_id = tree_collator, ends, eos_id

    @property
    def stats(self):
        return self.tree.stats

    @stats.setter
    def stats(self, value):
        self.tree.stats = value

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from halluc.structure.packing import layout_example

        if "attn_end" not in rows[0]:
            rows = [vars(layout_example(r, self.tree.mode, self.tree.positions)) for r in rows]
        batch = self.tree(rows)
        step = torch.full_like(batch["labels"], IGNORE_INDEX)
        for b, r in enumerate(rows):
            step[b, :len(r["input_ids"])] = torch.tensor(step_end_labels(list(r["input_ids"]), list(r["roles"]),
                                                                         self.ends, self.eos_id))
        pred = batch["pred_pos"].clamp(min=0)
        head = torch.where(batch["pred_pos"] >= 0, step.gather(1, pred), IGNORE_INDEX)
        head_only = (head != IGNORE_INDEX) & (batch["labels"] == IGNORE_INDEX)
        batch["labels"] = torch.where(head_only, batch["input_ids"], batch["labels"])
        batch["head_labels"], batch["head_only"] = head, head_only
        return batch


class HeadObjective:
    """Token cross-entropy of the LM + weight x binary cross-entropy of the head at step ends."""

    item_mean = True  # micro-batches weigh by their trained tokens, like the LM loss alone

    def __init__(self, weight: float, step_separator: str = "\n"):
        self.weight, self.step_separator = weight, step_separator

    def collator(self, layout, tokenizer):
        """Tree-collated rows with the head's labels at every step end (the task's separator) and EOS."""
        from halluc.training.train import TreeCollator

        return HeadCollator(TreeCollator(layout.attention, layout.positions), step_end_ids(tokenizer, self.step_separator),
                            tokenizer.eos_token_id)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        from halluc.core.losses import balanced_bce, token_cross_entropy

        t = model.targets(batch)
        vocab = t.logits.shape[-1] - 1
        lm_target = ~batch["head_only"][t.row, t.col]  # not the masked tokens the head's labels ride on
        lm = token_cross_entropy(t.logits[lm_target, :vocab], t.ids[lm_target])
        labels = batch["head_labels"][t.row, t.col]
        at = labels != IGNORE_INDEX
        metrics = {"lm_loss": lm.detach()}
        if not bool(at.any()):
            return lm + 0.0 * t.logits[:, vocab].sum(), metrics
        wrong = t.logits[at, vocab].float()
        head = balanced_bce(wrong, labels[at].float())  # wrong steps are rare: both classes weigh alike
        metrics.update(head_loss=head.detach(), head_acc=((wrong > 0) == (labels[at] == 1)).float().mean())
        return lm + self.weight * head, metrics
