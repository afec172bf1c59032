"""GSM8K: grade-school maths word problems with calculator-annotated solution lines.

A reference answer looks like
    Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.
    ...
    #### 18
Each line is one step. The `<<expr=result>>` annotations make steps checkable without a
model: we recompute `expr` with a small safe evaluator (never `eval`), so a generated
solution can be graded step by step and the first wrong step located.

Step convention (see `Problem`): the solution text is " " + answer (a space after
"Answer:"), and each step keeps its trailing newline(s), so `"".join(steps)` is that text.
"""
from __future__ import annotations

import ast
import math
import operator
import random
import re
from fractions import Fraction

from halluc.tasks import jsonl
from halluc.tasks.base import UNCHECKED, Problem, StepReport
from halluc.core.inputs import InputError

STEP_SEPARATOR = "\n"  # what ends a step's text (guided decoding and the verifier head find step ends by it)

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

# `<<expr=result>>` followed by the text the solution displays for the result.
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_DISPLAYED = re.compile(r"\$?(" + _NUMBER + r"(?:/\d+)?)")
# the number must end the answer (`#### 3/4` or `#### 10 - 2 = 8` is not an answer of 3 or 10)
_FINAL = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")(?=[ \t.%!;)]*(?:\r?\n|$))")  # then only the line's end
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")

REL_TOL = 1e-6


def read_jsonl(path, limit: int | None = None) -> list[Problem]:
    """Read a GSM8K jsonl file ({"question", "answer"} per line) into Problems."""
    problems = []
    for n, row in jsonl.iter_jsonl_rows(path, limit):
        question = jsonl.get_text(row, "question", path, n)
        answer_text = jsonl.get_text(row, "answer", path, n)
        answer = extract_answer(answer_text)
        if answer is None:
            raise InputError(f"{path}:{n}: field 'answer' has no '#### <number>' final line")
        problems.append(Problem(
            prompt=PROMPT_TEMPLATE.format(question=question),
            steps=split_steps(" " + answer_text),
            answer=answer,
            meta={"task": "gsm8k", "source": str(path), "line": n},
        ))
    return problems


