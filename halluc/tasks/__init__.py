"""Tasks: problems whose solutions are sequences of checkable steps.

Every task module provides plain functions over `Problem`:
  verify_steps(problem, steps) -> StepReport   (checks every step, reports the first wrong one)
  split_steps(text) -> list[str]               (generated solution text -> steps)
  extract_answer(text) -> str | None           (final answer from solution text)
  corrupt_step(problem, i, rng) -> str | None  (a plausible wrong version of step i)
"""
from halluc.tasks.base import Problem, StepReport

__all__ = ["Problem", "StepReport"]


def get_task(name: str):
    """The task module by name: arith (the embedded default), gsm8k, jsonl (users' data)."""
    import importlib

    if name not in ("arith", "gsm8k", "jsonl"):
        raise ValueError(f"unknown task {name!r}: choose arith, gsm8k or jsonl")
    return importlib.import_module(f"halluc.tasks.{name}")
