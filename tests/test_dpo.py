"""Technique 6: preference losses (golden values), pair layout (packed == separate, every backend),
the objective against TRL's DPOTrainer, the LoRA reference, and recipes/dpo.py end to end."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import load_script

from halluc.core.example import Role
from halluc.core.losses import preference_loss, sequential_kl, sum_per_branch, target_log_probs

# ---- pure losses -------------------------------------------------------------------------------

POLICY = torch.tensor([[-3.0, -5.0], [-2.0, -1.0]])     # (pairs, [chosen, rejected]) log-prob sums
REFERENCE = torch.tensor([[-4.0, -4.0], [-2.0, -2.0]])  # u = (1 - -1) = 2 ; (0 - 1) = -1


def test_sigmoid_golden_and_policy_equal_reference_gives_log_2():
    got = preference_loss("sigmoid", POLICY, REFERENCE, beta=0.5)
    want = [math.log(1 + math.exp(-0.5 * 2)), math.log(1 + math.exp(0.5 * 1))]
    torch.testing.assert_close(got, torch.tensor(want))
    same = preference_loss("sigmoid", POLICY, POLICY, beta=0.1)
    torch.testing.assert_close(same, torch.full((2,), math.log(2)))


def test_ipo_golden_uses_per_token_means():
    lengths = torch.tensor([[2.0, 4.0], [1.0, 1.0]])
    got = preference_loss("ipo", POLICY, REFERENCE, beta=0.25, lengths=lengths)
    # pair 0: 1/2 - (-1)/4 = 0.75; pair 1: 0 - 1 = -1; minus 1/(2 beta) = 2
    torch.testing.assert_close(got, torch.tensor([(0.75 - 2) ** 2, (-1 - 2) ** 2]))


def test_tdpo_golden_zero_kl_equals_sigmoid_and_tdpo2_stops_the_chosen_gradient():
    kl = torch.tensor([[0.5, 1.5], [2.0, 0.0]], requires_grad=True)
    got1 = preference_loss("tdpo1", POLICY, REFERENCE, beta=0.5, kl=kl)
    want1 = [math.log(1 + math.exp(-0.5 * (2 - 1.0))), math.log(1 + math.exp(-0.5 * (-1 + 2.0)))]
    torch.testing.assert_close(got1, torch.tensor(want1))
    got2 = preference_loss("tdpo2", POLICY, REFERENCE, beta=0.5, alpha=0.5, kl=kl)
    want2 = [math.log(1 + math.exp(-0.5 * (2 - 0.5))), math.log(1 + math.exp(-0.5 * (-1 + 1.0)))]
    torch.testing.assert_close(got2, torch.tensor(want2, dtype=torch.float32))
    got2.sum().backward()
    assert torch.all(kl.grad[:, 0] == 0) and torch.all(kl.grad[:, 1] != 0)  # sg on the chosen KL only
    zero = torch.zeros(2, 2)
    for kind in ("tdpo1", "tdpo2"):
        torch.testing.assert_close(preference_loss(kind, POLICY, REFERENCE, 0.3, kl=zero),
                                   preference_loss("sigmoid", POLICY, REFERENCE, 0.3))
    with pytest.raises(ValueError, match="live reference"):
        preference_loss("tdpo2", POLICY, REFERENCE)


def test_sequential_kl_golden():
    ref = torch.tensor([[0.0, math.log(3.0)]])  # [1/4, 3/4]
    pol = torch.tensor([[0.0, 0.0]])            # [1/2, 1/2]
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    torch.testing.assert_close(sequential_kl(pol, ref), torch.tensor([want]))
    torch.testing.assert_close(sequential_kl(ref, ref), torch.zeros(1))


# ---- pairs: text, roles, layout -------------------------------------------------------------------

def test_text_pairs_tokenize_each_side_alone_with_eos_and_roles_from_the_bts(bt_tokenizer, tmp_path):
    from halluc.structure.pairs import load_pairs
    from halluc.core.tokens import backtrack_id

    tok, bt = bt_tokenizer, backtrack_id(bt_tokenizer)
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "3 + 4 ; x = 3 + 5", "chosen": "<|BACKTRACK|> 4 = 7", "rejected": " = 8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pair,) = load_pairs(path, tok, bt)
    assert pair["prompt_ids"] == tok(rows[0]["prompt"])["input_ids"]
    assert pair["chosen_ids"] == tok(rows[0]["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair["rejected_ids"][-1] == tok.eos_token_id
    assert pair["prompt_roles"][-1] == Role.ERROR and pair["prompt_roles"][0] == Role.PROMPT  # the erased "5"
    assert pair["chosen_roles"][0] == Role.BACKTRACK and set(pair["rejected_roles"]) == {Role.KEPT}
    path.write_text(json.dumps({"prompt": "1", "chosen": 2, "rejected": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: field 'chosen' must be a string"):
        load_pairs(path, tok, bt)


def _random_pairs(n, vocab, bt, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        n_q, n_prefix, n_err = rng.integers(3, 7), rng.integers(0, 4), rng.integers(1, 4)
        prompt = rng.integers(3, vocab - 1, n_q + n_prefix + n_err).tolist()
        roles = [Role.PROMPT] * n_q + [Role.KEPT] * n_prefix + [Role.ERROR] * n_err
        fix = rng.integers(3, vocab - 1, rng.integers(1, 5)).tolist()
        rejected = rng.integers(3, vocab - 1, rng.integers(1, 6)).tolist()
        pairs.append({"prompt_ids": prompt, "prompt_roles": [int(r) for r in roles],
                      "chosen_ids": [bt] * n_err + fix,
                      "chosen_roles": [int(Role.BACKTRACK)] * n_err + [int(Role.CORRECTION)] * len(fix),
                      "rejected_ids": rejected, "rejected_roles": [int(Role.KEPT)] * len(rejected)})
    return pairs


def _separate_sums(model, pairs, mode, positions):
    """Each pair as two ordinary sequences, prompt + chosen and prompt + rejected, scored alone
    with the dense reference mask: the obvious, slow version."""
    from halluc.structure.backends import forward_targets, use_backend
    from halluc.core.example import IGNORE_INDEX
    from halluc.structure.packing import collate, layout_example

    backend = use_backend(model, "dense")
    out = []
    for p in pairs:
        sums = []
        for side in ("chosen", "rejected"):
            roles = p["prompt_roles"] + p[f"{side}_roles"]
            if side == "rejected":  # continuing the error: nothing erases it
                roles = [int(Role.KEPT) if r == Role.ERROR else r for r in roles]
            ids = p["prompt_ids"] + p[f"{side}_ids"]
            labels = [IGNORE_INDEX] * len(p["prompt_ids"]) + p[f"{side}_ids"]
            one = collate([vars(layout_example({"input_ids": ids, "roles": roles, "labels": labels}, mode, positions))])
            with torch.no_grad():
                t = forward_targets(model, one, backend)
            sums.append(target_log_probs(t.logits, t.ids).sum().item())
        out.append(sums)
    return torch.tensor(out)


def _check_packed_pairs(mode, positions, backends, device="cpu"):
    """Seven pairs from "own errors" packed several to a row: per pair chosen / rejected sums on
    each backend equal scoring prompt + chosen and prompt + rejected alone (dense, fp32)."""
    from halluc.structure.backends import forward_targets, use_backend
    from halluc.objectives.dpo import PairCollator
    from halluc.core.model import tiny_llama
    from halluc.structure.pairs import pair_rows

    torch.manual_seed(0)
    model = tiny_llama(40, hidden=32, layers=2, heads=2).eval().to(device)
    pairs = _random_pairs(7, 40, bt=39)
    want = _separate_sums(model, pairs, mode, positions).to(device)
    rows = pair_rows(pairs, mode, positions, max_len=64, pack_len=48)
    assert len(rows) < len(pairs)  # packed
    batch = PairCollator()(rows)
    # which pair each unit is: its prompt's first tokens
    order = []
    for unit in range(int(batch["unit_id"].max()) + 1):
        row, col = torch.nonzero(batch["unit_id"] == unit)[0].tolist()
        order.append(next(i for i, p in enumerate(pairs)
                          if batch["input_ids"][row, col:col + 3].tolist() == p["prompt_ids"][:3]))
    assert sorted(order) == list(range(len(pairs)))
    for backend in backends:
        name = use_backend(model, backend)
        with torch.no_grad():
            t = forward_targets(model, batch, name)
        got = sum_per_branch(target_log_probs(t.logits, t.ids), t.unit, t.branch, len(pairs))
        torch.testing.assert_close(got, want[order], rtol=1e-4, atol=1e-4, msg=backend)
    by_row = sum_per_branch(target_log_probs(t.logits, t.ids), t.row, t.branch)
    assert not torch.allclose(by_row, want[order][:len(by_row)], atol=1e-2)  # the negative control


@pytest.mark.parametrize("mode,positions", [("causal", "original"), ("block_errors", "rewound")])
def test_packed_pairs_give_each_pairs_log_probs_on_every_backend(mode, positions):
    """Pairs from the model's own errors (the prompt ends with the error the chosen BTs erase),
    packed several to a row: per pair sums equal separate scoring on every CPU backend. Negative
    control: summing per row mixes pairs."""
    _check_packed_pairs(mode, positions, ("dense", "dense_units", "varlen", "varlen_kv"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,positions", [("causal", "original"), ("block_errors", "rewound")])
def test_packed_pairs_on_the_gpu_backends(mode, positions):
    """The same on a GPU (fp32): flex reads attn_end directly, varlen_kv runs the path kernel."""
    _check_packed_pairs(mode, positions, ("flex", "varlen_kv", "dense_units"), device="cuda")


def test_a_bt_in_a_text_prompt_keeps_its_role(bt_tokenizer):
    from halluc.structure.pairs import tokenize_text_pair
    from halluc.core.tokens import backtrack_id

    bt = backtrack_id(bt_tokenizer)
    pair = tokenize_text_pair({"prompt": "3 + 4 ; x = 9<|BACKTRACK|> 7 ; y", "chosen": " = 1", "rejected": " = 2"},
                              bt_tokenizer, bt)
    roles = pair["prompt_roles"]
    at = pair["prompt_ids"].index(bt)
    assert roles[at] == Role.BACKTRACK and roles[at - 1] == Role.ERROR and roles[0] == Role.PROMPT
    assert roles[at + 1] == Role.KEPT  # what follows the correction in the prompt is response, not question


def test_packed_rows_weigh_micro_batches_by_their_pairs(tmp_path):
    """Rows packing 1 and 4 pairs: gradient accumulation over the two rows gives the mean over the
    5 pairs, as one batch of both rows does (PairCollator marks pairs, the trainer counts them);
    weighing the two micro-batches equally (the negative control) gives another loss."""
    from halluc.objectives.dpo import PairCollator, PreferenceObjective
    from halluc.core.model import tiny_llama
    from halluc.structure.pairs import pair_rows
    from halluc.training.train import make_trainer, training_args

    torch.manual_seed(0)
    pairs = _random_pairs(5, 40, bt=39, seed=3)
    rows = pair_rows(pairs[:4], pack_len=200) + pair_rows(pairs[4:], pack_len=200)
    assert [len(r["unit_starts"]) for r in rows] == [4, 1]
    policy = tiny_llama(40, hidden=32, layers=1, heads=2)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))

    class EqualMicroBatches(PreferenceObjective):
        item_mean = False

    loss = {}
    for name, batch, accumulate, kind in (("one", 2, 1, PreferenceObjective), ("two", 1, 2, PreferenceObjective),
                                          ("two_equal", 1, 2, EqualMicroBatches)):
        args = training_args(str(tmp_path / name), steps=1, batch_size=batch, lr=0.0, log_every=1,
                             gradient_accumulation_steps=accumulate)
        trainer = make_trainer(copy.deepcopy(policy), args, rows, tb_dir=str(tmp_path / name / "tb"), packed=True,
                               objective=kind("sigmoid", reference=copy.deepcopy(reference)), collator=PairCollator())
        trainer.train()
        loss[name] = trainer.state.log_history[-1]["train_loss"]
    assert loss["two"] == pytest.approx(loss["one"], rel=1e-5)
    assert abs(loss["two_equal"] - loss["one"]) > 1e-4


# ---- the objective against TRL ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, bt_tokenizer):
    """A tiny model with the BT token, saved as the "SFT checkpoint" DPO starts from."""
    from halluc.core.model import init_backtrack_embedding, tiny_llama
    from halluc.core.tokens import backtrack_id

    tok = copy.deepcopy(bt_tokenizer)
    torch.manual_seed(1)
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    init_backtrack_embedding(model, tok, backtrack_id(tok))
    folder = tmp_path_factory.mktemp("sft")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEXT_PAIRS = [{"prompt": "3 + 4 ; x = 3 + 5", "chosen": "<|BACKTRACK|> 4 = 7", "rejected": " = 8"},
              {"prompt": "2 * 6 ; y = 12 ; 12 - 9", "chosen": " = 3", "rejected": " = 4 ; 4"},
              {"prompt": "9 - 2 ; z = 7", "chosen": " ; 7 + 1 = 8", "rejected": "<|BACKTRACK|> 6 ; 6"},
              {"prompt": "5 + 5 ; w = 10 ; 10 * 2", "chosen": " = 20", "rejected": " = 21 ; 21 - 1"}]


@pytest.fixture(scope="module")
def other_ref_dir(tmp_path_factory, sft_dir):
    """The SFT checkpoint with every weight moved a little: a reference that is not the policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("ref")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(sft_dir).save_pretrained(folder)
    return folder


