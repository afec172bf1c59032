"""Technique 5: examples and pairs built from the model's own tokens, checked by hand and by invariant."""
import copy
import json

import pytest
import torch

from halluc.core.example import Role, apply_backtrack
from halluc.inference.generate import Generation, Sampling
from halluc.core.model import tiny_llama
from halluc.sources.own_errors import (OwnError, RoundStats, _verified_continuation, build, char_ends, corrections, locate,
                               make_round, reference_continuation, save_round, token_cut)
from halluc.tasks import arith, gsm8k
from halluc.core.tokens import backtrack_id, train_tokenizer


def problem_with_three_steps():
    return next(p for p in arith.make_split(200, (2, 2), seed=4) if p.meta["defs"][list(p.meta["defs"])[1]][0]
                == list(p.meta["defs"])[0])  # the second step reads the first step's result


def generation(tok, text, stop="eos"):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return Generation(trace=ids, visible=ids, prompt_len=0, stop=stop)


def test_a_wrong_step_becomes_error_backtracks_and_correction_golden(bt_tokenizer):
    tok, bt = bt_tokenizer, backtrack_id(bt_tokenizer)
    p = problem_with_three_steps()
    first, second, answer = p.steps
    x = second.split("=")[0]                          # " c "
    head, tail = second.rsplit(" = ", 2)[0], second.rsplit(" = ", 2)[1:]   # " c = b op z", ["vy op vz", "v ;"]
    vy = int(tail[0].split()[0])
    wrong_second = second.replace(f"= {vy} ", f"= {(vy + 1) % 7} ", 1)
    assert arith.verify_steps(p, [first, wrong_second]).kinds == ["ok", "retrieval", "missing"]
    text = first + wrong_second + " answer = 0"
    stats = RoundStats()
    prompt = tok(p.prompt)["input_ids"]
    err = locate(arith, p, tok, 0, prompt, generation(tok, text), stats)
    assert (stats.wrong, stats.located, err.kind) == (1, 1, "retrieval")
    assert tok.decode(err.prefix) == first and tok.decode(err.wrong) == wrong_second
    assert tok.decode(err.after) == " answer = 0"

    fix = corrections(None, tok, arith, [p], [err], tries=0, sampling=Sampling(), max_new_tokens=8, stats=stats)[0]
    assert fix.source == "reference" and tok.decode(fix.step) == second and tok.decode(fix.rest) == answer
    ex, pair = build(err, fix, bt, tok.eos_token_id)
    roles = ex.roles[len(prompt):]
    error = [t for t, r in zip(ex.ids[len(prompt):], roles) if r == Role.ERROR]
    correction = [t for t, r in zip(ex.ids[len(prompt):], roles) if r == Role.CORRECTION]
    # only the divergent tail is the error: the shared " c = b op z =" stays KEPT
    assert tok.decode(error) == wrong_second[len(head) + 2:] and tok.decode(correction) == second[len(head) + 2:]
    assert roles.count(Role.BACKTRACK) == len(error)
    kept_head = [t for t, r in zip(ex.ids[len(prompt):], roles) if r == Role.KEPT][:len(err.prefix) + 1]
    assert tok.decode(kept_head).endswith(x.rstrip())  # the wrong step's target is shared, so kept
    assert apply_backtrack(ex.response, bt) == tok(first + second + answer, add_special_tokens=False)["input_ids"] \
        + [tok.eos_token_id]
    # the pair: shared prompt up to and including the error; chosen erases and corrects, rejected goes on
    assert pair["prompt_ids"] == prompt + err.prefix + err.wrong
    assert pair["chosen_ids"][:len(error)] == [bt] * len(error)
    assert pair["rejected_ids"] == err.after + [tok.eos_token_id]
    assert [Role(r) for r in pair["prompt_roles"][-len(error):]] == [Role.ERROR] * len(error)


