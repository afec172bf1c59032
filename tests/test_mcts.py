"""Technique 8: MCTS with a backtrack action (halluc/sources/mcts.py). Selection and backup against values
computed by hand on a small tree; the data a tree leaves against its invariants; a search on the
lab policy against the task verifier."""
from __future__ import annotations

import math

import pytest
from conftest import ROOT, load_script

from halluc.core.example import Role, apply_backtrack
from halluc.sources.mcts import (Node, SearchConfig, Tree, backup, expand, judged_bad, load_trees, puct, save_trees, search,
                         select, step_pairs, traces, uct)
from halluc.objectives.verifier_head import step_end_ids

BT, EOS = 99, 98


def _three_children() -> Tree:
    """root (N=3) -> A (P .5, N 2, W 1), B (P .3, N 1, W -1), C (P .2, N 0)."""
    t = Tree(problem=0, prompt=[100])
    t.nodes[0].visits, t.nodes[0].value_sum = 3, 0.0
    for step, prior, n, w in (([1], .5, 2, 1.0), ([2], .3, 1, -1.0), ([3], .2, 0, 0.0)):
        t.nodes.append(Node(step=step, parent=0, depth=1, prior=prior, visits=n, value_sum=w))
        t.nodes[0].children.append(len(t.nodes) - 1)
    return t


def test_puct_and_uct_scores_match_hand_computed_values():
    # PUCT: Q + 1.5 * P * sqrt(3) / (1 + N);  UCT: Q + 1.5 * sqrt(ln 3 / N)
    assert puct(0.5, .5, 3, 2, 1.5) == pytest.approx(0.9330127, abs=1e-6)
    assert puct(-1.0, .3, 3, 1, 1.5) == pytest.approx(-0.6102886, abs=1e-6)
    assert puct(0.0, .2, 3, 0, 1.5) == pytest.approx(0.5196152, abs=1e-6)
    assert uct(0.5, 3, 2, 1.5) == pytest.approx(1.6117284, abs=1e-6)
    assert uct(-1.0, 3, 1, 1.5) == pytest.approx(0.5722201, abs=1e-6)
    assert uct(0.0, 3, 0, 1.5) == math.inf


def test_selection_follows_the_rule_and_records_a_backtrack_only_when_it_abandons_a_worse_child():
    t = _three_children()
    assert select(t, "puct", 1.5) == 1      # A: 0.933 > C: 0.520 > B: -0.610
    assert select(_three_children(), "uct", 1.5) == 3  # C is unvisited
    assert t.backtracks == [] and t.nodes[0].last_child == 1
    # A's value drops: two more visits worth -3 (Q = (1 - 3) / 4 = -0.5); PUCT now prefers C (Q 0)
    backup(t, 1, -3.0, 2)
    assert (t.nodes[1].visits, t.nodes[1].value_sum, t.nodes[0].visits, t.nodes[0].value_sum) == (4, -2.0, 5, -3.0)
    assert t.nodes[1].q == -0.5
    # scores now: A -0.5 + 1.5*.5*sqrt5/5 = -0.165, B -1 + 1.5*.3*sqrt5/2 = -0.497, C 1.5*.2*sqrt5 = 0.671
    assert select(t, "puct", 1.5) == 3
    assert [(b.parent, b.abandoned, b.to) for b in t.backtracks] == [(0, 1, 3)]
    # leaving B (Q -1) for A (Q .5) is one too
    u = _three_children()
    u.nodes[0].last_child = 2
    assert select(u, "puct", 1.5) == 1 and [(b.abandoned, b.to) for b in u.backtracks] == [(2, 1)]
    # negative control: leaving C (Q .6, score .6 + 1.5*.2*sqrt3/2 = .860) for A (score .933, but
    # Q .5, lower) is exploration, not a backtrack
    v = _three_children()
    v.nodes[0].last_child = 3
    v.nodes[3].visits, v.nodes[3].value_sum = 1, 0.6
    assert select(v, "puct", 1.5) == 1 and v.backtracks == []


