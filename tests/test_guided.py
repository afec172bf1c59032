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


def test_guided_greedy_batched_equals_one_by_one(policy):
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:12]
    oracle = OracleVerifier(arith, problems, tok)
    guide = Guide(budget=3, resample="ban")
    batched = _run(model, tok, bt, prompts, oracle, sampling=Sampling(), guide=guide)
    single = [_run(model, tok, bt, [p], oracle, sampling=Sampling(), guide=guide)[0] for p in prompts]
    assert [g.trace for g in batched] == [g.trace for g in single]
    assert sum(g.n_guided for g in batched) > 0
    # ban: no erased version of a step is written again verbatim at the same place
    for g in batched:
        assert all(n <= guide.budget for n in [g.n_guided])


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


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
def test_an_erased_step_leaves_the_cache(policy, semantics):
    """After a verifier's BT run (Guide.erase="rewind", the default under either semantics), the next
    token's logits equal one plain forward over the prompt and the text before the step: the erased
    step and its BTs left nothing in the cache, and the rewrite took their positions. Negative
    control: erase="keep" leaves them in context, and the logits differ."""
    model, tok, bt, problems = policy
    prompts = _prompts(tok, problems)[:10]
    oracle = OracleVerifier(arith, problems, tok)
    for erase in ("rewind", "keep"):
        gens = generate(model, prompts, max_new_tokens=96, backtrack_id=bt, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, semantics=semantics, sampling=Sampling(0.7, 1.0, 3),
                        guards=NO_OWN_BT, verifier=oracle, guide=Guide(budget=50, erase=erase),
                        step_ends=step_end_ids(tok, ";"), record_logits=True)
        diffs = []
        for r, g in enumerate(gens):
            visible: list[int] = []
            for i, t in enumerate(g.trace):
                if t == bt:
                    visible.pop()
                    continue
                if i > 0 and g.trace[i - 1] == bt:  # the first token after a run
                    with torch.no_grad():
                        want = model(input_ids=torch.tensor([prompts[r] + visible])).logits[0, -1]
                    diffs.append(float((g.logits[i] - want).abs().max()))
                visible.append(t)
        assert len(diffs) > 5
        if erase == "rewind":
            assert max(diffs) < 1e-4
        else:
            assert min(diffs) > 1e-3