def test_right_unlocated_and_unaligned_samples_are_counted_not_built(bt_tokenizer, tmp_path):
    tok = bt_tokenizer
    p = problem_with_three_steps()
    stats = RoundStats()
    assert locate(arith, p, tok, 0, [1], generation(tok, p.solution), stats) is None
    assert (stats.right, stats.wrong) == (1, 0)
    # cut off by the length limit mid-step: not an error of the model's, counted and skipped
    assert locate(arith, p, tok, 0, [1], generation(tok, p.steps[0] + " x = d +", stop="length"), stats) is None
    assert stats.unfinished == 1
    # GSM8K: every annotation right but the final answer wrong -> the verifier cannot say where
    row = {"question": "Tom has 3 apples and buys 4 more. How many?",
           "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
    (tmp_path / "g.jsonl").write_text(json.dumps(row) + "\n")
    g = gsm8k.read_jsonl(tmp_path / "g.jsonl")[0]
    gtok = train_tokenizer([g.prompt + g.solution] * 4, vocab_size=300)
    wrong_answer = " He has 3 + 4 = <<3+4=7>>7 apples.\n#### 8"
    assert locate(gsm8k, g, gtok, 0, [1], generation(gtok, wrong_answer), stats) is None
    assert stats.unlocated == 1
    # a wrong annotation is located, and the reference finishes it (the prefix is the reference's)
    bad = " He has 3 + 4 = <<3+4=8>>8 apples.\n#### 8"
    err = locate(gsm8k, g, gtok, 0, gtok(g.prompt)["input_ids"], generation(gtok, bad), stats)
    assert err is not None and err.prefix == [] and err.kind == "wrong_result"
    assert reference_continuation(gsm8k, g, []) == g.steps
    # a boundary inside a token is skipped, not cut wrongly
    assert token_cut([3, 7, 9], 5) is None and token_cut([3, 7, 9], 7) == 2 and token_cut([3], 0) == 0


def test_a_verified_continuation_is_the_models_own_correction(bt_tokenizer):
    tok, bt = bt_tokenizer, backtrack_id(bt_tokenizer)
    p = problem_with_three_steps()
    first, second, answer = p.steps
    prefix = tok(first, add_special_tokens=False)["input_ids"]
    wrong = tok(second.replace(" ;", " 1 ;"), add_special_tokens=False)["input_ids"]
    err = OwnError(0, [1, 2], prefix, wrong, [], True, "retrieval")
    right = tok(second + answer, add_special_tokens=False)["input_ids"]
    fix = _verified_continuation(arith, p, tok, err, right)
    assert fix.source == "model" and tok.decode(fix.step) == second and tok.decode(fix.rest) == answer
    ex, _ = build(err, fix, bt, tok.eos_token_id)
    assert apply_backtrack(ex.response, bt) == prefix + right + [tok.eos_token_id]
    wrong_rest = tok(second + answer.replace(p.answer, str((int(p.answer) + 1) % 7)), add_special_tokens=False)["input_ids"]
    assert _verified_continuation(arith, p, tok, err, wrong_rest) is None  # must verify whole
    # a continuation that writes the wrong step again is no correction
    assert _verified_continuation(arith, p, tok, OwnError(0, [1], prefix, right[:len(right) - len(
        tok(answer, add_special_tokens=False)["input_ids"])], [], True, "x"), right) is None
    assert char_ends(tok, right)[-1] == len(tok.decode(right))


def test_a_round_from_a_tiny_model_keeps_every_invariant(bt_tokenizer, arith_problems, tmp_path):
    from datasets import load_from_disk

    tok = copy.deepcopy(bt_tokenizer)
    bt = backtrack_id(tok)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, eos_token_id=tok.eos_token_id).eval()
    problems = arith_problems[:24]
    rows, pairs, stats = make_round(model, tok, arith, problems, k=2, sampling=Sampling(1.0, 1.0, 3),
                                    max_new_tokens=40, correction_tries=1, per_problem=1, bt_id=bt)
    assert stats.samples == 48 and stats.right + stats.wrong == 48
    assert stats.located + stats.unlocated + stats.unaligned + stats.unfinished == stats.wrong
    bt_pairs = [p for p in pairs if p["form"] == "bt"]
    assert len(rows) == len(bt_pairs) == stats.kept > 0
    assert sum(p["form"] == "balanced" for p in pairs) == stats.balanced
    assert sum(p["form"] == "step" for p in pairs) <= stats.kept
    for row, pair in zip(rows, bt_pairs):
        assert len(row["input_ids"]) <= 256 and row["roles"].count(Role.BACKTRACK) <= 32  # as generation allows
        p = problems[row["problem"]]
        prompt = tok(p.prompt)["input_ids"]
        response = row["input_ids"][len(prompt):]
        clean = apply_backtrack(response, bt)
        text = tok.decode(clean, skip_special_tokens=True)
        assert arith.verify_steps(p, arith.split_steps(text)).all_ok  # the clean response solves it
        assert row["labels"][:len(prompt)] == [-100] * len(prompt)
        assert all(lab == -100 for lab, r in zip(row["labels"], row["roles"]) if r == Role.ERROR)
        assert apply_backtrack(pair["prompt_ids"][len(prompt):] + pair["chosen_ids"], bt) == clean
    save_round(tmp_path / "r", rows, pairs, stats)
    assert len(load_from_disk(str(tmp_path / "r" / "sft"))) == len(rows)
    assert set(load_from_disk(str(tmp_path / "r" / "pairs")).column_names) >= {
        "prompt_ids", "prompt_roles", "chosen_ids", "chosen_roles", "rejected_ids", "rejected_roles"}
    assert json.loads((tmp_path / "r" / "stats.json").read_text())["kept"] == len(rows)


@pytest.mark.parametrize("seed", range(3))
def test_reference_continuation_solves_from_any_right_prefix(seed):
    for p in arith.make_split(30, (2, 5), seed=seed, cfg=arith.ArithConfig(listing="swapped", swap_rate=0.5)):
        for i in range(len(p.steps)):
            rest = reference_continuation(arith, p, p.steps[:i])
            assert rest is not None and arith.verify_steps(p, p.steps[:i] + rest).all_ok