def test_step_1_at_lr_0_logs_exactly_trls_dpo_loss_of_the_batch(sft_dir, other_ref_dir, tmp_path):
    """`python recipes/dpo.py model=DIR ref_model=DIR data=FILE.jsonl loss=sigmoid beta=0.1 lr=0 steps=1
    batch_size=N` logs at step 1 the loss TRL's DPOTrainer logs for the same N pairs, model and
    reference (not the policy, so the loss is not log 2), and the same rewards and log-prob means."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS))
    out = tmp_path / "ours"
    load_script("recipes/dpo.py").main([f"model={sft_dir}", f"ref_model={other_ref_dir}", f"data={data}",
                                        "loss=sigmoid", "beta=0.1", "lr=0", "steps=1", f"batch_size={len(TEXT_PAIRS)}",
                                        f"output_dir={out}", "lab.test_size=4", "eval_max_new_tokens=8"])
    ours = next(h for h in json.loads((out / "train.json").read_text()) if "loss" in h)

    tok = AutoTokenizer.from_pretrained(sft_dir)
    model, ref = AutoModelForCausalLM.from_pretrained(sft_dir), AutoModelForCausalLM.from_pretrained(other_ref_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, learning_rate=0.0, max_steps=1, logging_steps=1,
                     per_device_train_batch_size=len(TEXT_PAIRS), bf16=False, use_cpu=True, report_to="none",
                     gradient_checkpointing=False, max_length=None)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(TEXT_PAIRS),
                         processing_class=tok)
    trainer.train()
    theirs = next(h for h in trainer.state.log_history if "loss" in h)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    assert ours["loss"] != pytest.approx(math.log(2), abs=1e-3)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key


def test_the_objective_equals_trls_loss_when_policy_and_reference_differ(sft_dir, tmp_path):
    """A reference that is not the policy (so the loss is not log 2): our PreferenceObjective on the
    packed two-branch batch equals TRL's DPOTrainer.compute_loss on its padded batch, for sigmoid and
    ipo."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from halluc.structure.backends import TargetModel, use_backend
    from halluc.objectives.dpo import PairCollator, PreferenceObjective
    from halluc.structure.pairs import load_pairs, pair_rows
    from halluc.core.tokens import backtrack_id

    tok = AutoTokenizer.from_pretrained(sft_dir)
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    reference = AutoModelForCausalLM.from_pretrained(sft_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS))
    batch = PairCollator()(pair_rows(load_pairs(data, tok, backtrack_id(tok)), pack_len=128))
    ours = {}
    for loss in ("sigmoid", "ipo"):  # before TRL touches the models (its trainer patches them in place)
        objective = PreferenceObjective(loss, beta=0.3, reference=copy.deepcopy(reference))
        model = copy.deepcopy(policy)
        with torch.no_grad():
            ours[loss] = objective(TargetModel(model, use_backend(model, "dense_units")), batch)[0].item()
    for loss in ("sigmoid", "ipo"):
        args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss], bf16=False, use_cpu=True,
                         report_to="none", per_device_train_batch_size=len(TEXT_PAIRS), max_length=None)
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             processing_class=tok, train_dataset=Dataset.from_list(TEXT_PAIRS))
        theirs_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(TEXT_PAIRS))])
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, theirs_batch)
        assert ours[loss] == pytest.approx(theirs.item(), rel=1e-4, abs=1e-5), loss
    assert ours["sigmoid"] != pytest.approx(math.log(2), abs=1e-3)  # the policy is not the reference


