"""The data types every task shares."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """`prompt` is the full text before the solution; `"".join(steps)` is the solution text.

    Each step carries its own separator (e.g. a trailing " ;" or "\\n"), so steps can be
    tokenized one by one and concatenated as token ids without decoding anything.
    """

    prompt: str
    steps: list[str]
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def solution(self) -> str:
        return "".join(self.steps)


UNCHECKED = "unchecked"  # a step the task's verifier cannot check (no arithmetic in it): not wrong, not right
NOT_WRONG = ("ok", UNCHECKED)


@dataclass
class StepReport:
    """Verdict on a (generated) solution: one kind per step ("ok", UNCHECKED, or why it is wrong)."""

    kinds: list[str]
    answer_correct: bool

    @property
    def first_wrong(self) -> int | None:
        for i, k in enumerate(self.kinds):
            if k not in NOT_WRONG:
                return i
        return None

    @property
    def all_ok(self) -> bool:
        return self.answer_correct and self.first_wrong is None
