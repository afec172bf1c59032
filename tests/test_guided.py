"""Guided decoding (issue 12): a verifier hooked into the generator erases a step it scores low.

The policy is the tiny lab model of conftest's `lab_policy` (masked SFT with a verifier head): sampled
at temperature 0.7 it makes many wrong steps, which is what these tests need. Its own BTs are switched off (loop guard
max_backtracks=0), so every BT in a trace is the verifier's.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from halluc.inference.generate import Guide, Guided, LoopGuards, Sampling, generate
from halluc.tasks import arith
from halluc.objectives.verifier_head import step_end_ids
from halluc.inference.verifiers import HeadVerifier, OracleVerifier

NO_OWN_BT = LoopGuards(max_backtracks=0)


@pytest.fixture(scope="module")
def policy(lab_policy):
    from halluc.core.tokens import backtrack_id

    _, model, tok, problems = lab_policy
    return model, tok, backtrack_id(tok), problems


def _prompts(tok, problems):
    return [tok(p.prompt)["input_ids"] for p in problems]


def _run(model, tok, bt, prompts, verifier=None, semantics="keep", sampling=Sampling(0.7, 1.0, 3),
         guide=Guide(budget=50), max_new_tokens=192):
    return generate(model, prompts, max_new_tokens=max_new_tokens, backtrack_id=bt, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, semantics=semantics, sampling=sampling, guards=NO_OWN_BT,
                    guided=None if verifier is None else Guided(verifier, step_end_ids(tok, ";"), guide))


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
def test_an_oracle_verifier_backtracks_exactly_at_every_first_error(policy, semantics):
    """Replaying each trace: wherever a step ends (a ';' token, or the end of the text) and the
    visible text is wrong, a BT run follows at once and erases exactly that step; wherever it is
    right, none does. Sampled at temperature 0.7, so there are many errors to catch."""
    model, tok, bt, problems = policy
    ends = step_end_ids(tok, ";")
    oracle = OracleVerifier(arith, problems, tok)
    gens = _run(model, tok, bt, _prompts(tok, problems), oracle, semantics)
    runs = wrong_ends = 0
    for problem, g in zip(problems, gens):
        visible: list[int] = []
        i, cut = 0, False
        while i < len(g.trace):
            t = g.trace[i]
            assert t != bt, "a BT that no step end asked for"
            visible.append(t)
            ended = t in ends or (i + 1 == len(g.trace) and g.stop == "eos") or \
                (i + 1 < len(g.trace) and g.trace[i + 1] == bt)
            i += 1
            if not ended:
                continue
            wrong = not oracle.text_is_right(problem, tok.decode(visible, skip_special_tokens=True))
            step_start = max((k + 1 for k, x in enumerate(visible[:-1]) if x in ends), default=0)
            run = 0
            while i < len(g.trace) and g.trace[i] == bt:
                run, i = run + 1, i + 1
            if i == len(g.trace) and g.stop == "length":
                cut = True  # a run cut short by the length limit
                runs += run > 0
                wrong_ends += run > 0
                break
            assert (run > 0) == wrong, tok.decode(visible)
            wrong_ends += wrong
            if run:
                assert run == len(visible) - step_start  # exactly the step
                del visible[step_start:]
                runs += 1
        assert cut or visible == g.visible
    assert runs == sum(g.n_guided for g in gens) and runs > 10 and wrong_ends == runs
    # the guided outputs hold more right steps than the unguided ones (the same sampling seed)
    plain = _run(model, tok, bt, _prompts(tok, problems))

    def right_steps(gs):
        kinds = [k for p, g in zip(problems, gs) for k in arith.verify_steps(p, arith.split_steps(tok.decode(g.visible))).kinds]
        return kinds.count("ok") / len(kinds)
    assert right_steps(gens) > right_steps(plain) + 0.1


def test_a_verifier_never_below_threshold_changes_nothing(policy):
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)
    calls = []

    def content(items, rows):
        calls.append(len(items))
        return [1.0] * len(items)

    for semantics in ("keep", "rewind"):
        plain = _run(model, tok, bt, prompts, semantics=semantics)
        guided = _run(model, tok, bt, prompts, content, semantics=semantics)
        assert [g.trace for g in guided] == [g.trace for g in plain]
        assert sum(g.verifier_calls for g in guided) == sum(calls) > len(problems)
        calls.clear()


def _replay(g, bt, ends):
    """(the verifier's runs, the trace indices of the model's own BTs, the visible text) of one trace.
    Each run: its first BT's trace index, the visible index its step started at, the trace index of
    that step's first visible token, the step it erased, and the run's length (shorter than the step
    only when the length limit cut it)."""
    runs, own, visible, at = [], [], [], []  # at: trace index of each visible token
    forced, i = set(g.guided_at), 0
    while i < len(g.trace):
        if i in forced:
            start = max((k + 1 for k, x in enumerate(visible[:-1]) if x in ends), default=0)
            n = min(len(visible) - start, len(g.trace) - i)  # a run cut by the length limit is shorter
            assert g.trace[i:i + n] == [bt] * n
            runs.append({"at": i, "start": start, "first": at[start], "erased": visible[start:], "n": n})
            del visible[start:], at[start:]
            i += n
            continue
        if g.trace[i] == bt:
            own.append(i)
            if visible:
                visible.pop(), at.pop()
        else:
            visible.append(g.trace[i]), at.append(i)
        i += 1
    return runs, own, visible


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
def test_guided_greedy_batched_equals_one_by_one_and_never_repeats_an_erased_step(policy, semantics):
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:12]
    ends = step_end_ids(tok, ";")
    oracle = OracleVerifier(arith, problems, tok)
    guide = Guide(budget=3, resample="ban")
    batched = _run(model, tok, bt, prompts, oracle, semantics, sampling=Sampling(), guide=guide)
    single = [_run(model, tok, bt, [p], oracle, semantics, sampling=Sampling(), guide=guide)[0] for p in prompts]
    assert [g.trace for g in batched] == [g.trace for g in single]
    assert sum(g.n_guided for g in batched) > 0 and all(g.n_guided <= guide.budget for g in batched)
    # ban: the step written where one was erased never starts with a verbatim copy of an erased version
    # (its content, separator excluded); greedy without the ban would write the erased step again
    checked = 0
    for g in batched:
        runs, _, _ = _replay(g, bt, ends)
        erased_at: dict[int, list[list[int]]] = {}
        for run in runs:
            e = run["erased"]
            erased_at.setdefault(run["start"], []).append(e[:-1] if len(e) > 1 and e[-1] in ends else e)
            i = run["at"] + run["n"]
            rewrite = []
            while i < len(g.trace) and g.trace[i] != bt and not (rewrite and rewrite[-1] in ends):
                rewrite.append(g.trace[i])
                i += 1
            if i == len(g.trace) and g.stop == "length":
                continue
            for content in erased_at[run["start"]]:
                assert rewrite[:len(content)] != content, tok.decode(rewrite)
                checked += 1
    assert checked > 0


def test_a_verifiers_bts_are_not_counted_by_the_loop_guards(policy):
    """With a cap of 2 own BTs per solution, the model still writes its own BTs after a verifier's
    runs (each longer than the cap): were the verifier's BTs counted, none could follow them. The
    tiny policy rarely backtracks by itself, so a bias on the BT logit makes it."""
    model, tok, bt, problems = policy
    ends = step_end_ids(tok, ";")
    cap = 2
    bias = torch.zeros(model.config.vocab_size)
    bias[bt] = 4.0  # so that it writes some
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    try:
        gens = generate(model, _prompts(tok, problems), max_new_tokens=192, backtrack_id=bt,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, semantics="keep",
                        sampling=Sampling(1.0, 1.0, 5), guards=LoopGuards(max_backtracks=cap),
                        guided=Guided(OracleVerifier(arith, problems, tok), ends, Guide(budget=50)))
    finally:
        handle.remove()
    own_after_cap = 0
    for g in gens:
        runs, own, _ = _replay(g, bt, ends)
        assert len(own) <= cap
        assert len(own) + sum(r["n"] for r in runs) == g.n_backtracks
        forced_before = [sum(r["n"] for r in runs if r["at"] < i) for i in own]
        own_after_cap += sum(n + k >= cap for k, n in enumerate(forced_before))
    assert own_after_cap > 0


def test_the_head_scores_in_generation_equal_a_full_forward(policy):
    """HeadVerifier reads the head at the newest position of each decoding forward: the same numbers
    as the head over the finished text (HeadVerifier.solution_scores), at every step end."""
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:8]
    assert len(set(map(tuple, prompts))) == len(prompts)
    head = HeadVerifier(model)
    seen: dict[tuple, list[float]] = {}  # by prompt: `rows` are rows of the latest forward, not prompt indices

    def recording(items, rows):
        for (prompt, _), s in zip(items, head(items, rows)):
            seen.setdefault(tuple(prompt), []).append(s)
        return [1.0] * len(items)  # never erase: the trace is the text

    gens = _run(model, tok, bt, prompts, recording, sampling=Sampling())
    ends = step_end_ids(tok, ";")
    for r, g in enumerate(gens):
        steps, cur = [], []
        for t in g.visible:
            cur.append(t)
            if t in ends:
                steps.append(cur)
                cur = []
        if cur and g.stop == "eos":
            steps.append(cur)
        want = head.solution_scores([prompts[r]], [steps])[0]
        torch.testing.assert_close(torch.tensor(seen.get(tuple(prompts[r]), [])), torch.tensor(want), atol=1e-4, rtol=1e-4)


def test_every_verifier_kind_is_made_by_name_and_scores_whole_solutions_as_it_scores_prefixes(policy):
    """make_verifier builds each kind; a verifier's solution scores are its scores of each step prefix
    (the oracle), and a head reading texts gives the last step's solution score."""
    from halluc.inference.verifiers import PRMVerifier, make_verifier

    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:6]
    steps = [[tok(s, add_special_tokens=False)["input_ids"] for s in p.steps[:3]] for p in problems[:6]]
    for s in steps[1::2]:
        s[1] = s[0]  # a step written twice: wrong from there on
    oracle = make_verifier("oracle", tokenizer=tok, task=arith, problems=problems)
    assert isinstance(oracle, OracleVerifier)
    solution_scores = oracle.solution_scores(prompts, steps)
    for p, s, scores in zip(prompts, steps, solution_scores):
        assert scores == [oracle([(p, [t for x in s[:i + 1] for t in x])])[0] for i in range(len(s))]
    assert {x for scores in solution_scores for x in scores} == {0.0, 1.0}
    head = make_verifier("head", policy=model, tokenizer=tok, head_reads="text")
    assert isinstance(head, HeadVerifier)
    items = [(p, [t for x in s for t in x]) for p, s in zip(prompts, steps)]
    assert head(items) == pytest.approx([s[-1] for s in head.solution_scores(prompts, [[v] for _, v in items])])
    assert isinstance(make_verifier("prm", prm=model, prm_tokenizer=tok, tokenizer=tok), PRMVerifier)
    assert make_verifier("none") is None and make_verifier(None) is None
    with pytest.raises(ValueError, match="verifier kind must be"):
        make_verifier("judge")


