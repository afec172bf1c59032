"""The trainer's objective seam: a new objective trains through make_trainer without touching
the backends or the recipes, and its metrics reach the log and TensorBoard."""
import copy

import pytest
import torch

from halluc.core.config import LayoutSettings
from halluc.sources.data import build_sft_dataset
from halluc.sources.errors import ErrorConfig
from halluc.core.losses import sum_per_branch, target_log_probs
from halluc.core.model import tiny_llama
from halluc.core.tokens import add_backtrack_token
from halluc.training.train import TokenCrossEntropy, make_trainer, training_args


class MeanPerExampleNLL:
    """Each example's mean token NLL, averaged over examples (not over tokens): a per-example
    objective, like DPO's mean over pairs."""

    item_mean = False

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        t = model.targets(batch)
        nll = -target_log_probs(t.logits, t.ids)
        sums = sum_per_branch(nll, t.unit, t.branch, n_branches=1)[:, 0]
        counts = sum_per_branch(torch.ones_like(nll), t.unit, t.branch, n_branches=1)[:, 0]
        per_example = sums[counts > 0] / counts[counts > 0]
        return per_example.mean(), {"nll/longest_example": per_example.max().detach(), "examples": len(per_example)}


def test_a_new_objective_trains_and_logs_its_metrics(lab_tokenizer, arith_problems, tmp_path):
    torch.manual_seed(0)
    tok = copy.deepcopy(lab_tokenizer)
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=2)
    bt = add_backtrack_token(tok, model)
    data = build_sft_dataset(arith_problems[:128], tok, ErrorConfig(example_rate=0.5), bt)
    objective = MeanPerExampleNLL()
    args = training_args(str(tmp_path / "run"), steps=40, batch_size=16, lr=3e-3, log_every=10,
                         gradient_accumulation_steps=2)
    trainer = make_trainer(model, args, data, tb_dir=str(tmp_path / "tb"), objective=objective,
                           layout=LayoutSettings("block_errors", "rewound"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert objective.calls == 80 and trainer.backend == "dense_units"
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    assert all(h["examples"] == 16 and h["nll/longest_example"] > 0 for h in logs)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (tmp_path / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/nll/longest_example", "train/examples", "train/loss"} <= tags


class PerMicroBatchMean(TokenCrossEntropy):
    item_mean = False  # the negative control: each micro-batch's mean weighs the same


def test_token_level_losses_weigh_micro_batches_by_their_tokens(lab_tokenizer, arith_problems, tmp_path):
    """Gradient accumulation over 2 micro-batches of 8 trains exactly like one batch of 16 for token
    cross-entropy (the exact token mean: same loss, so the same gradient); weighing micro-batches
    equally instead gives another loss (micro-batches hold different numbers of trained tokens)."""
    tok = copy.deepcopy(lab_tokenizer)
    bt = add_backtrack_token(tok)
    data = build_sft_dataset(arith_problems[:16], tok, ErrorConfig(example_rate=0.5), bt)
    loss = {}
    for name, batch, accumulate, objective in (("one", 16, 1, TokenCrossEntropy()), ("two", 8, 2, TokenCrossEntropy()),
                                               ("two_unweighted", 8, 2, PerMicroBatchMean())):
        torch.manual_seed(0)
        model = tiny_llama(len(tok), hidden=32, layers=1, heads=2)
        args = training_args(str(tmp_path / name), steps=1, batch_size=batch, lr=0.0, log_every=1,
                             gradient_accumulation_steps=accumulate)
        trainer = make_trainer(model, args, data, tb_dir=str(tmp_path / name / "tb"), objective=objective)
        trainer.train()
        loss[name] = trainer.state.log_history[-1]["train_loss"]
    assert loss["two"] == pytest.approx(loss["one"], rel=1e-5)
    assert abs(loss["two_unweighted"] - loss["one"]) > 1e-4


@pytest.mark.gpu
def test_on_a_gpu_auto_picks_flex_and_the_objective_trains_in_bf16(lab_tokenizer, arith_problems, tmp_path):
    """The backend is chosen for the device the Trainer trains on, and block_errors + rewound
    trains through flex_attention in bf16 autocast (rows as plain dicts: no `datasets` needed)."""
    import random

    from halluc.sources.data import labels_from_roles, make_example

    tok = copy.deepcopy(lab_tokenizer)
    model = tiny_llama(len(tok), hidden=64, layers=2, heads=4)
    bt = add_backtrack_token(tok, model)
    rng = random.Random(0)
    rows = []
    for p in arith_problems[:256]:
        ex = make_example(p, tok, ErrorConfig(example_rate=0.5), bt, rng)
        rows.append({"input_ids": ex.ids, "roles": ex.roles, "labels": labels_from_roles(ex.ids, ex.roles)})
    args = training_args(str(tmp_path / "run"), steps=60, batch_size=32, lr=3e-3, log_every=10)
    assert args.bf16
    trainer = make_trainer(model, args, rows, tb_dir=str(tmp_path / "tb"),
                           layout=LayoutSettings("block_errors", "rewound"))
    assert trainer.backend == "flex"
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
