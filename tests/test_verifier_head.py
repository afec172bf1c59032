"""Technique 10: the verifier head's labels, its checkpoint round trip, and joint training."""
from __future__ import annotations

import pytest
import torch
from conftest import load_script

from halluc.core.example import IGNORE_INDEX, Role
from halluc.objectives.verifier_head import (HEAD_WEIGHTS, attach_head, get_head, load_head, split_head, step_end_labels,
                                  step_end_ids)

P, K, E, B, C = Role.PROMPT, Role.KEPT, Role.ERROR, Role.BACKTRACK, Role.CORRECTION
END, EOS, BT = 9, 0, 7


def test_step_labels_mark_the_end_of_a_wrong_step_and_not_its_correction():
    # prompt | step 1 right "1 2 ;" | step 2 "3" right prefix, "4 ;" wrong, BT BT, "5 ;" correction | "6" answer, EOS
    ids = [1, 1, 1, 2, END, 3, 4, END, BT, BT, 5, END, 6, EOS]
    roles = [P, P, K, K, K, K, E, E, B, B, C, C, K, K]
    got = step_end_labels(ids, roles, {END}, EOS)
    want = [IGNORE_INDEX] * len(ids)
    want[4], want[7], want[11], want[12] = 0, 1, 0, 0  # right, wrong, right again after the BTs, answer
    assert got == want
    # negative control: the same trace read without roles (all kept) labels nothing wrong
    assert 1 not in step_end_labels(ids, [P, P] + [K] * 12, {END}, EOS)
    # an error left visible (no BT) stays wrong at every later step end? No: labels are per step
    ids2, roles2 = [1, 2, END, 3, END, EOS], [P, E, E, K, K, K]
    assert step_end_labels(ids2, roles2, {END}, EOS) == [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX, 0, IGNORE_INDEX]


def test_step_end_ids_are_the_tokens_holding_the_separator(bt_tokenizer):
    ends = step_end_ids(bt_tokenizer, ";")
    assert ends and all(";" in bt_tokenizer.decode([i]) for i in ends)
    ids = bt_tokenizer(" b = a + 2 = 4 + 2 = 6 ; c = b * a", add_special_tokens=False)["input_ids"]
    assert sum(i in ends for i in ids) == 1


def _tiny(tok):
    from halluc.core.model import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)


def test_the_checkpoint_round_trips_and_plain_hf_loads_the_lm(tmp_path, bt_tokenizer):
    from transformers import AutoModelForCausalLM

    model = _tiny(bt_tokenizer)
    head = attach_head(model)
    torch.nn.init.normal_(head.proj.weight, std=0.5)
    ids = torch.tensor([bt_tokenizer(" a = 3 , b = a + 1 . b ? b = a + 1 = 3 + 1 = 4 ;")["input_ids"]])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    scores = head.last.clone()
    assert logits.shape[-1] == len(bt_tokenizer) and scores.shape == ids.shape  # eval: logits untouched
    model.train()
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == len(bt_tokenizer) + 1  # training: head appended

    model.save_pretrained(tmp_path / "raw")
    model.save_pretrained(tmp_path / "ckpt")
    split_head(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / HEAD_WEIGHTS).exists()
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits)
    assert get_head(plain) is None
    load_head(tmp_path / "ckpt", plain)
    with torch.no_grad():
        plain(input_ids=ids)
    torch.testing.assert_close(get_head(plain).last, scores)
    # negative control: without the split, plain HF loading sees the head's keys as unexpected
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "raw", output_loading_info=True)
    assert any(k.startswith("verifier_head.") for k in info["unexpected_keys"])


