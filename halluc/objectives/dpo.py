"""Technique 6: prefer backtracking and correcting over continuing an error (DPO, IPO, TDPO).

`PreferenceObjective` plugs into the shared trainer (halluc.training.train's objective seam). One forward
of the policy over a batch of laid-out pairs (halluc.structure.pairs: the prompt once, two branches) gives
every completion token's log-prob; `sum_per_branch` turns them into per-pair chosen / rejected
sums, and `halluc.core.losses.preference_loss` into the loss (mean over pairs, as TRL). The reference
gives the same sums from the same batch layout without gradients:
- an explicit reference model (`ref_model=DIR`), on each process, or sharded by a ZeRO-3
  inference engine when the policy trains under ZeRO-3 (as TRL prepares it);
- under LoRA without one, the policy itself with its adapter disabled (no copy);
- for sigmoid / ipo, optionally log-probs computed once before training (`ref_logps` travelling
  with each pair's unit), cached on disk by data and reference weights. TDPO needs the reference's
  whole next-token distribution at every completion token: always live.

Logged per step (TRL's names): rewards/chosen, rewards/rejected (beta * log-ratio), rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, and for TDPO kl/chosen, kl/rejected.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from halluc.structure.backends import TargetModel, use_backend
from halluc.core.config import PREFERENCE_KINDS
from halluc.core.example import IGNORE_INDEX
from halluc.core.losses import preference_loss, sequential_kl, sum_per_branch, target_log_probs
from halluc.training.train import TreeCollator

log = logging.getLogger(__name__)


class PreferenceObjective:
    """Pairs -> mean per-pair preference loss (+ sft_weight x the token-mean NLL of the chosen
    completions, TRL's "sft" term). `reference`: a causal LM, or None for a PEFT policy's
    disabled adapter. loss="sft" trains the chosen completions alone (the control with the same
    data and no rejected side)."""

    # a mean over pairs: PairCollator marks one item per pair, so micro-batches with more pairs
    # (packed rows hold different numbers) weigh more, and the step's loss is the mean over its pairs
    item_mean = True
    # precomputed reference sums are -100s of nats: bf16 would round them by whole nats
    fp32_inputs = ("ref_logps",)
    laid_out = True  # pairs come laid out with the prompt once (halluc.structure.pairs): never packed again

    def collator(self, layout, tokenizer):
        return PairCollator()

    def __init__(self, loss: str = "sigmoid", beta: float = 0.1, alpha: float = 0.5, sft_weight: float = 0.0,
                 reference=None):
        if loss not in PREFERENCE_KINDS:
            raise ValueError(f"loss must be one of {', '.join(PREFERENCE_KINDS)}, not {loss!r}")
        self.loss, self.beta, self.alpha, self.sft_weight = loss, beta, alpha, sft_weight
        self.needs = PREFERENCE_KINDS[loss]  # what the loss needs: a reference, its token distributions
        self.reference = reference
        self._reference: TargetModel | None = None
        self._accelerator = None

    def attach(self, trainer) -> None:
        self._accelerator = trainer.accelerator

    def __call__(self, model: TargetModel, batch: dict) -> tuple[torch.Tensor, dict]:
        t = model.targets(batch)
        logps = target_log_probs(t.logits, t.ids)
        n_pairs = int(batch["unit_id"].max()) + 1
        policy = sum_per_branch(logps, t.unit, t.branch, n_pairs)
        lengths = sum_per_branch(torch.ones_like(logps), t.unit, t.branch, n_pairs)
        if bool((lengths == 0).any()):
            raise ValueError("a pair has no scored token in one branch (empty or unlabelled completion)")
        chosen_nll = -logps[t.branch == 0].mean()
        if not self.needs.reference:  # sft: the chosen side alone
            return chosen_nll, {"logps/chosen": policy[:, 0].mean().detach(),
                                "logps/rejected": policy[:, 1].mean().detach()}
        kl = None
        if "ref_logps" in batch and not self.needs.token_kl:
            reference = batch["ref_logps"].to(policy)
            if reference.shape != policy.shape:
                raise ValueError(f"ref_logps has shape {tuple(reference.shape)}, the batch has {n_pairs} pairs")
        else:
            with torch.no_grad():
                r = self.reference_targets(model, batch)
            if r.ids.shape != t.ids.shape or not torch.equal(r.ids, t.ids):
                raise RuntimeError("the reference scored other tokens than the policy (different backends?)")
            reference = sum_per_branch(target_log_probs(r.logits, r.ids), r.unit, r.branch, n_pairs)
            if self.needs.token_kl:
                kl = sum_per_branch(sequential_kl(t.logits, r.logits), t.unit, t.branch, n_pairs)
        loss = preference_loss(self.loss, policy, reference, self.beta, self.alpha, kl=kl, lengths=lengths).mean()
        if self.sft_weight:
            loss = loss + self.sft_weight * chosen_nll
        return loss, preference_metrics(policy.detach(), reference, self.beta, kl)

    def reference_targets(self, model: TargetModel, batch: dict):
        if self.reference is None:  # LoRA: the policy with its adapter (and trained BT rows) off
            if not hasattr(model.inner, "disable_adapter"):
                raise ValueError("no reference model: only a PEFT (LoRA) policy can be its own reference")
            with model.inner.disable_adapter():
                return model.targets(batch)
        if self._reference is None:
            self._reference = prepare_reference(self.reference, model, self._accelerator)
        return self._reference.targets(batch)


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float, kl=None) -> dict:
    """TRL's DPO metrics for one batch of pairs ((P, 2) log-prob sums)."""
    rewards = beta * (policy - reference)
    metrics = {"rewards/chosen": rewards[:, 0].mean(), "rewards/rejected": rewards[:, 1].mean(),
               "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float().mean(),
               "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
               "logps/chosen": policy[:, 0].mean(), "logps/rejected": policy[:, 1].mean()}
    if kl is not None:
        metrics.update({"kl/chosen": kl[:, 0].mean().detach(), "kl/rejected": kl[:, 1].mean().detach()})
    return metrics


def prepare_reference(reference, policy: TargetModel, accelerator=None) -> TargetModel:
    """The reference, frozen, with the policy's attention backend and its precision, as TRL
    prepares it: under DeepSpeed a DeepSpeed inference engine with the policy's config (sharded
    under ZeRO-3, stage 0 otherwise: its dtype, one copy per process); else `accelerator.
    prepare_model(evaluation_mode=True)` (the policy's device and mixed-precision autocast)."""
    reference.eval().requires_grad_(False)
    use_backend(reference, policy.backend, device=policy.device)
    module = reference
    if accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        import copy

        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        if config["zero_optimization"].get("stage") != 3:
            config["zero_optimization"]["stage"] = 0  # no sharding: a copy per process
        module, *_ = deepspeed.initialize(model=reference, config=config)  # places it: no .to() before
        module.eval()
        log.info("reference model under DeepSpeed (ZeRO stage %s)", config["zero_optimization"]["stage"])
    elif accelerator is not None:
        module = accelerator.prepare_model(reference, evaluation_mode=True)
    else:
        reference.to(policy.device)
    return TargetModel(module, policy.backend, reference)


class PairCollator(TreeCollator):
    """Laid-out pair rows (halluc.structure.pairs.pair_rows) -> a batch. `shift_labels` marks one item per
    pair (its unit's first token): what the trainer counts to weigh micro-batches (the loss is a
    mean over pairs). Precomputed reference log-probs, when the rows have them, as `ref_logps`
    (pairs, 2) in the batch's unit order."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        unit = batch["unit_id"]
        first = torch.ones_like(unit, dtype=torch.bool)
        first[:, 1:] = unit[:, 1:] != unit[:, :-1]
        batch["shift_labels"] = torch.where(first & (unit >= 0), 0, IGNORE_INDEX)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.cat([torch.as_tensor(r["ref_logps"]).reshape(-1, 2) for r in rows])
        return batch


def disable_dropout(model) -> None:
    """Dropout off (TRL's disable_dropout): the policy and reference log-probs of a pair are then
    deterministic, and lr=0 logs exactly the loss of the batch."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model, "config") and hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


@torch.no_grad()
def reference_log_probs(reference, rows: list[dict], backend: str, batch_size: int = 16,
                        device=None) -> list[list[float]]:
    """Per pair (in row order, units in order), the reference's [chosen, rejected] log-prob sums,
    in the precision training uses (bf16 autocast on a GPU that has it, as halluc.training.train's
    training_args). The model's attention implementation is put back afterwards."""
    from tqdm.auto import tqdm

    original = reference.config._attn_implementation
    reference.eval()
    if device is not None:
        reference.to(device)
    backend = use_backend(reference, backend)
    model = TargetModel(reference, backend)
    collate = TreeCollator()
    on_gpu = reference.device.type == "cuda"
    out = []
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and torch.cuda.is_bf16_supported()):
            for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", unit="batch", leave=False):
                batch = collate(rows[start:start + batch_size])
                t = model.targets(batch)
                n = int(batch["unit_id"].max()) + 1
                out.extend(sum_per_branch(target_log_probs(t.logits, t.ids), t.unit, t.branch, n).cpu().tolist())
    finally:
        if reference.config._attn_implementation != original:
            reference.set_attn_implementation(original)
    return out


def precomputed_reference(reference, rows: list[dict], backend: str, cache_dir, batch_size: int = 16,
                          device=None) -> list[dict]:
    """`rows` with `ref_logps` added, computed once and cached under cache_dir by the rows' tokens,
    the reference's weights (halluc.training.lora.fingerprint), the backend and the device type (bf16 on a
    GPU, fp32 on CPU)."""
    import numpy as np

    from halluc.core.artifacts import build_once, write_whole
    from halluc.core.distributed import is_main
    from halluc.training.lora import fingerprint

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    digest = hashlib.sha256(f"{fingerprint(reference)} {backend} {device.type}".encode())
    for r in rows:
        for key in ("input_ids", "labels", "attn_end", "position_ids", "pred_pos", "branch_ids", "unit_starts"):
            digest.update(np.asarray(r[key], dtype=np.int64).tobytes())
    cache = Path(cache_dir) / f"ref-logps-{digest.hexdigest()[:16]}.json"  # its own key: the rows' tokens, streamed
    with build_once(cache, what="the reference log-probs") as build:  # every rank computes, rank 0 writes
        if build:
            values = reference_log_probs(reference, rows, backend, batch_size, device)
            if is_main():
                write_whole(cache, json.dumps(values))
        else:
            values = json.loads(cache.read_text())
    out, i = [], 0
    for r in rows:
        n = len(r["unit_starts"])
        out.append({**r, "ref_logps": np.asarray(values[i:i + n], dtype=np.float32)})
        i += n
    return out


def check_reference_tokenizer(path: str, tokenizer) -> None:
    """Fail early (before any evaluation) when the reference cannot score the policy's token ids."""
    from halluc.core.tokens import has_backtrack, load_tokenizer

    theirs = load_tokenizer(path)
    if not has_backtrack(theirs) or theirs.get_vocab() != tokenizer.get_vocab():
        why = "has no <|BACKTRACK|> token" if not has_backtrack(theirs) else "is not the policy's tokenizer"
        raise SystemExit(f"ref_model={path}: its tokenizer {why}; a reference must score the same token ids "
                         "(give the SFT checkpoint the policy came from)")


def load_reference(path: str, tokenizer):
    """The reference model from `path` (its tokenizer checked at the start of the run): it must
    have the BT row the policy's tokenizer names."""
    from halluc.core.model import load_causal_lm

    reference = load_causal_lm(path)
    if reference.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise SystemExit(f"ref_model={path}: its embedding has {reference.get_input_embeddings().weight.shape[0]} rows, "
                         f"fewer than the tokenizer's {len(tokenizer)}: the BT row is missing")
    return reference
