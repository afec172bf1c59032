"""Error sources: turn a clean (prompt, steps) into a backtracking Example, all in token ids.

Every source keeps the first invariant: apply_backtrack(response) == clean response.
  random: the seed's baseline; random vocabulary tokens inserted at sites sampled without
          replacement, each followed by as many BTs. The tokens after the BT run, as many as
          were erased, are marked CORRECTION (they stand where the error stood).
  step:   a plausible wrong step from the task (wrong operand value, wrong result, a later
          step too early). The wrong step shares a token prefix with the right one; only the
          divergent tail is the error, erased by a BT run, then the right tail (CORRECTION).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal

from halluc.core.config import Fraction, NonNegativeInt, PositiveInt
from halluc.core.example import Example, Role


@dataclass
class ErrorConfig:
    source: Literal["none", "random", "step"] = "step"  # none | random tokens | plausible wrong steps
    example_rate: Fraction = 0.5        # fraction of examples that get errors
    sites: PositiveInt = 1              # error sites per corrupted example (without replacement)
    tokens_per_site: PositiveInt = 1    # random source: error tokens per site
    max_error_tokens: NonNegativeInt = 0  # step source: >0 caps the wrong tokens written before the BTs
    # step source: any = the task's mix of wrong steps; early = only a later step written too early
    # (not computable yet: Physics of LMs 2.2's retry data)
    step_kind: Literal["any", "early"] = "any"
    # > 0: every step gets an error with this chance (P2.2's retry_rate), instead of example_rate x sites
    step_rate: Fraction = 0.0

    def check(self) -> None:
        if self.step_rate and self.source != "step":
            raise ValueError(f"errors.step_rate={self.step_rate:g} draws wrong steps: it needs errors.source=step, "
                             f"not {self.source}")


def clean_example(prompt: list[int], steps: list[list[int]], eos_id: int | None) -> Example:
    ex = Example().add(prompt, Role.PROMPT)
    for s in steps:
        ex.add(s, Role.KEPT)
    if eos_id is not None:
        ex.add([eos_id], Role.KEPT)
    return ex


def random_token_errors(prompt: list[int], steps: list[list[int]], eos_id: int | None, bt_id: int,
                        vocab: list[int], cfg: ErrorConfig, rng: random.Random) -> Example:
    clean = [t for s in steps for t in s]
    sites = sorted(rng.sample(range(len(clean)), min(cfg.sites, len(clean))))
    ex = Example().add(prompt, Role.PROMPT)
    start = 0
    for site in sites:
        site = max(site, start)  # a site inside the previous correction moves to its end
        ex.add(clean[start:site], Role.KEPT)
        n = cfg.tokens_per_site
        ex.add([rng.choice(vocab) for _ in range(n)], Role.ERROR).add([bt_id] * n, Role.BACKTRACK)
        ex.add(clean[site:site + n], Role.CORRECTION)
        start = min(site + n, len(clean))
    ex.add(clean[start:], Role.KEPT)
    if eos_id is not None:
        ex.add([eos_id], Role.KEPT)
    return ex


def step_errors(prompt: list[int], steps: list[list[int]], eos_id: int | None, bt_id: int,
                wrong_step: Callable[[int], list[int] | None], cfg: ErrorConfig,
                rng: random.Random) -> Example:
    """`wrong_step(i)` returns the token ids of a wrong version of step i (or None)."""
    if cfg.step_rate > 0:
        sites = {i for i in range(len(steps)) if rng.random() < cfg.step_rate}
    else:
        sites = set(rng.sample(range(len(steps)), min(cfg.sites, len(steps))))
    ex = Example().add(prompt, Role.PROMPT)
    for i, right in enumerate(steps):
        wrong = wrong_step(i) if i in sites else None
        if wrong is None or wrong == right:
            ex.add(right, Role.KEPT)
            continue
        common = _common_prefix(wrong, right)
        if common == len(right):  # the wrong step extends the right one; keep that off
            ex.add(right, Role.KEPT)
            continue
        error = wrong[common:]
        if cfg.max_error_tokens > 0:
            error = error[:cfg.max_error_tokens]
        ex.add(right[:common], Role.KEPT).add(error, Role.ERROR).add([bt_id] * len(error), Role.BACKTRACK)
        ex.add(right[common:], Role.CORRECTION)
    if eos_id is not None:
        ex.add([eos_id], Role.KEPT)
    return ex


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n
