"""The token-level backtracking example: token ids, each with a role.

An example is built from token ids and stays token ids: it is never decoded and re-encoded
(BPE would merge an inserted error token with its neighbours and every mask would drift).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Role(IntEnum):
    PROMPT = 0      # the question; never trained
    KEPT = 1        # clean response token
    ERROR = 2       # a token that a later BT erases; never trained in masked mode
    BACKTRACK = 3   # <|BACKTRACK|>: deletes the last visible token
    CORRECTION = 4  # the tokens written where the erased ones stood


ROLE_NAMES = [r.name.lower() for r in Role]  # ClassLabel names, in id order
IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's and HF's convention)


def apply_backtrack(ids: list[int], backtrack_id: int) -> list[int]:
    """Each backtrack id deletes the last visible token; with nothing visible it deletes nothing."""
    visible: list[int] = []
    for t in ids:
        if t == backtrack_id:
            if visible:
                visible.pop()
        else:
            visible.append(t)
    return visible


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share: a wrong step and the right one written in its
    place share them, and only the rest of the wrong step is the error (own errors, MCTS traces)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Example:
    """One training sequence: `ids[i]` has role `roles[i]`; the prompt comes first."""

    ids: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)

    def add(self, ids: list[int], role: Role) -> "Example":
        self.ids.extend(ids)
        self.roles.extend([int(role)] * len(ids))
        return self

    @property
    def prompt_len(self) -> int:
        n = 0
        while n < len(self.roles) and self.roles[n] == Role.PROMPT:
            n += 1
        return n

    @property
    def response(self) -> list[int]:
        return self.ids[self.prompt_len:]

    def clean_response(self, backtrack_id: int) -> list[int]:
        return apply_backtrack(self.response, backtrack_id)

    def check(self, clean: list[int], backtrack_id: int) -> None:
        """The first invariant: removing the backtracks gives back the clean response."""
        if len(self.ids) != len(self.roles):
            raise ValueError(f"{len(self.ids)} ids but {len(self.roles)} roles")
        got = self.clean_response(backtrack_id)
        if got != clean:
            raise ValueError(f"apply_backtrack(response) != clean response:\n{got}\n{clean}")
        for t, r in zip(self.ids, self.roles):
            if (t == backtrack_id) != (r == Role.BACKTRACK):
                raise ValueError(f"token {t} has role {Role(r).name}; BT id is {backtrack_id}")
