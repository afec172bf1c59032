"""The step judge: where a text first goes wrong, the BT runs of a trace, and whether a run was
justified. Evaluation (halluc.inference.evaluate) and data generators (self-generated errors, MCTS) call it.

- first error of a visible text: the first step the task verifier rejects. Complete steps go
  through `task.verify_steps`; an unfinished last step (see `_last_step_complete`) is judged
  only for tasks whose reference steps are canonical (arith: it must still be a prefix of some
  reference step), and counts as fine otherwise (gsm8k).
- a BT run with visible text B before it and A after it is *justified* if B has an error and
  the run erased at least one character of B's first wrong step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from halluc.tasks import Problem
from halluc.tasks.base import NOT_WRONG

_SENTINEL = "\x00"  # a character no task uses, to see whether the last step is finished


@dataclass
class BacktrackRun:
    """One maximal run of BTs: the visible ids before and after it."""

    start: int           # index of its first BT in the trace
    length: int
    before: list[int]
    after: list[int]


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
        if kind not in NOT_WRONG:
            return start, pos, kind
    return None


def _last_step_complete(task, text: str) -> bool:
    """Finished iff one more character would start a new step."""
    return len(task.split_steps(text + _SENTINEL)) > len(task.split_steps(text))


def _canonical_steps(problem: Problem) -> bool:
    """Tasks whose correct steps are exactly the reference steps (any order), so a prefix can be judged."""
    return problem.meta.get("task") == "arith"


def run_justified(task, problem: Problem, before: str, after: str) -> tuple[bool, tuple[int, int, str] | None]:
    """(justified, first error of `before`) for a BT run that turned visible text `before` into `after`."""
    err = first_error(task, problem, before, final=False)
    erased_from = len(os.path.commonprefix([before, after]))
    return err is not None and erased_from < err[1], err