def _contexts(g, prompt, bt, ends, semantics, erase, own_pairs_leave=True, rewrite_from_bt=True):
    """Replay one trace by the rules of docs/verifiers.md. Returns
    - `plain`: {trace index of a normal token: the tokens in the cache when it was chosen}, for every
      token chosen from one plain forward;
    - `same`: {trace index of a rewrite's first token: trace index of the first token of the step it
      replaces} (the rewrite restarts from the logits that token came from);
    - `hits`: how often each rule applied.
    The model's own BTs follow `semantics` (keep: they and the token they erased stay in context;
    rewind: both leave, and the token right after a BT comes from the last BT's forward, the BT as the
    query, which test_generate checks against the block-errors forward, so it is not a plain forward).
    A verifier's run that erases (erase="rewind", and the step's start logits are still current)
    removes everything from the step's first visible token on, the model's own BT pairs inside the
    step too (`own_pairs_leave`; False is a negative control); otherwise it acts as the model's own BTs.
    A rewrite's first token comes from the logits its erased step started from: a plain forward over
    the clean prefix, or (rewind semantics) a BT's logits when that step itself began right after a BT
    run (`rewrite_from_bt`; False, replaying it as a plain forward, is a negative control)."""
    forced, ctx, visible, plain, same, hits = set(g.guided_at), [], [], {}, {}, Counter()
    step_at, step_first, step_after_bt, after_bt, i, run_left = -1, -1, False, False, 0, 0
    while i < len(g.trace):
        t = g.trace[i]
        if i in forced:
            start = max((k + 1 for k, (_, x) in enumerate(visible[:-1]) if x in ends), default=0)
            n = min(len(visible) - start, len(g.trace) - i)
            if erase == "rewind" and step_at == start:
                first = visible[start][0]
                hits["erasing run"] += 1
                hits["own BTs inside an erased step"] += sum(j >= first and x == bt for j, x in enumerate(g.trace[:i]))
                dead = {j for j, _ in visible[start:]}
                ctx = [e for e in ctx if e[0] < first or (not own_pairs_leave and e[0] not in dead)]
                del visible[start:]
                i += n
                if i < len(g.trace) and g.trace[i] != bt:  # the rewrite's first token
                    hits["rewrite start"] += 1
                    hits["rewrite start from a BT's logits"] += step_after_bt
                    same[i] = step_first
                    after_bt = step_after_bt and rewrite_from_bt
                continue
            hits["stale run (acts as own BTs)" if erase == "rewind" else "keeping run"] += 1
            run_left = n
        if t == bt:
            hits["own BT"] += run_left == 0
            run_left = max(run_left - 1, 0)
            if visible:
                erased = visible.pop()
                if semantics == "rewind":
                    ctx.remove(erased)
            if semantics == "keep":
                ctx.append((i, t))
            after_bt = True
        else:
            if not (semantics == "rewind" and after_bt):
                plain[i] = prompt + [x for _, x in ctx]
            if not visible or visible[-1][1] in ends:
                step_at, step_first, step_after_bt = len(visible), i, semantics == "rewind" and after_bt
            after_bt = False
            visible.append((i, t)), ctx.append((i, t))
        i += 1
    return plain, same, hits