def split_steps(text: str) -> list[str]:
    """One step per line, each keeping its newline(s); `"".join` gives `text` back."""
    return jsonl.split_steps(text, "\n")


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, without commas or `$` ("18.0" stays "18.0")."""
    at = text.rfind("####")
    if at < 0:
        return None
    m = _FINAL.match(text, at)
    return _normalize(m.group(1)) if m else None


def numbers_equal(a: str, b: str) -> bool:
    """Numeric comparison of two number strings ("18" == "18.0" == "18.00")."""
    try:
        return _close(evaluate(a), evaluate(b))
    except ValueError:
        return False


def verify_steps(problem: Problem, steps: list[str]) -> StepReport:
    """Recompute every annotation of every step; check any `####` step's number against
    the known answer. Kinds: "ok", "bad_annotation", "wrong_result", "wrong_answer", and UNCHECKED for a
    step with neither (a narrative line, or garbage): step validity leaves it out."""
    kinds = [_step_kind(step, problem.answer) for step in steps]
    final = extract_answer("".join(steps))
    return StepReport(kinds=kinds, answer_correct=final is not None and numbers_equal(final, problem.answer))


def corrupt_step(problem: Problem, i: int, rng: random.Random, mode: str = "any") -> str | None:
    """A plausible wrong version of step i, or None if there is none of the asked kind.

    mode "result": one number is made wrong, either an annotation's result (together with
    the displayed copy after `>>`) or the `####` answer; `verify_steps` flags this step.
    mode "early": a later step written too early (its own arithmetic is right, so
    `verify_steps` alone does not flag it; it is wrong only relative to the reference).
    mode "any": picks one of the available kinds at random.
    """
    if mode not in ("any", "result", "early"):
        raise ValueError(f"unknown corruption mode {mode!r}")
    step = problem.steps[i]
    options = []
    if mode in ("any", "result") and _result_spans(step):
        options.append(lambda: _wrong_result(step, rng))
    if mode in ("any", "early") and jsonl.later_steps(problem, i):
        options.append(lambda: jsonl.corrupt_step(problem, i, rng))
    return rng.choice(options)() if options else None


# --- safe arithmetic ---------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}


def evaluate(expr: str) -> Fraction | float:
    """Value of an arithmetic expression (numbers, + - * / // **, parentheses, unary +/-).

    Exact (Fraction) where possible so 0.1*3 == 0.3; raises ValueError on anything else.
    Commas in numbers ("80,000") and leading zeros ("08") are tolerated.
    """
    src = _LEADING_ZEROS.sub("", expr.replace(",", "").strip())
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e
    return _eval(tree.body, expr)


def _eval(node: ast.AST, expr: str) -> Fraction | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, expr)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, expr), _eval(node.right, expr)
        if isinstance(node.op, ast.Pow):
            return _power(left, right, expr)
        op = _BINARY.get(type(node.op))
        if op is not None:
            if op in (operator.truediv, operator.floordiv) and right == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return op(left, right)
    raise ValueError(f"unsupported syntax in {expr!r}")


def _power(base, exponent, expr: str) -> Fraction | float:
    """Bounded so a generated `9**9**9` cannot hang the grader."""
    if abs(exponent) > 64 or (abs(base) > 1 and abs(exponent) * math.log10(abs(base)) > 300):
        raise ValueError(f"power too large in {expr!r}")
    if isinstance(exponent, Fraction) and exponent.denominator == 1 and isinstance(base, Fraction):
        if base == 0 and exponent < 0:
            raise ValueError(f"division by zero in {expr!r}")
        return base ** int(exponent)
    try:
        result = float(base) ** float(exponent)
    except (OverflowError, ZeroDivisionError) as e:
        raise ValueError(f"bad power in {expr!r}") from e
    if isinstance(result, complex):
        raise ValueError(f"complex power in {expr!r}")
    return result


def _close(a, b) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=1e-9)


def _normalize(number: str) -> str:
    return number.replace(",", "").replace("$", "").replace(" ", "")


# --- checking ------------------------------------------------------------------------

def _step_kind(step: str, answer: str) -> str:
    if "<<" not in step and ">>" not in step and "####" not in step:
        return UNCHECKED  # no calculator annotation, no answer: nothing to recompute (":::::" is not "ok")
    matches = list(_ANNOTATION.finditer(step))
    if step.count("<<") != len(matches) or step.count(">>") != len(matches):
        return "bad_annotation"  # unclosed or stray brackets: unparseable
    for m in matches:
        kind = _annotation_kind(m.group(1), step[m.end():])
        if kind != "ok":
            return kind
    if "####" in step:
        got = extract_answer(step)
        if got is None or not numbers_equal(got, answer):
            return "wrong_answer"
    return "ok"


def _annotation_kind(inner: str, after: str) -> str:
    """Every side of `a=b` must agree, and so must the number displayed right after `>>`."""
    sides = inner.split("=")
    if len(sides) < 2:
        return "bad_annotation"
    try:
        values = [evaluate(s) for s in sides]
    except ValueError:
        return "bad_annotation"
    shown = _DISPLAYED.match(after)
    if shown:
        try:
            values.append(evaluate(shown.group(1)))
        except ValueError:
            pass
    return "ok" if all(_close(v, values[-1]) for v in values) else "wrong_result"


# --- corrupting ----------------------------------------------------------------------

def _result_spans(step: str) -> list[tuple[int, int, int | None, str | None]]:
    """Where each plain-number annotation result or `####` answer sits in `step`:
    (start, end, start of the displayed copy after `>>` or None, the annotation's
    expression or None)."""
    spans = []
    for m in _ANNOTATION.finditer(step):
        expr, eq, result = m.group(1).rpartition("=")
        stripped = result.strip()
        if eq and re.fullmatch(_NUMBER, stripped):
            start = m.start(1) + len(expr) + 1 + result.index(stripped)
            shown = _DISPLAYED.match(step, m.end())
            spans.append((start, start + len(stripped), shown.start(1) if shown else None, expr))
    at = step.rfind("####")
    final = _FINAL.match(step, at) if at >= 0 else None
    if final:
        spans.append((final.start(1), final.end(1), None, None))
    return spans


def _wrong_result(step: str, rng: random.Random) -> str:
    """Replace one result (and its displayed copy) with a nearby but wrong number, one
    that also differs from what the expression really gives, so the step is flagged."""
    start, end, shown_at, expr = rng.choice(_result_spans(step))
    original = step[start:end]
    avoid = [evaluate(original)]
    for side in (expr or "").split("="):
        try:
            avoid.append(evaluate(side))
        except ValueError:
            pass
    wrong = _wrong_number(original, avoid, rng)
    new = step[:start] + _format_like(wrong, original) + step[end:]
    if shown_at is not None:  # the displayed copy comes after the result: shift by the length change
        shown_at += len(new) - len(step)
        shown = re.match(_NUMBER, new[shown_at:]).group(0)
        new = new[:shown_at] + _format_like(wrong, shown) + new[shown_at + len(shown):]
    return new


def _wrong_number(text: str, avoid: list, rng: random.Random) -> Fraction:
    """A nearby value with the same number of decimals and sign, not equal to `avoid`."""
    value = Fraction(_normalize(text))
    unit = Fraction(1, 10 ** _decimals(text))
    candidates = [value + d * unit for d in (1, -1, 2, -2, 3, 10, -10)]
    candidates += [value * 10, value * 2]
    good = [c for c in candidates if (c >= 0) == (value >= 0) and not any(_close(c, a) for a in avoid)]
    return rng.choice(good)


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def _format_like(value: Fraction, like: str) -> str:
    """`value` written with `like`'s number of decimals (more if it needs them) and
    thousands commas if `like` has any."""
    decimals = _decimals(like)
    while (value * 10 ** decimals).denominator != 1 and decimals < 20:
        decimals += 1
    scaled = round(value * 10 ** decimals)
    digits = str(abs(scaled)).rjust(decimals + 1, "0")
    whole, frac = digits[: len(digits) - decimals], digits[len(digits) - decimals:]
    if "," in like:
        whole = f"{int(whole):,}"
    sign = "-" if value < 0 else ""
    return sign + whole + ("." + frac if decimals else "")