def test_expand_merges_identical_steps_and_priors_are_the_softmax_of_step_logprobs():
    t = Tree(problem=0, prompt=[100])
    new = expand(t, 0, [([1, 2], math.log(.5)), ([3], math.log(.25)), ([1, 2], math.log(.5))])
    assert new == [1, 2] and t.nodes[0].children == [1, 2]
    assert [t.nodes[i].count for i in new] == [2, 1]
    assert [t.nodes[i].prior for i in new] == pytest.approx([2 / 3, 1 / 3])
    assert [t.nodes[i].depth for i in new] == [1, 1]


def _solved() -> Tree:
    """prompt 100; step 1: good [1, 2, 3] (Q .5) or bad [1, 9] (Q -1, abandoned); step 2: [4, 5] + EOS, verified."""
    t = Tree(problem=0, prompt=[100])
    t.nodes += [Node(step=[1, 2, 3], parent=0, depth=1, visits=2, value_sum=1.0, children=[3]),
                Node(step=[1, 9], parent=0, depth=1, visits=1, value_sum=-1.0),
                Node(step=[4, 5], parent=1, depth=2, visits=1, value_sum=1.0, terminal=True, finished=True,
                     reward=1.0, verified=True)]
    t.nodes[0].children, t.nodes[0].visits = [1, 2], 3
    from halluc.sources.mcts import Backtrack
    t.backtracks.append(Backtrack(parent=0, abandoned=2, to=1, iteration=1))
    return t


def test_a_trace_writes_the_abandoned_step_erases_its_tail_and_reads_as_the_solution():
    (ex,) = traces(_solved(), BT, EOS)
    assert ex.ids == [100, 1, 9, BT, 2, 3, 4, 5, EOS]
    R = Role
    assert ex.roles == [R.PROMPT, R.KEPT, R.ERROR, R.BACKTRACK, R.CORRECTION, R.CORRECTION, R.KEPT, R.KEPT, R.KEPT]
    assert apply_backtrack(ex.response, BT) == [1, 2, 3, 4, 5, EOS]
    # negative control: a sibling the search did not judge bad is never written as an error
    t = _solved()
    t.nodes[2].value_sum = 0.5
    assert traces(t, BT, EOS) == []


def test_step_pairs_and_the_dpo_loader():
    from halluc.structure.pairs import check_pair

    (pair,) = step_pairs(_solved(), EOS)
    assert pair["prompt_ids"] == [100] and pair["chosen_ids"] == [1, 2, 3] and pair["rejected_ids"] == [1, 9]
    check_pair(pair, vocab_size=101, bt_id=BT, where="test")
    t = _solved()
    t.nodes[2].value_sum = 0.2  # both above 0: no preference
    assert step_pairs(t, EOS) == []


def test_trees_round_trip(tmp_path):
    t = _solved()
    save_trees(tmp_path / "trees.jsonl", [t, _three_children()])
    back = load_trees(tmp_path / "trees.jsonl")
    assert [x.to_dict() for x in back] == [t.to_dict(), _three_children().to_dict()]


def _check_values(t: Tree):
    """Every expanded node's visits: its own (1, the root none) plus its children's."""
    for i, n in enumerate(t.nodes):
        if n.children:
            own = 0 if i == 0 else 1
            assert n.visits == own + sum(t.nodes[c].visits for c in n.children)


