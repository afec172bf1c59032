"""The settings of decoding (halluc.inference.generate): plain dataclasses, no torch, so recipes and tools
check them before any ML library loads; `Forcing` and `Guided` are what a caller hands the loop."""
from __future__ import annotations

from dataclasses import dataclass, field

SEMANTICS = ("keep", "rewind")


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0        # (0, 1]: 0 would keep no token
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be 0 (greedy) or more")


@dataclass
class LoopGuards:
    """Stop a model that backtracks forever. When a cap is hit, BT gets logit -inf (for the
    rest of the sequence, or while the visible top is at that position)."""

    max_backtracks: int = 32               # BT tokens per sequence (0: BT is never emitted)
    max_backtracks_per_position: int = 4   # times one visible position may be erased
    ban_erased_token: bool = False         # the first token after a rewind may not be the one just erased there


@dataclass
class Guide:
    """How a verifier steers generation (module docstring)."""

    threshold: float = 0.5     # a step scored below this (P(text so far is right)) is erased
    budget: int = 4            # verifier-triggered BT runs per sequence
    resample: str = "sample"   # sample: at `temperature` | ban: greedy, a verbatim repeat banned (cannot fix an operand)
    temperature: float = 1.0   # resample="sample"
    erase: str = "rewind"      # rewind: the erased step leaves the cache | keep: it stays in context

    def __post_init__(self):
        if self.resample not in ("ban", "sample"):
            raise ValueError(f"Guide.resample must be ban or sample, got {self.resample!r}")
        if self.erase not in SEMANTICS:
            raise ValueError(f"Guide.erase must be one of {SEMANTICS}, got {self.erase!r}")


@dataclass
class Forcing:
    """Tokens a row emits whatever the model says (tests, benchmarks, scoring a given trace).

    tokens: teacher forcing, row r emits tokens[r] and stops when they run out (stop="forced_end").
    backtrack_rate: after each emitted normal token, with this probability the next one is a BT
      (benchmarks; seeded by `seed`, overrides the loop guards)."""

    tokens: list[list[int]] | None = None
    backtrack_rate: float = 0.0
    seed: int = 0


@dataclass
class Guided:
    """Guided decoding (halluc.inference.guided_decoding): `verifier` scores the visible text at every step end
    (a token in `step_ends`, from halluc.objectives.verifier_head.step_end_ids, or EOS); `guide` says what a
    low score does."""

    verifier: object  # a callable: ([(prompt ids, visible ids)], batch rows) -> P(right) per item
    step_ends: frozenset
    guide: Guide = field(default_factory=Guide)

    def __post_init__(self):
        if not self.step_ends:
            raise ValueError("guided decoding needs step_ends, the ids of the tokens that end a step")
        self.step_ends = frozenset(self.step_ends)
