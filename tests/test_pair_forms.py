"""The three preference-pair forms (halluc/sources/pair_forms.py): golden pairs, balanced pairs from
sampled solutions (every one a right step followed by a right step), and the weighted draw."""
import copy

import pytest

from halluc.core.example import Role, apply_backtrack
from halluc.core.inputs import InputError
from halluc.core.tokens import backtrack_id
from halluc.inference.generate import Generation
from halluc.sources.pair_forms import balanced_pair, balanced_pairs, select_forms, step_pair
from halluc.structure.pairs import check_pair, layout_pair
from halluc.tasks import arith

BT = 99
K, ER, BK, CO, PR = int(Role.KEPT), int(Role.ERROR), int(Role.BACKTRACK), int(Role.CORRECTION), int(Role.PROMPT)


def test_step_pair_golden():
    # prompt [50], right steps [1, 2], wrong step [3, 4, 9] where the right one is [3, 4, 5, 6]
    pair = step_pair([50], [1, 2], [3, 4, 9], [3, 4, 5, 6])
    assert pair == {"prompt_ids": [50, 1, 2, 3, 4], "prompt_roles": [PR, K, K, K, K],
                    "chosen_ids": [5, 6], "chosen_roles": [CO, CO], "rejected_ids": [9], "rejected_roles": [K]}
    assert step_pair([50], [1], [3, 4], [3, 4, 5]) is None  # the wrong step is a prefix of the right one


def test_balanced_pair_golden_and_both_sides_leave_the_same_text():
    visible = [1, 2, 3, 4, 5, 6, 7]  # steps [1, 2] [3, 4, 5] [6, 7]
    pair = balanced_pair([50], visible, [2, 5, 7], 1, BT)
    assert pair["prompt_ids"] == [50, 1, 2] and pair["prompt_roles"] == [PR, K, K]
    assert pair["chosen_ids"] == [3, 4, 5, 6, 7] and pair["chosen_roles"] == [K] * 5
    assert pair["rejected_ids"] == [3, 4, 5, BT, BT, BT, 3, 4, 5, 6, 7]
    assert pair["rejected_roles"] == [ER] * 3 + [BK] * 3 + [CO] * 3 + [K, K]
    assert apply_backtrack(pair["prompt_ids"] + pair["rejected_ids"], BT) == pair["prompt_ids"] + pair["chosen_ids"]
    check_pair(pair, 100, BT, "golden")
    for mode in ("causal", "block_errors"):
        layout_pair(pair, mode)  # lays out under every layout (its erased step is in its own branch)
    first = balanced_pair([50], visible, [2, 5, 7], 0, BT)
    assert first["prompt_ids"] == [50] and first["chosen_ids"] == [1, 2, 3, 4, 5]


def _gen(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return Generation(trace=ids, visible=ids, prompt_len=0, stop="eos")


def test_balanced_pairs_from_samples_continue_only_after_right_steps(bt_tokenizer, arith_problems):
    """Right samples and the right prefix of wrong ones give pairs whose chosen side is two right steps;
    a sample with fewer than two right steps gives none (negative control: its corrupted step)."""
    tok = copy.deepcopy(bt_tokenizer)
    bt = backtrack_id(tok)
    problems = [p for p in arith_problems if len(p.steps) >= 4][:20]
    samples = []
    for i, p in enumerate(problems):
        prompt = tok(p.prompt)["input_ids"]
        samples.append((i, prompt, _gen(tok, p.solution)))  # right
        wrong_first = arith.corrupt_step(p, 0, __import__("random").Random(i))
        samples.append((i, prompt, _gen(tok, wrong_first + "".join(p.steps[1:]))))  # wrong at step 0
    pairs, why = balanced_pairs(arith, problems, tok, samples, bt, per_problem=2, seed=0)
    assert len(pairs) == why["kept"] == len(problems)  # one per right sample, none from the wrong-first ones
    assert why["fewer_than_two_right_steps"] == len(problems)
    for pair in pairs:
        p = problems[pair["problem"]]
        prompt = tok(p.prompt)["input_ids"]
        done = tok.decode(pair["prompt_ids"][len(prompt):] + pair["chosen_ids"], skip_special_tokens=True)
        steps = arith.split_steps(done)
        kinds = arith.verify_steps(p, steps).kinds  # a partial solution: its answer is reported missing
        assert len(steps) >= 2 and kinds[:len(steps)] == ["ok"] * len(steps)
        check_pair(pair, len(tok), bt, "sampled")
        assert apply_backtrack(pair["prompt_ids"] + pair["rejected_ids"], bt) == pair["prompt_ids"] + pair["chosen_ids"]


def test_select_forms_draws_each_form_per_bt_pair_and_refuses_formless_data():
    pairs = [{"form": "bt", "i": i} for i in range(10)] + [{"form": "step", "i": i} for i in range(10)] + \
        [{"form": "balanced", "i": i} for i in range(30)]
    got = select_forms(pairs, {"bt": 1, "step": 0.5, "balanced": 2}, seed=0)
    assert sorted(p["form"] for p in got).count("bt") == 10
    assert [p["form"] for p in got].count("step") == 5 and [p["form"] for p in got].count("balanced") == 20
    assert len({(p["form"], p["i"]) for p in got}) == len(got)  # drawn without repeats
    assert len(select_forms(pairs, {"bt": 1, "step": 3}, seed=0)) == 20  # never more than there are
    assert select_forms(pairs, {"bt": 1}, seed=3) == pairs[:10]  # the default: the bt pairs as built, in order
    assert select_forms([{"x": 1}], {"bt": 1}, seed=0) == [{"x": 1}]  # a user's file: every pair is bt
    with pytest.raises(InputError, match="no `form` column"):
        select_forms([{"x": 1}], {"bt": 1, "balanced": 1}, seed=0)
    with pytest.raises(InputError, match="select no pair"):
        select_forms(pairs, {"bt": 0}, seed=0)
