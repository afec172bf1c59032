"""Guided decoding (issue 12): a verifier hooked into the generator erases a step it scores low.

The policy is the tiny lab model of conftest's `lab_policy` (masked SFT with a verifier head): sampled
at temperature 0.7 it makes many wrong steps, which is what these tests need. Its own BTs are switched off (loop guard
max_backtracks=0), so every BT in a trace is the verifier's.
"""
from __future__ import annotations

import pytest
import torch

from halluc.generate import Guide, LoopGuards, Sampling, generate
from halluc.tasks import arith
from halluc.verifier_head import load_head, step_end_ids
from halluc.verifiers import HeadVerifier, OracleVerifier, solution_scores

NO_OWN_BT = LoopGuards(max_backtracks=0)


@pytest.fixture(scope="module")
def policy(lab_policy):
    from halluc.tokens import backtrack_id

    _, model, tok, problems = lab_policy
    return model, tok, backtrack_id(tok), problems


def _prompts(tok, problems):
    return [tok(p.prompt)["input_ids"] for p in problems]


def _run(model, tok, bt, prompts, verifier=None, semantics="keep", sampling=Sampling(0.7, 1.0, 3),
         guide=Guide(budget=50), max_new_tokens=192):
    return generate(model, prompts, max_new_tokens=max_new_tokens, backtrack_id=bt, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, semantics=semantics, sampling=sampling, guards=NO_OWN_BT,
                    verifier=verifier, guide=guide, step_ends=step_end_ids(tok, ";"))


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
                        verifier=OracleVerifier(arith, problems, tok), guide=Guide(budget=50), step_ends=ends)
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
    as the head over the finished text (solution_scores), at every step end."""
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:8]
    head = HeadVerifier(model)
    seen: dict[int, list[float]] = {}

    def recording(items, rows):
        for r, s in zip(rows, head(items, rows)):
            seen.setdefault(r, []).append(s)
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
        want = solution_scores("head", model, [prompts[r]], [steps])[0]
        torch.testing.assert_close(torch.tensor(seen.get(r, [])), torch.tensor(want), atol=1e-4, rtol=1e-4)


def _contexts(g, prompt, bt, ends, semantics, erase, own_pairs_leave=True):
    """{trace index of each normal token: the tokens in the cache when it was chosen}, replayed from
    the trace by the rules of docs/verifiers.md. The model's own BTs follow `semantics` (keep: they
    and the token they erased stay in context; rewind: both leave). A verifier's run that erases
    (erase="rewind", and the step's start logits are still current) removes everything from the
    step's first visible token on, the model's own BT pairs inside the step too (`own_pairs_leave`;
    False is the negative control); otherwise the run acts as the model's own BTs. Under rewind, the
    token right after a BT the model's own way is left out: it comes from the BT's own forward (the
    BT as the query, test_generate checks it against the block-errors forward), not a plain one."""
    forced, ctx, visible, out, step_at, i = set(g.guided_at), [], [], {}, -1, 0
    after_bt = False
    while i < len(g.trace):
        t = g.trace[i]
        if i in forced:
            start = max((k + 1 for k, (_, x) in enumerate(visible[:-1]) if x in ends), default=0)
            n = min(len(visible) - start, len(g.trace) - i)
            if erase == "rewind" and step_at == start:
                first = visible[start][0]
                dead = {j for j, _ in visible[start:]}
                ctx = [e for e in ctx if e[0] < first or (not own_pairs_leave and e[0] not in dead)]
                del visible[start:]
                i, after_bt = i + n, False
                continue
        if t == bt:
            if visible:
                erased = visible.pop()
                if semantics == "rewind":
                    ctx.remove(erased)
            if semantics == "keep":
                ctx.append((i, t))
            after_bt = True
        else:
            if not (semantics == "rewind" and after_bt):
                out[i] = prompt + [x for _, x in ctx]
            after_bt = False
            if not visible or visible[-1][1] in ends:
                step_at = len(visible)
            visible.append((i, t)), ctx.append((i, t))
        i += 1
    return out


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
def test_the_cache_after_a_verifiers_runs_equals_a_forward_over_the_kept_text(policy, semantics):
    """Every normal token's logits equal one plain forward over what the rules say is in context.
    A bias on the BT logit makes the tiny policy write its own BTs too, so erased steps hold the
    model's own BT pairs, which leave with the step. Negative controls: such pairs kept in context,
    and erase="keep" replayed as if it rewound, both change the logits."""
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:10]
    ends = step_end_ids(tok, ";")
    bias = torch.zeros(model.config.vocab_size)
    bias[bt] = 6.0
    not_bt = torch.arange(model.config.vocab_size) != bt  # BT can be masked (guards, a rewrite's start)

    def max_diffs(gens, erase, **kw):
        out = []
        for r, g in enumerate(gens):
            for i, context in _contexts(g, prompts[r], bt, ends, semantics, erase, **kw).items():
                with torch.no_grad():
                    want = model(input_ids=torch.tensor([context])).logits[0, -1]
                out.append(float((g.logits[i] - want)[not_bt].abs().max()))
        return out

    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    try:
        for erase in ("rewind", "keep"):
            gens = generate(model, prompts, max_new_tokens=96, backtrack_id=bt, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, semantics=semantics, sampling=Sampling(0.7, 1.0, 3),
                            guards=LoopGuards(max_backtracks=6), verifier=OracleVerifier(arith, problems, tok),
                            guide=Guide(budget=50, erase=erase), step_ends=ends, record_logits=True)
            assert sum(g.n_guided for g in gens) > 5
            assert sum(len(_replay(g, bt, ends)[1]) for g in gens) > 5  # the model's own BTs
            assert max(max_diffs(gens, erase)) < 1e-4
            wrong_rule = max_diffs(gens, "rewind") if erase == "keep" else \
                max_diffs(gens, erase, own_pairs_leave=False) if semantics == "keep" else [1.0]
            assert max(wrong_rule) > 1e-3
    finally:
        handle.remove()