def test_the_lora_reference_is_the_sft_checkpoint(sft_dir, bt_tokenizer):
    """Under LoRA with no ref_model, the reference is the policy with its adapter (and trained BT
    rows) disabled: it scores exactly like the SFT checkpoint, while the adapted policy does not."""
    from halluc.structure.backends import TargetModel, use_backend
    from halluc.objectives.dpo import PairCollator, PreferenceObjective
    from halluc.training.lora import LoraSettings, apply_lora
    from halluc.core.model import load_causal_lm
    from halluc.structure.pairs import pair_rows
    from halluc.core.tokens import backtrack_id

    bt = backtrack_id(bt_tokenizer)
    sft = load_causal_lm(str(sft_dir))
    peft = apply_lora(load_causal_lm(str(sft_dir)), LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0), bt)
    with torch.no_grad():  # as if trained: the adapter and the BT row move
        for name, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    batch = PairCollator()(pair_rows(_random_pairs(4, len(bt_tokenizer), bt), pack_len=64))
    name = use_backend(peft, "dense_units")
    model = TargetModel(peft, name)
    objective = PreferenceObjective("sigmoid")
    with torch.no_grad():
        via_adapter_off = objective.reference_targets(model, batch)
        adapted = model.targets(batch)
        plain = TargetModel(sft, use_backend(sft, "dense_units")).targets(batch)
    lp = lambda t: target_log_probs(t.logits, t.ids)  # noqa: E731
    torch.testing.assert_close(lp(via_adapter_off), lp(plain), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lp(adapted), lp(plain), atol=1e-3)
    assert bt in batch["input_ids"]