def test_masked_sft_trains_the_head_jointly_and_it_separates_wrong_steps(tmp_path):
    """verifier_head_weight>0: the head learns from the synthetic errors' step ends; the saved
    checkpoint holds it beside a plain LM, and on fresh examples it scores the ends of wrong steps
    above right ones (step AUC; an untrained head scores all alike: AUC 0.5, the negative control)."""
    from halluc.sources.data import build_sft_dataset
    from halluc.sources.errors import ErrorConfig
    from halluc.pipeline.lab import LabConfig, lab_splits
    from halluc.core.model import load_causal_lm
    from halluc.inference.process_scores import step_auc
    from halluc.core.tokens import backtrack_id, load_tokenizer

    recipe = load_script("recipes/masked_sft.py")
    tiny = ["base.steps=150", "sft.steps=80", "base.batch_size=16", "sft.batch_size=16", "lab.train_size=400",
            "lab.sft_size=400", "lab.test_size=16", "tiny.hidden=32", "eval_max_new_tokens=40"]
    recipe.main([f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "verifier_head_weight=1.0",
                 "errors.example_rate=1.0", "sft.lr=3e-3", *tiny])
    saved = tmp_path / "out" / "checkpoint"
    assert (saved / HEAD_WEIGHTS).exists()

    tok = load_tokenizer(saved)
    fresh = lab_splits(LabConfig(train_size=400, sft_size=400, test_size=16), seed=5)["sft"][:60]
    data = build_sft_dataset(fresh, tok, ErrorConfig(example_rate=1.0), backtrack_id(tok), seed=9)

    def auc(model):
        scores, labels = [], []
        head = get_head(model)
        model.eval()
        for row in data:
            with torch.no_grad():
                model(input_ids=torch.tensor([row["input_ids"]]))
            for i, lab in enumerate(step_end_labels(row["input_ids"], row["roles"], step_end_ids(tok, ";"),
                                                    tok.eos_token_id)):
                if lab != IGNORE_INDEX:
                    scores.append(-float(head.last[0, i]))  # "still right" = low wrong-logit
                    labels.append(lab == 0)
        return step_auc(scores, labels)

    trained = load_causal_lm(str(saved))
    load_head(saved, trained)
    assert auc(trained) > 0.8
    untrained = load_causal_lm(str(saved))
    attach_head(untrained)  # zero-initialised
    assert auc(untrained) == 0.5


def test_a_wrong_answer_step_is_labelled_wrong_before_its_bt_run():
    """Issue 23, item 2: the answer step has no separator, and a wrong one is followed by BTs, not EOS,
    so it was never labelled; the corrected answer was labelled right. Now the token before every BT
    run ends a step. Negative control: the old labels (at_bt_runs=False) miss it."""
    # prompt | "1 2 ;" right | answer "6" wrong, BT, "7" right, EOS
    ids, roles = [1, 1, 2, END, 6, BT, 7, EOS], [P, P, K, K, E, B, C, K]
    assert step_end_labels(ids, roles, {END}, EOS) == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0, 1, IGNORE_INDEX,
                                                        0, IGNORE_INDEX]
    assert step_end_labels(ids, roles, {END}, EOS, at_bt_runs=False)[4] == IGNORE_INDEX


def test_every_bt_run_in_the_sft_data_follows_a_wrong_label(bt_tokenizer, arith_problems):
    """On the lab's masked-SFT examples (synthetic wrong steps, answer steps included): the position
    before every BT run is labelled wrong, and wrong answer steps are among the labels. The old labels
    fail both (the negative control)."""
    from halluc.core.tokens import backtrack_id
    from halluc.sources.data import build_sft_dataset
    from halluc.sources.errors import ErrorConfig

    tok = bt_tokenizer
    data = build_sft_dataset(arith_problems[:400], tok, ErrorConfig(example_rate=1.0), backtrack_id(tok), seed=3)
    ends = step_end_ids(tok, ";")

    def positives_before_runs(at_bt_runs):
        before, answer_wrong = [], 0
        for row in data:
            labels = step_end_labels(row["input_ids"], row["roles"], ends, tok.eos_token_id, at_bt_runs)
            runs = [i for i in range(len(row["roles"]) - 1)
                    if row["roles"][i + 1] == Role.BACKTRACK and row["roles"][i] != Role.BACKTRACK]
            before += [labels[i] == 1 for i in runs]
            answer_wrong += any(labels[i] == 1 and row["input_ids"][i] not in ends for i in runs)
        return before, answer_wrong

    before, answer_wrong = positives_before_runs(True)
    assert len(before) >= 300 and all(before) and answer_wrong >= 30
    old_before, old_answer_wrong = positives_before_runs(False)
    assert not all(old_before) and old_answer_wrong == 0


