"""The first invariant for every error source and task, golden labels, and safe truncation."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halluc import Role, apply_backtrack
from halluc.sources.data import build_sft_dataset, fit_length, labels_from_roles, make_example
from halluc.sources.errors import ErrorConfig, random_token_errors, step_errors
from halluc.core.example import IGNORE_INDEX
from halluc.tasks import arith, gsm8k
from halluc.core.tokens import backtrack_id

P, K, E, B, C = (int(r) for r in Role)


def test_golden_labels_masked_and_unmasked():
    ids = [10, 11, 20, 21, 99, 99, 30, 31, 40, 2]
    roles = [P, P, K, E, B, B, C, C, K, K]
    #        prompt   kept error  BT  BT  correction kept eos
    assert labels_from_roles(ids, roles, masked=True) == [IGNORE_INDEX, IGNORE_INDEX, 20, IGNORE_INDEX, 99, 99, 30, 31, 40, 2]
    assert labels_from_roles(ids, roles, masked=False) == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 99, 99, 30, 31, 40, 2]


def test_golden_random_token_example():
    rng = random.Random(0)
    ex = random_token_errors([7, 8], [[1, 2], [3]], eos_id=0, bt_id=99, vocab=[50], cfg=ErrorConfig(
        source="random", sites=1, tokens_per_site=2), rng=rng)
    site = ex.roles.index(E) - 2
    assert ex.ids[:2] == [7, 8] and ex.roles[:2] == [P, P]
    assert ex.ids[2 + site:2 + site + 4] == [50, 50, 99, 99]
    assert apply_backtrack(ex.response, 99) == [1, 2, 3, 0]


def test_golden_step_example_erases_only_the_divergent_tail():
    right, wrong = [5, 6, 7, 8], [5, 6, 9]
    ex = step_errors([1], [[2], right], eos_id=None, bt_id=99, wrong_step=lambda i: wrong if i == 1 else None,
                     cfg=ErrorConfig(sites=2), rng=random.Random(0))
    assert ex.ids == [1, 2, 5, 6, 9, 99, 7, 8]
    assert ex.roles == [P, K, K, K, E, B, C, C]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), source=st.sampled_from(["random", "step"]),
       sites=st.integers(1, 4), per_site=st.integers(1, 4), cap=st.integers(0, 3))
def test_invariant_every_source_arith(bt_tokenizer, arith_problems, seed, source, sites, per_site, cap):
    bt = backtrack_id(bt_tokenizer)
    cfg = ErrorConfig(source=source, example_rate=1.0, sites=sites, tokens_per_site=per_site, max_error_tokens=cap)
    rng = random.Random(seed)
    problem = arith_problems[seed % len(arith_problems)]
    ex = make_example(problem, bt_tokenizer, cfg, bt, rng)  # raises if the invariant breaks
    clean = bt_tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [bt_tokenizer.eos_token_id]
    assert apply_backtrack(ex.response, bt) == clean
    assert ex.roles.count(B) == ex.roles.count(E) > 0


def test_invariant_gsm8k_real_data(bt_tokenizer, gsm8k_test_file):
    bt = backtrack_id(bt_tokenizer)
    problems = gsm8k.read_jsonl(gsm8k_test_file, limit=200)
    rng = random.Random(0)
    n_err = 0
    for source in ("random", "step"):
        for p in problems:
            ex = make_example(p, bt_tokenizer, ErrorConfig(source=source, example_rate=1.0, sites=2), bt, rng)
            assert apply_backtrack(ex.response, bt)[:-1] == bt_tokenizer(p.solution, add_special_tokens=False)["input_ids"]
            n_err += ex.roles.count(E) > 0
    assert n_err > 350  # nearly every example really got an error


def test_step_errors_are_what_the_verifier_flags(arith_problems):
    rng = random.Random(1)
    kinds = set()
    for p in arith_problems[:100]:
        for i in range(len(p.steps)):
            wrong = arith.corrupt_step(p, i, rng)
            kind = arith.check_step(p, wrong, set(list(p.meta["defs"])[:i]))
            assert kind != "ok", (p.prompt, i, wrong)
            kinds.add(kind)
    assert {"retrieval", "arith", "not_computed", "wrong_answer"} <= kinds


def test_fit_length_never_splits_an_error_from_its_backtracks():
    roles = [P, P, K, K, E, E, B, B, C, C, K]
    for max_len in range(1, len(roles) + 3):
        cut = fit_length(list(range(len(roles))), roles, max_len)
        if cut is None:
            continue
        assert cut <= max_len
        kept = roles[:cut]
        assert kept.count(E) == kept.count(B)  # every error that is in keeps all its BTs
    assert fit_length(list(range(11)), roles, 5) == 4  # cut moves left of the error run
    assert fit_length(list(range(11)), roles, 2) is None  # nothing but prompt would remain


def test_dataset_columns_and_overlong_log(bt_tokenizer, arith_problems, caplog):
    bt = backtrack_id(bt_tokenizer)
    with caplog.at_level("INFO"):
        ds = build_sft_dataset(arith_problems[:100], bt_tokenizer, ErrorConfig(example_rate=1.0), bt,
                               max_len=70, overlong="drop")
    assert set(ds.column_names) >= {"input_ids", "labels", "roles"}
    assert ds.features["roles"].feature.names == ["prompt", "kept", "error", "backtrack", "correction"]
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "longer than max_len=70" in r.message]
    assert warned and "dropped" in warned[0].message and "raise max_len or set overlong=truncate" in warned[0].message
    assert 0 < len(ds) < 100 and max(len(x) for x in ds["input_ids"]) <= 70
    with pytest.raises(ValueError, match="all 100 examples are longer than max_len=10"):
        build_sft_dataset(arith_problems[:100], bt_tokenizer, ErrorConfig(example_rate=1.0), bt, max_len=10)
    with pytest.raises(ValueError, match="no problems"):
        build_sft_dataset([], bt_tokenizer, ErrorConfig(example_rate=1.0), bt)
    for ids, labels, roles in zip(ds["input_ids"], ds["labels"], ds["roles"]):
        assert labels == labels_from_roles(ids, roles, masked=True)


@pytest.mark.slow
def test_num_proc_gives_the_same_data(bt_tokenizer, arith_problems):
    bt = backtrack_id(bt_tokenizer)
    cfg = ErrorConfig(source="random", example_rate=0.7, sites=2)
    one = build_sft_dataset(arith_problems[:60], bt_tokenizer, cfg, bt, seed=3)
    two = build_sft_dataset(arith_problems[:60], bt_tokenizer, cfg, bt, seed=3, num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["roles"] == two["roles"]


def test_invariant_generic_jsonl(bt_tokenizer, tmp_path):
    import json

    from halluc.tasks import jsonl

    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"step one {i}\nstep two\nanswer {i}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bt = backtrack_id(bt_tokenizer)
    for p in jsonl.read_jsonl(path):
        for source in ("random", "step"):
            ex = make_example(p, bt_tokenizer, ErrorConfig(source=source, example_rate=1.0), bt, random.Random(0))
            assert apply_backtrack(ex.response, bt)[:-1] == bt_tokenizer(p.solution, add_special_tokens=False)["input_ids"]


def test_listing_orders_give_the_same_problems_and_premature_targets_are_not_computed():
    dep = arith.make_split(200, (2, 4), seed=3)
    swapped = arith.make_split(200, (2, 4), seed=3, cfg=arith.ArithConfig(listing="swapped", swap_rate=0.5))
    shuffled = arith.make_split(200, (2, 4), seed=3, cfg=arith.ArithConfig(listing="shuffled"))
    assert [p.steps for p in dep] == [p.steps for p in swapped] == [p.steps for p in shuffled]
    assert [arith.identity(p) for p in dep] == [arith.identity(p) for p in swapped]
    changed = [(d, s) for d, s in zip(dep, swapped) if d.prompt != s.prompt]
    assert 50 < len(changed) < 200
    def listing(p):
        return p.prompt.split(" . ")[0].split(" , ")

    assert all(sorted(listing(d)) == sorted(listing(s)) for d, s in changed)
    # following a swapped listing names a quantity before its input: not_computed, from the target on
    found = 0
    for d, s in changed:
        listed = [part.split(" = ")[0] for part in listing(s)[1:]]
        first = listed[0]
        step = next(st for st in d.steps if st.startswith(f" {first} ="))
        y, _, z = d.meta["defs"][first]
        if any(t.isalpha() and t != d.meta["constant"] for t in (y, z)):  # it needs a computed quantity
            found += 1
            assert arith.verify_steps(d, [step]).kinds[0] == "not_computed"
            garbled = step.replace(f" {first} = {d.meta['defs'][first][0]}", f" {first} = {d.meta['constant']}", 1)
            assert arith.verify_steps(d, [garbled]).kinds[0] == "not_computed"  # whatever is copied after
        else:
            assert arith.verify_steps(d, [step]).kinds[0] == "ok"  # from the constant alone: any order is fine
    assert found > 10
    assert arith.verify_steps(dep[0], dep[0].steps).all_ok  # the reference still verifies