def test_search_on_the_lab_policy(lab_policy, tmp_path):
    """A batched search with the task's verifier as the value: visit counts add up, every trace
    reads as a verified solution, every error in a trace is a step the search judged bad, and the
    search resumes from saved trees."""
    from halluc.sources.mcts import step_values
    from halluc.tasks import arith
    from halluc.core.tokens import backtrack_id
    from halluc.inference.verifiers import OracleVerifier

    folder, model, tok, problems = lab_policy
    bt = backtrack_id(tok)
    problems = problems[:8]
    cfg = SearchConfig(nodes=12, k=3, temperature=1.0, seed=1)
    trees = search(model, tok, arith, problems, cfg, OracleVerifier(arith, problems, tok), progress=False)
    assert all(len(t.nodes) >= 4 for t in trees)
    for t in trees:
        _check_values(t)
    built = [ex for t in trees for ex in traces(t, bt, tok.eos_token_id)]
    assert built, "no trace: the search found no bad sibling next to a verified solution"
    ends = step_end_ids(tok, arith.STEP_SEPARATOR)
    errors = 0
    for t in trees:
        for ex in traces(t, bt, tok.eos_token_id):
            text = tok.decode(apply_backtrack(ex.response, bt), skip_special_tokens=True)
            report = arith.verify_steps(problems[t.problem], arith.split_steps(text))
            assert report.all_ok and report.answer_correct
            # each error span: the step it ends is a child of the node its prefix reaches, judged bad
            response, roles = ex.response, ex.roles[ex.prompt_len:]
            i = 0
            while i < len(response):
                if roles[i] != Role.ERROR:
                    i += 1
                    continue
                j = i
                while j < len(response) and roles[j] == Role.ERROR:
                    j += 1
                visible = apply_backtrack(response[:i], bt)
                start = max((k + 1 for k, x in enumerate(visible) if x in ends), default=0)
                bad = [n for n in t.nodes if n.step == visible[start:] + response[i:j] and n.parent is not None
                       and t.tokens(n.parent) == visible[:start]]
                assert len(bad) == 1 and judged_bad(bad[0])
                errors += 1
                i = j
    assert errors >= len(built)
    rows = [r for t in trees for r in step_values(t, problems[t.problem], tok)]
    assert rows and all(len(r["labels"]) == len(r["completion_ids"]) for r in rows)
    save_trees(tmp_path / "t.jsonl", trees)
    more = search(model, tok, arith, problems, SearchConfig(nodes=20, k=3, seed=1),
                  OracleVerifier(arith, problems, tok), trees=load_trees(tmp_path / "t.jsonl"), progress=False)
    for a, b in zip(trees, more):  # a tree whose leaves are all finished only re-visits them
        assert b.iterations > a.iterations and [n.step for n in b.nodes[:len(a.nodes)]] == [n.step for n in a.nodes]
    assert sum(len(t.nodes) for t in more) > sum(len(t.nodes) for t in trees)


def test_one_step_at_a_time_stops_after_a_step_end_and_its_logprobs_equal_a_forward(lab_policy):
    """generate(stop_after=step ends, record_logprobs=True), what expansion calls: each row stops
    right after its first step-end token (kept), and the recorded log-probs are those of one plain
    forward over prompt + trace."""
    import torch

    from halluc.inference.generate import LoopGuards, Sampling, generate
    from halluc.tasks import arith

    _, model, tok, problems = lab_policy
    ends = step_end_ids(tok, arith.STEP_SEPARATOR)
    prompts = [tok(p.prompt)["input_ids"] for p in problems[:6]]
    gens = generate(model, prompts, max_new_tokens=40, backtrack_id=None, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, sampling=Sampling(1.0, 1.0, 2), guards=LoopGuards(max_backtracks=0),
                    stop_after=frozenset(ends), record_logprobs=True)
    assert all(g.stop == "stop_token" and g.trace[-1] in ends and not set(g.trace[:-1]) & ends for g in gens)
    for p, g in zip(prompts, gens):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + g.trace])).logits[0].float(), -1)
        want = [float(logp[len(p) - 1 + i, t]) for i, t in enumerate(g.trace)]
        assert g.logprobs == pytest.approx(want, abs=1e-4)
        other = [float(logp[len(p) - 1 + i, (t + 1) % logp.shape[-1]]) for i, t in enumerate(g.trace)]
        assert g.logprobs != pytest.approx(other, abs=1e-4)  # negative control: another token's log-prob