def test_the_head_loss_weighs_the_rare_wrong_steps_like_the_right_ones():
    """Class weighting: with one wrong step in ten, predicting 'right' everywhere is not a good loss."""
    from halluc.core.losses import balanced_bce

    labels = torch.tensor([1.0] + [0.0] * 9)
    always_right, informative = torch.full((10,), -3.0), torch.tensor([3.0] + [-3.0] * 9)
    plain = torch.nn.functional.binary_cross_entropy_with_logits
    assert balanced_bce(always_right, labels) > 3 * balanced_bce(informative, labels)
    assert plain(always_right, labels) < 0.5  # unweighted, "always right" already looks good
    assert balanced_bce(informative, torch.zeros(10)) == pytest.approx(plain(informative, torch.zeros(10)))
    assert balanced_bce(informative, torch.ones(10)) == pytest.approx(plain(informative, torch.ones(10)))  # all wrong
    assert balanced_bce(informative, torch.ones(10)) > 0


def test_a_right_step_before_a_masked_error_keeps_its_head_label_and_the_lm_loss_stays_masked():
    """The head's label rides on the target its step end predicts. When that target is the first
    token of an error step (masked: no LM target), the label must still reach the head, and the LM
    loss must still be plain masked cross-entropy. Negative control: the LM loss over every
    target the head needs differs (the error token would be trained)."""
    from halluc.core.losses import token_cross_entropy
    from halluc.core.model import tiny_llama
    from halluc.objectives.verifier_head import HeadCollator, HeadObjective
    from halluc.sources.data import labels_from_roles
    from halluc.structure.backends import TargetModel, use_backend
    from halluc.training.train import TreeCollator

    #        q   q   x   ;    (wrong: y ;)  BT  BT  (right: z ;)  EOS
    ids = [20, 21, 10, END, 11, END, BT, BT, 12, END, EOS]
    roles = [int(r) for r in (P, P, K, K, E, E, B, B, C, C, K)]
    row = {"input_ids": ids, "roles": roles, "labels": labels_from_roles(ids, roles, masked=True)}
    torch.manual_seed(0)
    model = tiny_llama(32, hidden=32, layers=1, heads=2)
    attach_head(model)
    torch.nn.init.normal_(get_head(model).proj.weight)  # a head that says something
    model.train()
    backend = use_backend(model, "dense")
    for mode in ("causal", "block_errors"):
        plain = TreeCollator(mode, "original")([dict(row)])
        batch = HeadCollator(TreeCollator(mode, "original"), {END}, EOS)([dict(row)])
        head_at = {int(batch["pred_pos"][0, j]): int(batch["head_labels"][0, j])
                   for j in range(len(ids)) if batch["head_labels"][0, j] != IGNORE_INDEX}
        assert head_at == {3: 0, 5: 1, 9: 0}  # the right step at 3 ends before the masked error token 4
        assert torch.equal(batch["shift_labels"], plain["shift_labels"])  # the trainer's token count
        objective = HeadObjective(weight=0.0)
        loss, metrics = objective(TargetModel(model, backend), batch)
        t = TargetModel(model, backend).targets(plain)
        want = token_cross_entropy(t.logits[:, :-1], t.ids)
        assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-6)
        t_all = TargetModel(model, backend).targets(batch)
        assert abs(float(token_cross_entropy(t_all.logits[:, :-1], t_all.ids).detach()) - float(want.detach())) > 1e-3