# ---- recipes/dpo.py end to end -----------------------------------------------------------------------

TINY = ["base.steps=150", "sft.steps=30", "base.batch_size=16", "sft.batch_size=16", "lab.train_size=400",
        "lab.sft_size=200", "lab.test_size=16", "tiny.hidden=32", "eval_max_new_tokens=40", "sampler.problems=48",
        "sampler.max_new_tokens=48", "sampler.k=2", "steps=6", "batch_size=4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo-cache")


def test_the_lab_default_runs_tdpo2_on_packed_own_error_pairs(tmp_path, cache):
    """No model, no data: the lab SFT model (cached), pairs from its own errors (cached), TDPO2 on
    pairs packed with errors blocked. Logs TRL's metric names per step, to train.json and TensorBoard."""
    from datasets import load_from_disk
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from halluc.core.example import apply_backtrack

    report = load_script("recipes/dpo.py").main([f"output_dir={tmp_path}/out", f"cache_dir={cache}", "loss=tdpo2",
                                                 "layout.pack=256", "layout.attention=block_errors", "layout.positions=rewound", *TINY])
    out = tmp_path / "out"
    history = json.loads((out / "train.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert len(logged) == 6 and logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "kl/chosen", "kl/rejected"):
        assert key in logged[-1], key
    assert logged[-1]["kl/chosen"] > 0  # the policy moved away from the reference
    tags = set()
    for events in (out / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/rewards/margins", "train/logps/chosen", "train/loss"} <= tags
    assert report["pairs"] > 0 and report["rows"] < report["pairs"]  # packed
    pairs = load_from_disk(report["pairs_from"])
    bt = report["backtrack_id"]
    assert report["pair_forms"] == {"bt": report["pairs"]}  # the default: bt pairs only
    for p in pairs:  # the chosen side erases exactly the prompt's error run (none in step and balanced pairs)
        if p["form"] == "balanced":  # the rejected side leaves the chosen side's text: it only wastes a BT run
            assert apply_backtrack(p["prompt_ids"] + p["rejected_ids"], bt) == p["prompt_ids"] + p["chosen_ids"]
        n_err = sum(r == Role.ERROR for r in p["prompt_roles"])
        assert p["chosen_ids"][:n_err] == [bt] * n_err and p["chosen_ids"][n_err] != bt
        visible = apply_backtrack(p["prompt_ids"] + p["chosen_ids"], bt)
        assert visible[:len(p["prompt_ids"]) - n_err] == p["prompt_ids"][:len(p["prompt_ids"]) - n_err]
    assert (out / "checkpoint" / "model.safetensors").exists() and set(report["after"]) == {"test_id", "test_ood"}


def test_step_and_balanced_pairs_from_a_policy_right_half_the_time(lab_policy, tmp_path):
    """pairs.step and pairs.balanced (issue 24): the policy's own samples give all three forms, drawn per
    bt pair; a balanced pair continues after two right steps and its rejected side leaves the same text
    after a wasted BT run; DPO trains on the mix under the hard mask, packed."""
    from datasets import load_from_disk

    from halluc.core.example import apply_backtrack

    folder, _, tok, _ = lab_policy
    report = load_script("recipes/dpo.py").main([
        f"model={folder}", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "lab.train_size=2000",
        "lab.sft_size=200", "lab.test_size=8", "sampler.problems=48", "sampler.k=2", "sampler.max_new_tokens=64",
        "sampler.correction_tries=1", "pairs.step=1", "pairs.balanced=0.5", "steps=2", "batch_size=4",
        "eval_max_new_tokens=8", "layout.pack=256", "layout.attention=block_errors", "layout.positions=rewound"])
    forms = report["pair_forms"]
    pairs = load_from_disk(report["pairs_from"])
    built = sum(f == "balanced" for f in pairs["form"])  # half a balanced pair per bt pair, or all there are
    assert forms["bt"] > 0 and forms["step"] > 0 and forms["balanced"] == min(round(0.5 * forms["bt"]), built) > 0
    bt = report["backtrack_id"]
    from halluc.pipeline.lab import LabConfig, lab_splits
    from halluc.tasks import arith

    problems = {}
    sft = lab_splits(LabConfig(train_size=2000, sft_size=200, test_size=8), 0)["sft"]
    balanced = [p for p in pairs if p["form"] == "balanced"]
    assert balanced
    for p in balanced:
        problem = sft[p["problem"]]
        prompt = tok(problem.prompt)["input_ids"]
        assert apply_backtrack(p["prompt_ids"] + p["rejected_ids"], bt) == p["prompt_ids"] + p["chosen_ids"]
        steps = arith.split_steps(tok.decode(p["prompt_ids"][len(prompt):] + p["chosen_ids"], skip_special_tokens=True))
        assert len(steps) >= 2 and arith.verify_steps(problem, steps).kinds[:len(steps)] == ["ok"] * len(steps)
        problems[p["problem"]] = problems.get(p["problem"], 0) + 1
    assert max(problems.values()) <= 2  # sampler.per_problem
    assert report["dpo_train"] is not None


def test_precomputed_reference_log_probs_are_cached_and_give_the_live_loss(tmp_path, cache, monkeypatch):
    """precompute_ref=true: reference log-probs once, on disk, keyed by data + weights; the steps log
    what the live reference gives, and a second call reads the cache instead of computing."""
    import halluc.objectives.dpo

    recipe = load_script("recipes/dpo.py")
    runs = {}
    for name, extra in (("live", []), ("pre", ["precompute_ref=true"])):
        recipe.main([f"output_dir={tmp_path}/{name}", f"cache_dir={cache}", *TINY, *extra])
        runs[name] = [h for h in json.loads((tmp_path / name / "train.json").read_text()) if "loss" in h]
    (cached,) = cache.glob("ref-logps-*.json")
    assert runs["pre"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for live, pre in zip(runs["live"], runs["pre"]):
        assert pre["loss"] == pytest.approx(live["loss"], abs=1e-4)
        assert pre["rewards/margins"] == pytest.approx(live["rewards/margins"], abs=1e-4)

    def never(*args, **kwargs):
        raise AssertionError("computed again instead of reading the cache")

    monkeypatch.setattr(halluc.objectives.dpo, "reference_log_probs", never)
    from halluc.core.model import load_causal_lm
    from halluc.structure.pairs import load_pairs, pair_rows
    from halluc.core.tokens import backtrack_id, load_tokenizer
    from halluc.sources.pair_forms import select_forms

    report = json.loads((tmp_path / "pre" / "eval.json").read_text())
    models = {line.split("|")[1].split(" / ")[0].strip()
              for line in (tmp_path / "pre" / "eval.md").read_text().splitlines()[2:] if line.startswith("|")}
    assert "start" in models and "base" not in models  # the model DPO started from, not the lab base
    tok = load_tokenizer(report["start"])
    # the pairs the recipe trained on: the default form (bt) of the folder's pairs, as recipes/dpo.py draws them
    rows = pair_rows(select_forms(load_pairs(report["pairs_from"], tok, backtrack_id(tok)), {"bt": 1.0}, seed=0))
    again = halluc.objectives.dpo.precomputed_reference(load_causal_lm(report["start"]), rows, "dense_units", cache)
    assert len(again) == len(rows) and all("ref_logps" in r for r in again)
    assert json.loads(cached.read_text())[0] == pytest.approx(again[0]["ref_logps"][0].tolist())


@pytest.mark.parametrize("precompute", [False, True])
def test_lora_dpo_uses_the_starting_model_as_reference_and_saves_an_adapter(tmp_path, cache, precompute):
    """LoRA without ref_model: the disabled adapter (live) or the starting model's precomputed
    log-probs; either way step 1 is log 2, the adapter moves away from it, and the run evaluates."""
    report = load_script("recipes/dpo.py").main([f"output_dir={tmp_path}/out", f"cache_dir={cache}", "lora.enabled=true",
                                                 "lora.r=4", "lr=1e-2", f"precompute_ref={str(precompute).lower()}", *TINY])
    logged = [h for h in json.loads((tmp_path / "out" / "train.json").read_text()) if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logged[-1]["rewards/margins"] != 0  # the adapter moved the policy away from its reference
    assert (tmp_path / "out" / "adapter" / "halluc_adapter.json").exists() and report["saved"].endswith("adapter")
    assert report["after"]["test_id"]["n"] == 16


def test_a_reference_without_the_bt_row_is_refused(tmp_path, sft_dir, lab_tokenizer):
    from halluc.core.model import tiny_llama

    plain = tmp_path / "plain"
    tiny_llama(len(lab_tokenizer), hidden=32, layers=1, heads=2).save_pretrained(plain)
    lab_tokenizer.save_pretrained(plain)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS))
    with pytest.raises(SystemExit, match="has no <\\|BACKTRACK\\|> token"):
        load_script("recipes/dpo.py").main([f"model={sft_dir}", f"ref_model={plain}", f"data={data}", "steps=1",
                                            f"output_dir={tmp_path}/out", "lab.test_size=4", "eval_max_new_tokens=8"])
    with pytest.raises(SystemExit, match="precompute_ref=true only stores"):
        load_script("recipes/dpo.py").load(["loss=tdpo2", "precompute_ref=true"])


def _more_pairs(n=8):
    """TEXT_PAIRS with variations: enough pairs for several steps of two processes."""
    return [{**p, "prompt": p["prompt"] + f" ; {i}"} for i in range(n // len(TEXT_PAIRS)) for p in TEXT_PAIRS]


@pytest.mark.slow
def test_kill_9_mid_dpo_then_resume_continues_from_the_checkpoint(tmp_path, sft_dir):
    import os
    import sys

    from conftest import kill_when_paused, run_processes

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _more_pairs(16)))
    out = tmp_path / "out"
    args = [f"model={sft_dir}", f"data={data}", "steps=8", "batch_size=4", "save_steps=2", "lab.test_size=4",
            "eval_max_new_tokens=8", f"output_dir={out}", "lr=1e-2"]
    kill_when_paused(args, out, 5, tmp_path / "killed.log", recipe="recipes/dpo.py")
    resumed = run_processes([sys.executable, "recipes/dpo.py", *args, "resume=true"], timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resuming from {out / 'checkpoint-4'}" in resumed.stdout + resumed.stderr
    whole = tmp_path / "whole"  # the unbroken run, here on 1 thread like the subprocesses (the same float sums)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_script("recipes/dpo.py").main([*args[:-2], f"output_dir={whole}", "lr=1e-2"])
    finally:
        torch.set_num_threads(threads)
    losses = lambda d: [h["loss"] for h in json.loads((d / "train.json").read_text()) if "loss" in h]  # noqa: E731
    assert losses(out)[-3:] == pytest.approx(losses(whole)[-3:], abs=1e-5)  # steps 6-8 as in an unbroken run


@pytest.mark.slow
def test_zero3_with_two_processes_trains_like_one_process(tmp_path, sft_dir):
    """`deepspeed --num_gpus 2 recipes/dpo.py deepspeed=ds_configs/zero3.json batch_size=2` (CPU, gloo;
    policy and reference sharded) logs the losses and rewards of one process with batch_size=4. It starts
    on a machine where a killed build left DeepSpeed's op lock behind (that hung CI) and leaves no shared
    memory behind (a negative control: without `skip_shared_memory_collective` it hangs at the start)."""
    import os

    from conftest import deepspeed_launcher, run_processes, shared_memory_left, stale_build_lock

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _more_pairs(16)))
    common = [f"model={sft_dir}", f"data={data}", "steps=4", "lr=1e-2", "lab.test_size=4", "eval_max_new_tokens=8",
              "loss=tdpo2"]
    load_script("recipes/dpo.py").main([*common, "batch_size=4", f"output_dir={tmp_path}/one"])  # one process: this one
    env = {**os.environ, "OMP_NUM_THREADS": "1", **stale_build_lock(tmp_path)}
    launcher = deepspeed_launcher()
    two = run_processes([*launcher, "recipes/dpo.py", *common, "batch_size=2", "deepspeed=ds_configs/zero3.json",
                         f"output_dir={tmp_path}/two"], env=env, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-5000:]
    assert "reference model under DeepSpeed (ZeRO stage 3)" in two.stdout + two.stderr
    logs = {name: [h for h in json.loads((tmp_path / name / "train.json").read_text()) if "loss" in h]
            for name in ("one", "two")}
    assert len(logs["two"]) == 4
    for a, b in zip(logs["one"], logs["two"]):
        for key in ("loss", "rewards/margins", "logps/chosen", "kl/rejected"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-4), key
    assert logs["two"][-1]["loss"] != pytest.approx(logs["two"][0]["loss"], abs=1e-3)  # it trained
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["world_size"] == 2
    assert shared_memory_left(launcher) == []


def test_pairs_beyond_the_models_positions_are_dropped_not_indexed(tmp_path, bt_tokenizer, caplog):
    """A model with few positions (as GPT-2's learned table would be): pairs longer than them are
    dropped with a warning naming the limit, instead of indexing past the position table."""
    import logging

    from halluc.core.model import tiny_llama

    tok = copy.deepcopy(bt_tokenizer)
    folder = tmp_path / "short"
    tiny_llama(len(tok), hidden=32, layers=1, heads=2, max_positions=48, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    long = {"prompt": " ; ".join(["3 + 4 = 7"] * 12), "chosen": " = 1", "rejected": " = 2"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS + [long]))
    with caplog.at_level(logging.WARNING):
        report = load_script("recipes/dpo.py").main([f"model={folder}", f"data={data}", "steps=1", "batch_size=2",
                                                     f"output_dir={tmp_path}/out", "lab.test_size=2",
                                                     "eval_max_new_tokens=4"])
    assert report["pairs"] == len(TEXT_PAIRS) + 1 and report["rows"] == len(TEXT_PAIRS)
    assert "longer than the model's 48 positions (max_len=512 is more) tokens" in caplog.text


def test_the_recipe_offers_every_loss_kind_and_each_says_what_it_needs():
    """Loss kinds are named objects with what they need (halluc.core.config.PREFERENCE_KINDS): the recipe
    offers exactly them, and the objective refuses a name it does not know."""
    import typing

    from halluc.core.config import PREFERENCE_KINDS
    from halluc.objectives.dpo import PreferenceObjective

    offered = typing.get_args(typing.get_type_hints(load_script("recipes/dpo.py").Config)["loss"])
    assert set(offered) == set(PREFERENCE_KINDS)
    assert [k for k, v in PREFERENCE_KINDS.items() if v.token_kl] == ["tdpo1", "tdpo2"]
    assert [k for k, v in PREFERENCE_KINDS.items() if v.lengths] == ["ipo"]
    assert [k for k, v in PREFERENCE_KINDS.items() if not v.reference] == ["sft"]
    with pytest.raises(ValueError, match="loss must be one of sigmoid, ipo, tdpo1, tdpo2, sft"):
        PreferenceObjective("dpo")


def test_a_gsm8k_checkpoint_is_evaluated_on_gsm8k_or_refused(sft_dir, tmp_path):
    """Issue 22, item 1: a checkpoint that records task gsm8k was evaluated on the built-in arith task,
    and with lab.task=gsm8k and only a test file the run exited 0 with an empty table. Now the first is
    refused at load, naming the task and file it was trained with, and the second evaluates on the file."""
    import shutil

    test_file = tmp_path / "test.jsonl"
    rows = [{"question": f"Tom has {a} apples and buys {b}. How many?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in ((2, 3), (4, 1), (5, 5))]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "gsm8k_checkpoint"
    shutil.copytree(sft_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["halluc"] = {"lab": {"task": "gsm8k", "test_file": str(test_file)}, "attention": "causal"}
    (model / "config.json").write_text(json.dumps(config))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS))
    dpo = load_script("recipes/dpo.py")
    common = [f"model={model}", f"data={pairs}", "steps=1", "batch_size=2", "eval_max_new_tokens=4"]
    with pytest.raises(SystemExit, match=f"trained on lab.task=gsm8k .* would evaluate it on lab.task=arith: set "
                                         f"lab.task=gsm8k \\(it was trained with lab.test_file={test_file}\\)"):
        dpo.main([*common, f"output_dir={tmp_path}/refused"])
    report = dpo.main([*common, f"output_dir={tmp_path}/out", "lab.task=gsm8k", f"lab.test_file={test_file}"])
    assert report["before"]["test_id"]["n"] == 3 and report["after"]["test_id"]["n"] == 3
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["after"]["test_id"]["n"] == 3


def test_the_lora_adapter_starts_the_same_whatever_was_drawn_before_it(tmp_path, sft_dir, monkeypatch):
    """LoRA's init drew from the global generator after the starting policy and the pairs: a sweep's
    first run of a seed (which builds the lab chain and draws) started another adapter than the runs
    that read the cache. The adapter is seeded where it is made (without that seed this test fails)."""
    from halluc.training import lora

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS))
    made = []

    class Stop(Exception):
        pass

    apply_lora = lora.apply_lora

    def capture(model, settings, bt_id, **kw):
        peft = apply_lora(model, settings, bt_id, **kw)
        made.append({k: v.detach().clone() for k, v in peft.named_parameters() if "lora_A" in k})
        raise Stop

    from halluc.structure import pairs as pairs_module

    load_pairs, draws = pairs_module.load_pairs, [0]

    def load_pairs_and_draw(*a, **kw):  # what a cold lab chain draws between the run's seed and the adapter
        torch.rand(draws[0])
        return load_pairs(*a, **kw)

    monkeypatch.setattr(lora, "apply_lora", capture)
    monkeypatch.setattr(pairs_module, "load_pairs", load_pairs_and_draw)
    args = [f"model={sft_dir}", f"data={data}", "steps=1", "lora.enabled=true", "lora.r=4", "lab.test_size=4",
            "eval_max_new_tokens=8"]
    for i, n in enumerate((0, 7)):
        draws[0] = n
        with pytest.raises(Stop):
            load_script("recipes/dpo.py").main([*args, f"output_dir={tmp_path}/out{i}"])
    assert made[0].keys() == made[1].keys() and all(torch.equal(made[0][k], made[1][k]) for k in made[0])
