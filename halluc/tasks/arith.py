"""`arith`, the embedded default task: iGSM-style multi-step arithmetic modulo a small prime.

A problem defines one constant and then N quantities, each from earlier ones:
    prompt   "a = 4 , b = a + 2 , c = b * a . c ?"
    steps    [" b = a + 2 = 4 + 2 = 6 ;", " c = b * a = 6 * 4 = 3 ;", " answer = 3"]
Each step writes the definition, the operand values, and the result ("inline" format: it
removes most arithmetic errors, so what a tiny model gets wrong is *retrieving* a value by
name; ../shared/notes/lab.md). Difficulty = N. Train and in-distribution test use N in
`train_ops`; the out-of-distribution split uses larger N never seen in training.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from halluc.tasks.base import Problem, StepReport

STEP_SEPARATOR = ";"  # what ends a step's text (guided decoding and the verifier head find step ends by it)

OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
NAMES = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class ArithConfig:
    prime: int = 7
    train_ops: tuple[int, int] = (2, 4)   # N range for train and the in-distribution test
    ood_ops: tuple[int, int] = (6, 8)     # N range for the out-of-distribution test
    p_prev: float = 0.8                   # first operand is the previous result
    p_literal: float = 0.7                # second operand is a literal number
    # Order of the definitions in the prompt (the solution always computes in dependency order):
    # "dependency": as computed; "swapped": each adjacent pair swapped with `swap_rate` (iGSM-style:
    # following the listing then names a quantity whose inputs are not computed yet, an error the
    # model can see after the fact); "shuffled": a random order.
    listing: str = "dependency"
    swap_rate: float = 0.0


def generate(n_ops: int, rng: random.Random, cfg: ArithConfig = ArithConfig(),
             order_rng: random.Random | None = None) -> Problem:
    """One problem. The listing order is drawn from `order_rng` (default `rng`): with a
    separate stream, the same problems come out under every listing order."""
    names = rng.sample(NAMES, n_ops + 1)
    p = cfg.prime
    values = {names[0]: rng.randrange(p)}
    defs: dict[str, tuple[str, str, str]] = {}
    for i in range(1, n_ops + 1):
        earlier = names[:i]
        y = names[i - 1] if rng.random() < cfg.p_prev else rng.choice(earlier)
        z = str(rng.randrange(p)) if rng.random() < cfg.p_literal else rng.choice(earlier)
        op = rng.choice(list(OPS))
        defs[names[i]] = (y, op, z)
        values[names[i]] = OPS[op](values[y], _value(z, values)) % p
    order = _listing_order(list(defs), order_rng or rng, cfg)
    listing = [f"{names[0]} = {values[names[0]]}"] + [f"{x} = {' '.join(defs[x])}" for x in order]
    question = names[-1]
    steps = [_step_text(x, d, values, p) for x, d in defs.items()] + [f" answer = {values[question]}"]
    meta = {"task": "arith", "prime": p, "constant": names[0], "defs": {x: list(d) for x, d in defs.items()},
            "values": values, "question": question, "n_ops": n_ops}
    return Problem(prompt=" , ".join(listing) + f" . {question} ?", steps=steps,
                   answer=str(values[question]), meta=meta)


def _listing_order(targets: list[str], rng: random.Random, cfg: ArithConfig) -> list[str]:
    """The order the definitions are listed in (draws nothing from `rng` for "dependency")."""
    if cfg.listing == "dependency":
        return targets
    if cfg.listing == "shuffled":
        return rng.sample(targets, len(targets))
    if cfg.listing != "swapped":
        raise ValueError(f"listing must be dependency, swapped or shuffled, not {cfg.listing!r}")
    order, i = list(targets), 0
    while i < len(order) - 1:
        if rng.random() < cfg.swap_rate:
            order[i], order[i + 1] = order[i + 1], order[i]
            i += 2  # a swapped pair is not swapped again
        else:
            i += 1
    return order


def make_split(n: int, ops: tuple[int, int], seed: int, cfg: ArithConfig = ArithConfig()) -> list[Problem]:
    """n problems; the same n problems (only listed differently) for every `cfg.listing`."""
    rng, order_rng = random.Random(seed), random.Random(seed + 1_000_003)
    return [generate(rng.randint(*ops), rng, cfg, order_rng) for _ in range(n)]


def identity(problem: Problem) -> str:
    """What makes two problems the same whatever the listing order (for held-out splits)."""
    m = problem.meta
    return f"{m['constant']}={m['values'][m['constant']]};{sorted(m['defs'].items())};{m['question']}"


def _value(term: str, values: dict) -> int:
    return int(term) if term.isdigit() else values[term]


def _step_text(x: str, d, values: dict, p: int, vy=None, vz=None, result=None) -> str:
    y, op, z = d
    vy = values[y] if vy is None else vy
    vz = _value(z, values) if vz is None else vz
    result = OPS[op](vy, vz) % p if result is None else result
    return f" {x} = {y} {op} {z} = {vy} {op} {vz} = {result} ;"


# ---- verifier -------------------------------------------------------------------------
_STEP = re.compile(r"^\s*([a-z]) = ([a-z]|\d+) ([-+*]) ([a-z]|\d+) = (\d+) ([-+*]) (\d+) = (\d+) ;\s*$")
_ANSWER = re.compile(r"^\s*answer = (\d+)\s*$")


def split_steps(text: str) -> list[str]:
    """Generated solution text -> steps (each keeps its separator; join gives the text back)."""
    parts = re.split(r"(?<=;)", text)
    return [s for s in parts if s.strip()]


def extract_answer(text: str) -> str | None:
    found = re.findall(r"answer = (\d+)", text)
    return found[-1] if found else None


def check_step(problem: Problem, step: str, computed: set[str]) -> str:
    """Classify one step given the variables already computed: ok or the first thing wrong."""
    m = problem.meta
    values, defs, p = m["values"], m["defs"], m["prime"]
    if (a := _ANSWER.match(step)) is not None:
        return "ok" if int(a.group(1)) == values[m["question"]] else "wrong_answer"
    s = _STEP.match(step)
    if s is None:
        return "malformed"
    x, y, op, z, vy, op2, vz, v = s.groups()
    if x not in defs or x in computed:
        return "bad_target"
    # x chosen before its inputs (iGSM's typical error): wrong from the target on, whatever follows
    if any(not t.isdigit() and t != m["constant"] and t not in computed for t in (defs[x][0], defs[x][2])):
        return "not_computed"
    if [y, op, z] != defs[x] or op2 != op:
        return "copy"
    if int(vy) != _value(y, values) or int(vz) != _value(z, values):
        return "retrieval"
    if int(v) != OPS[op](int(vy), int(vz)) % p:
        return "arith"
    return "ok"


def verify_steps(problem: Problem, steps: list[str]) -> StepReport:
    computed: set[str] = set()
    kinds = []
    for step in steps:
        kind = check_step(problem, step, computed)
        kinds.append(kind)
        if kind == "ok" and (s := _STEP.match(step)):
            computed.add(s.group(1))
    if not any(_ANSWER.match(s) for s in steps):
        kinds.append("missing")
    return StepReport(kinds=kinds, answer_correct=extract_answer("".join(steps)) == problem.answer)


def corrupt_step(problem: Problem, i: int, rng: random.Random, mode: str = "any") -> str | None:
    """A plausible wrong version of step i, of the kinds a small model makes.

    Operation steps: a wrong retrieved operand value (result computed from it, as a model
    that misremembers would), a wrong result, or a later step written too early.
    The answer step: a wrong final value.
    mode "early": only a later step that is not computable yet (Physics of LMs 2.2's retry
    data); None where there is none (the answer step, the last operation steps).
    """
    m = problem.meta
    p, values = m["prime"], m["values"]
    xs = list(m["defs"])
    if mode not in ("any", "early"):
        raise ValueError(f"arith corrupt_step mode must be any or early, not {mode!r}")
    if i == len(xs):  # the answer step
        return None if mode == "early" else f" answer = {_other(values[m['question']], p, rng)}"
    x = xs[i]
    y, op, z = m["defs"][x]
    computed = set(xs[:i])  # a later step is only wrong now if it needs an uncomputed value
    early = [s for s in problem.steps[i + 1:len(xs)] if check_step(problem, s, computed) != "ok"]
    if mode == "early":
        return rng.choice(early) if early else None
    kind = rng.choice(["retrieval", "arith"] + (["early"] if early else []))
    if kind == "early":
        return rng.choice(early)
    if kind == "arith":
        right = OPS[op](values[y], _value(z, values)) % p
        return _step_text(x, (y, op, z), values, p, result=_other(right, p, rng))
    if z.isdigit() or rng.random() < 0.5:  # misremember the first operand
        vy = _other(values[y], p, rng)
        return _step_text(x, (y, op, z), values, p, vy=vy, result=OPS[op](vy, _value(z, values)) % p)
    vz = _other(values[z], p, rng)
    return _step_text(x, (y, op, z), values, p, vz=vz, result=OPS[op](values[y], vz) % p)


def _other(v: int, p: int, rng: random.Random) -> int:
    return rng.choice([u for u in range(p) if u != v])