LAB = ["lab.train_size=2000", "lab.sft_size=200", "lab.test_size=24", "eval_max_new_tokens=64"]


def test_the_recipe_writes_data_the_other_recipes_read_and_resumes(lab_policy, tmp_path):
    """recipes/mcts.py on the lab policy, in 2 chunks: traces masked_sft reads (data=), pairs the DPO
    loader reads, step values in the PRM format. Killed after its first chunk (the second chunk's
    trees removed), resume=true searches only the rest and ends with the same trees."""
    from halluc.structure.pairs import load_pairs
    from halluc.objectives.prm import read_stepwise
    from halluc.core.tokens import backtrack_id

    folder, _, tok, _ = lab_policy
    mcts = load_script("recipes/mcts.py")
    args = [f"model={folder}", "problems=8", "chunk=4", "search.nodes=16", "search.k=3", *LAB]
    whole = mcts.main([f"output_dir={tmp_path}/a", *args])
    assert whole["search"]["problems"] == 8 and whole["data"]["traces"] > 0
    # greedy is measured as search is (every step and the answer right), its answer accuracy beside it
    sr = whole["search"]
    assert sr["greedy_solved"] <= sr["greedy_answer_right"] and sr["greedy_failed"] == round(8 * (1 - sr["greedy_answer_right"]))
    data = tmp_path / "a" / "data"
    assert len(load_pairs(str(data / "pairs"), tok, backtrack_id(tok))) == whole["data"]["pairs"] > 0
    assert len(read_stepwise(data / "steps.jsonl")) == whole["data"]["value_rows"]
    sft = load_script("recipes/masked_sft.py").main([f"output_dir={tmp_path}/sft", f"model={folder}",
                                                     f"data={data / 'sft'}", "sft.steps=2", "sft.batch_size=4",
                                                     "eval_max_new_tokens=8", *LAB[:3]])
    assert sft["sft_train"]["steps"] == 2 and sft["sft_train"]["final_loss"] > 0

    first = mcts.main([f"output_dir={tmp_path}/b", *args])
    lines = (tmp_path / "b" / "trees.jsonl").read_text().splitlines()
    (tmp_path / "b" / "trees.jsonl").write_text("\n".join(lines[:4]) + "\n")  # killed after chunk 1
    resumed = mcts.main([f"output_dir={tmp_path}/b", "resume=true", *args])
    assert (tmp_path / "b" / "trees.jsonl").read_text() == (tmp_path / "a" / "trees.jsonl").read_text()
    assert resumed["data"] == first["data"] == whole["data"]
    # the policy's own verifier head values open steps (one forward per text)
    head = mcts.main([f"output_dir={tmp_path}/c", f"model={folder}", "value=head", "problems=4", "search.nodes=8",
                      "greedy_baseline=false", *LAB])
    assert head["search"]["nodes"] > 4 and head["search"]["greedy_solved"] is None


def test_the_recipe_runs_on_gsm8k_files(tmp_path):
    """The search on GSM8K files with a tiny lab-trained policy: it runs end to end (the tiny model
    solves next to nothing; nothing about quality is asserted)."""
    from conftest import GSM8K_DIR

    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"GSM8K data not found at {GSM8K_DIR}")
    lines = (GSM8K_DIR / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:300]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[300:316]) + "\n")
    report = load_script("recipes/mcts.py").main([
        f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "lab.task=gsm8k",
        f"lab.train_file={tmp_path}/train.jsonl", f"lab.test_file={tmp_path}/test.jsonl", "lab.sft_size=100",
        "lab.test_size=16", "base.steps=20", "sft.steps=4", "base.batch_size=8", "sft.batch_size=8", "tiny.hidden=32",
        "problems=4", "search.nodes=8", "search.k=2", "search.max_step_tokens=24", "eval_max_new_tokens=24"])
    assert report["search"]["problems"] == 4 and report["search"]["nodes"] >= 4
    assert (tmp_path / "out" / "data" / "steps.jsonl").exists()