@torch.no_grad()
def last_logits(model, contexts: list[list[int]]) -> list[torch.Tensor]:
    """The logits after each context, from one plain causal forward per context that is not a prefix of
    another (a causal model's logits at a position see only the tokens before it). Sorted, a context is
    a prefix of another exactly when it is a prefix of the next one; rows are right padded (never seen)."""
    order = sorted(range(len(contexts)), key=lambda k: contexts[k])
    row_of, rows, after = {}, [], None
    for k in reversed(order):
        if after is not None and contexts[after][:len(contexts[k])] == contexts[k]:
            row_of[k] = row_of[after]
        else:
            row_of[k] = len(rows)
            rows.append(contexts[k])
        after = k
    width = max(map(len, rows))
    logits = model(input_ids=torch.tensor([r + [0] * (width - len(r)) for r in rows])).logits
    return [logits[row_of[k], len(c) - 1] for k, c in enumerate(contexts)]


# Sampled traces differ from machine to machine (float sums in other orders flip samples), so the test
# below samples many (2 semantics x 2 erase modes x 2 BT biases x 6 seeds x 12 prompts = 48 runs) and
# asserts that every rule applied. Counts on one machine (measured / asserted minimum): erasing runs
# 907 / 100, rewrite starts 796 / 100, own BTs inside erased steps 286 / 30, rewrite starts from a BT's
# logits 244 / 30, rows at the own-BT cap 411 / 30, keeping runs 1,189 / 100, and the rarest, stale
# runs 16 / 3 (own BTs must first cross into an earlier step; P(< 3) at a mean of 16 is ~1e-5).
SEEDS, BT_BIASES, OWN_BT_CAP = range(6), (6.0, 10.0), 12
MIN_HITS = {"erasing run": 100, "rewrite start": 100, "own BTs inside an erased step": 30,
            "rewrite start from a BT's logits": 30, "rows at the own-BT cap": 30, "keeping run": 100,
            "stale run (acts as own BTs)": 3}


