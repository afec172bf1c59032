"""Evaluation: generate with backtracking, verify every step, judge every backtrack.

Generation is `halluc.generate` with the semantics the checkpoint was trained for (keep for
`causal`, rewind for `block_errors` + rewound positions). Exact metric definitions are in
docs/generation.md; in short, per BT run (a maximal run of consecutive BTs) with visible text
B before it and A after it:

- first error of a visible text: the first step the task verifier rejects. Complete steps go
  through `task.verify_steps`; an unfinished last step (the sentinel test in `_last_step_complete`)
  is judged only for tasks whose reference steps are canonical (arith: the step must still be a
  prefix of some reference step), and counts as fine otherwise (gsm8k).
- a run is *justified* if B has an error and the run erased at least one character of B's
  first wrong step. BT precision = justified runs / runs.
- a problem *made an error* if the visible text at the end of some segment (just before a BT
  run, or at the end) has an error; the first such segment's error is *caught* if a BT run
  follows that segment and is justified. BT recall = caught / problems that made an error.
- erased = visible tokens deleted; wasted = generated tokens not in the output (erased + BTs).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch

from halluc.generate import Generation, LoopGuards, Sampling, generate_text, semantics_for
from halluc.tasks import Problem, StepReport
from halluc.tokens import backtrack_id, has_backtrack

_SENTINEL = "\x00"  # a character no task uses, to see whether the last step is finished


@dataclass
class BacktrackRun:
    """One maximal run of BTs: the visible ids before and after it."""

    start: int           # index of its first BT in the trace
    length: int
    before: list[int]
    after: list[int]


@dataclass
class ProblemScore:
    answer_correct: bool
    full_solution: bool
    kinds: list[str]
    n_backtracks: int
    n_runs: int
    n_justified: int
    n_erased: int
    n_wasted: int
    made_error: bool
    caught_error: bool
    token_forwards: int


def backtrack_runs(trace: list[int], bt: int) -> list[BacktrackRun]:
    """The BT runs of a trace with the visible ids around each (prompt excluded)."""
    runs: list[BacktrackRun] = []
    visible: list[int] = []
    for i, t in enumerate(trace):
        if t == bt:
            if i == 0 or trace[i - 1] != bt:
                runs.append(BacktrackRun(start=i, length=0, before=list(visible), after=[]))
            runs[-1].length += 1
            if visible:
                visible.pop()
            runs[-1].after = list(visible)
        else:
            visible.append(t)
    return runs


def first_error(task, problem: Problem, text: str, final: bool) -> tuple[int, int, str] | None:
    """(start, end, kind) in `text` of its first wrong step, or None.

    final=False: `text` may stop mid-step; see the module docstring for how that step is judged.
    A missing answer is not an error here (a text cut short is not wrong).
    """
    steps = task.split_steps(text)
    complete = steps if final or _last_step_complete(task, text) else steps[:-1]
    kinds = task.verify_steps(problem, complete).kinds[:len(complete)]
    if len(complete) < len(steps) and _canonical_steps(problem):
        partial = steps[-1]
        kinds.append("ok" if any(ref.startswith(partial) for ref in problem.steps) else "partial")
    pos = 0
    for step, kind in zip(steps, kinds):
        start = text.index(step, pos)
        pos = start + len(step)
        if kind != "ok":
            return start, pos, kind
    return None


def _last_step_complete(task, text: str) -> bool:
    """Finished iff one more character would start a new step."""
    return len(task.split_steps(text + _SENTINEL)) > len(task.split_steps(text))


def _canonical_steps(problem: Problem) -> bool:
    """Tasks whose correct steps are exactly the reference steps (any order), so a prefix can be judged."""
    return problem.meta.get("task") == "arith"


def score_problem(task, problem: Problem, gen: Generation, tokenizer, bt: int | None) -> ProblemScore:
    text = gen.text if gen.text is not None else tokenizer.decode(gen.visible, skip_special_tokens=True)
    report = task.verify_steps(problem, task.split_steps(text))
    runs = backtrack_runs(gen.trace, bt) if bt is not None else []
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    justified, made_error, caught = [], False, False
    for run in runs:
        before = decode(run.before)
        err = first_error(task, problem, before, final=False)
        erased_from = len(os.path.commonprefix([before, decode(run.after)]))
        justified.append(err is not None and erased_from < err[1])
        if err is not None and not made_error:  # the first segment that ends with an error
            made_error, caught = True, justified[-1]
    if not made_error:
        made_error = first_error(task, problem, text, final=True) is not None
    return ProblemScore(
        answer_correct=report.answer_correct,
        full_solution=report.all_ok and len(report.kinds) == len(problem.steps),
        kinds=report.kinds, n_backtracks=gen.n_backtracks, n_runs=len(runs), n_justified=sum(justified),
        n_erased=gen.n_erased, n_wasted=len(gen.trace) - len(gen.visible), made_error=made_error,
        caught_error=caught, token_forwards=gen.token_forwards)


def evaluate_problems(model, tokenizer, problems: list[Problem], task, max_new_tokens: int = 160,
                      batch_size: int = 64, desc: str = "eval", semantics: str | None = None,
                      sampling: Sampling = Sampling(), guards: LoopGuards = LoopGuards()) -> dict:
    """Accuracy, step validity and backtrack behaviour (precision, recall, erased, wasted)."""
    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    with torch.no_grad():
        gens = generate_text(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, semantics=semantics, sampling=sampling, guards=guards, desc=desc)
    used = gens[0].semantics if gens else semantics_for(model, semantics, has_backtrack=bt is not None)
    scores = [score_problem(task, p, g, tokenizer, bt) for p, g in zip(problems, gens)]
    first_wrong = Counter(s.kinds[i] for s in scores
                          for i in [StepReport(s.kinds, s.answer_correct).first_wrong] if i is not None)
    n = max(len(problems), 1)
    runs = sum(s.n_runs for s in scores)
    errors = sum(s.made_error for s in scores)
    steps = sum(len(s.kinds) for s in scores)
    samples = [{"prompt": p.prompt, "trace": tokenizer.decode(g.trace), "visible": g.text, "kinds": s.kinds,
                "stop": g.stop} for p, g, s in list(zip(problems, gens, scores))[:5]]
    return {
        "n": len(problems), "semantics": used,
        "answer_acc": sum(s.answer_correct for s in scores) / n,
        "full_solution_acc": sum(s.full_solution for s in scores) / n,
        "step_validity": sum(k == "ok" for s in scores for k in s.kinds) / max(steps, 1),
        "bt_per_problem": sum(s.n_backtracks for s in scores) / n,
        "bt_runs_per_problem": runs / n,
        "erased_per_problem": sum(s.n_erased for s in scores) / n,
        "wasted_per_problem": sum(s.n_wasted for s in scores) / n,
        "bt_precision": sum(s.n_justified for s in scores) / runs if runs else None,
        "bt_recall": sum(s.caught_error for s in scores) / errors if errors else None,
        "problems_with_error": errors,
        "token_forwards_per_problem": sum(s.token_forwards for s in scores) / n,
        "stops": dict(Counter(g.stop for g in gens)),
        "first_error_kinds": dict(first_wrong.most_common()),
        "samples": samples,
    }


def markdown_table(results: dict[str, dict]) -> str:
    """One row per split (or per "model / split" key)."""
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    rows = ["| split | n | semantics | answer acc | full solution | step validity | BT / problem | "
            "erased / problem | wasted / problem | BT precision | BT recall |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        rows.append(f"| {name} | {m['n']} | {m['semantics']} | {pct(m['answer_acc'])} | "
                    f"{pct(m['full_solution_acc'])} | {pct(m['step_validity'])} | {m['bt_per_problem']:.2f} | "
                    f"{m['erased_per_problem']:.2f} | {m['wasted_per_problem']:.2f} | {pct(m['bt_precision'])} | "
                    f"{pct(m['bt_recall'])} |")
    return "\n".join(rows)