def test_rollouts_value_an_open_step_by_its_continuations(lab_policy):
    """search.rollouts=2: an open step's value is the mean reward of 2 finished continuations, so a
    leaf visited once holds -1, 0 or +1, and the rollouts' tokens count in `generated`."""
    from halluc.tasks import arith

    _, model, tok, problems = lab_policy
    plain = search(model, tok, arith, problems[:4], SearchConfig(nodes=6, k=2, seed=3), progress=False)
    rolled = search(model, tok, arith, problems[:4], SearchConfig(nodes=6, k=2, seed=3, rollouts=2), progress=False)
    leaves = [n for t in rolled for n in t.nodes if n.visits == 1 and not n.terminal and not n.children]
    assert leaves and all(n.value_sum in (-1.0, 0.0, 1.0) for n in leaves)
    assert any(n.value_sum != 0.0 for n in leaves)  # without a value every open step would hold 0
    assert all(n.value_sum == 0.0 for t in plain for n in t.nodes if n.visits == 1 and not n.terminal and not n.children)
    assert sum(t.generated for t in rolled) > sum(t.generated for t in plain)
    for t in rolled:
        _check_values(t)


def test_a_prefix_with_no_room_left_in_the_models_positions_is_a_dead_end(lab_policy):
    """With max_position_embeddings just above the prompts, no node's prefix plus one more step
    passes the limit: the search marks such prefixes dead ends (reward -1) instead of generating
    past it. Negative control: the same search with the model's own limit writes longer prefixes."""
    from halluc.tasks import arith

    _, model, tok, problems = lab_policy
    problems = problems[:4]
    cfg = SearchConfig(nodes=16, k=2, max_step_tokens=16, seed=2)
    longest = max(len(tok(p.prompt)["input_ids"]) for p in problems)
    free = search(model, tok, arith, problems, cfg, progress=False)
    saved = model.config.max_position_embeddings
    model.config.max_position_embeddings = longest + 2 * cfg.max_step_tokens
    try:
        tight = search(model, tok, arith, problems, cfg, progress=False)
    finally:
        model.config.max_position_embeddings = saved
    limit = longest + 2 * cfg.max_step_tokens
    assert all(len(t.prompt) + len(t.tokens(i)) <= limit for t in tight for i in range(len(t.nodes)))
    assert any(n.terminal and not n.finished and n.reward == -1.0 and len(n.step) < cfg.max_step_tokens
               and len(t.prompt) + len(t.tokens(i)) + cfg.max_step_tokens > limit
               for t in tight for i, n in enumerate(t.nodes))  # whole steps, stopped by the limit
    assert any(len(t.prompt) + len(t.tokens(i)) + cfg.max_step_tokens > limit
               for t in free for i in range(len(t.nodes)))


def test_a_used_output_dir_is_refused_or_emptied_not_searched_on(tmp_path):
    """MCTS leaves trees.jsonl, search.json and data/: the claim on output_dir saw none of them, so a new
    run (other seed, overwrite=true) loaded the old trees and wrote data with the wrong prompts."""
    from halluc.core.config import load_config
    from halluc.training.checkpoint import claim_output_dir

    mcts = load_script("recipes/mcts.py")
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "trees.jsonl").write_text("{}\n")
    (out / "search.json").write_text("{}")
    args = [f"output_dir={out}", f"cache_dir={tmp_path}/c"]
    with pytest.raises(SystemExit, match=r"already holds a partial run \(data, search.json, trees.jsonl\)"):
        claim_output_dir(load_config(mcts.Config, args, default_file=str(ROOT / "recipes/configs/mcts.yaml")))
    claim_output_dir(load_config(mcts.Config, [*args, "overwrite=true"],
                                 default_file=str(ROOT / "recipes/configs/mcts.yaml")))
    assert not any(out.iterdir())