def test_the_cache_after_a_verifiers_runs_equals_a_forward_over_the_kept_text(policy):
    """Every normal token's logits equal one plain forward over what the rules say is in context, and a
    rewrite's first token has the logits its erased step started from, under keep and rewind semantics.
    A bias on the BT logit makes the tiny policy write its own BTs too (so erased steps hold own BT
    pairs, own runs cross into earlier steps, the loop guard's cap is reached). Negative controls, each
    failing on most runs: own pairs kept in context (keep semantics), erase="keep" replayed as if it
    rewound, and a rewrite after a BT-started step replayed as a plain forward (rewind semantics: the
    replay rule this test lacked when a machine's samples first took that path)."""
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:12]
    ends = step_end_ids(tok, ";")
    not_bt = torch.arange(model.config.vocab_size) != bt  # BT can be masked (guards, a rewrite's start)

    def max_diff(gens, semantics, erase, **kw):
        worst, hits = 0.0, Counter()
        for r, g in enumerate(gens):
            plain, same, h = _contexts(g, prompts[r], bt, ends, semantics, erase, **kw)
            hits += h
            hits["rows at the own-BT cap"] += g.n_backtracks - sum(run["n"] for run in _replay(g, bt, ends)[0]) \
                >= OWN_BT_CAP
            if plain:
                for i, replayed in zip(plain, last_logits(model, list(plain.values()))):
                    worst = max(worst, float((g.logits[i] - replayed)[not_bt].abs().max()))
            for i, j in same.items():
                worst = max(worst, float((g.logits[i] - g.logits[j])[not_bt].abs().max()))
        return worst, hits

    total, controls, runs = Counter(), Counter(), 0
    for bias_value in BT_BIASES:
        bias = torch.zeros(model.config.vocab_size)
        bias[bt] = bias_value
        handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
        try:
            for semantics in ("keep", "rewind"):
                for erase in ("rewind", "keep"):
                    for seed in SEEDS:
                        gens = generate(model, prompts, max_new_tokens=96, backtrack_id=bt,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                        semantics=semantics, sampling=Sampling(0.7, 1.0, seed),
                                        guards=LoopGuards(max_backtracks=OWN_BT_CAP),
                                        guided=Guided(OracleVerifier(arith, problems, tok), ends,
                                                      Guide(budget=50, erase=erase)), record_logits=True)
                        worst, hits = max_diff(gens, semantics, erase)
                        assert worst < 1e-4, (semantics, erase, bias_value, seed, worst)
                        total += hits
                        runs += 1
                        if erase == "keep":  # negative controls: a wrong rule moves the logits
                            controls["keep replayed as rewind"] += max_diff(gens, semantics, "rewind")[0] > 1e-3
                        elif semantics == "keep":
                            controls["own pairs kept"] += max_diff(gens, semantics, erase, own_pairs_leave=False)[0] > 1e-3
                        else:
                            controls["BT-started rewrite as a plain forward"] += \
                                max_diff(gens, semantics, erase, rewrite_from_bt=False)[0] > 1e-3
        finally:
            handle.remove()
    print("rules applied:", dict(total), "| negative controls failing:", dict(controls), "of", runs, "runs")
    for rule, least in MIN_HITS.items():
        assert total[rule] >= least, (rule, dict(total))
    per_kind = runs // 4  # runs per (semantics, erase) pair; measured: 24 of 24, 9 of 12, 12 of 12
    assert controls["keep replayed as rewind"] >= 2 * per_kind * 3 // 4, dict(controls)
    assert controls["own pairs kept"] >= per_kind // 2 and \
        controls["BT-started rewrite as a plain forward"] >= per_kind // 2, dict(controls)
