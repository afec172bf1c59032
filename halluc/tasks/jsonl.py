"""Generic task over users' own data: one prompt and one response per row.

There is no step verifier for arbitrary text, so every step is "ok" and only the final
answer is checked (string equality after strip). The readers exist so that a user's
jsonl file or `datasets` dataset becomes `Problem`s with the same step convention as the
built-in tasks: each step carries its separator, so `"".join(steps)` is the response.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from halluc.tasks.base import UNCHECKED, Problem, StepReport
from halluc.core.inputs import InputError

STEP_SEPARATOR = "\n"  # what ends a step's text (guided decoding and the verifier head find step ends by it)


def iter_jsonl_rows(path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a jsonl file.

    Errors name the file and line so a bad row in a 100k-line file can be found.
    """
    if limit is not None and limit <= 0:
        return
    seen = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: "
                                 f"{raw[max(0, e.start - 10):e.start + 10]!r})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark (some editors write one)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: malformed JSON line: {e}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
            seen += 1
            if limit is not None and seen >= limit:
                return


def get_field(row: dict, name: str, source, line: int):
    """row[name], or a ValueError naming the field, file and line. None counts as missing:
    `datasets` fills absent keys with None."""
    if row.get(name) is None:
        raise InputError(f"{source}:{line}: missing field {name!r} (fields present: {sorted(row)})")
    return row[name]


def get_text(row: dict, name: str, source, line: int) -> str:
    """row[name] as text: a string as it is, a number converted, anything else an error naming
    the field, file and line."""
    value = get_field(row, name, source, line)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{source}:{line}: field {name!r} must be text, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def split_steps(text: str, sep: str = "\n") -> list[str]:
    """Split after each `sep`, keeping it on the step it ends, so join gives `text` back.

    Runs of separators stay on the step they end, e.g. a blank line between paragraphs
    belongs to the paragraph before it (only leading separators form a step of their own).
    """
    if not sep:
        raise ValueError("step separator must be non-empty")
    steps: list[str] = []
    start = 0
    while (j := text.find(sep, start)) >= 0:
        end = j + len(sep)
        while text.startswith(sep, end):
            end += len(sep)
        steps.append(text[start:end])
        start = end
    if start < len(text):
        steps.append(text[start:])
    return steps


def steps_from_list(items: list, sep: str = "\n") -> list[str]:
    """A response given as a list of steps: every step but the last gets `sep` appended."""
    items = [str(s) for s in items]
    return [s + sep for s in items[:-1]] + items[-1:]


def extract_answer(text: str, sep: str = "\n") -> str | None:
    """Without a verifier the answer is the last step that is not blank, stripped (None if there is none)."""
    steps = [s.strip() for s in split_steps(text, sep)]
    return next((s for s in reversed(steps) if s), None)


def verify_steps(problem: Problem, steps: list[str]) -> StepReport:
    """No per-step checker for arbitrary text: every step UNCHECKED (step validity is n/a); the answer is
    string-compared."""
    sep = problem.meta.get("step_separator", "\n")
    answer = extract_answer("".join(steps), sep)
    known = problem.answer.strip()
    return StepReport(kinds=[UNCHECKED] * len(steps), answer_correct=bool(known) and answer == known)


def later_steps(problem: Problem, i: int) -> list[str]:
    """Steps after i that differ from step i (ignoring whitespace): candidates to be
    written too early."""
    here = problem.steps[i].strip()
    return [s for s in problem.steps[i + 1:] if s.strip() and s.strip() != here]


def corrupt_step(problem: Problem, i: int, rng, mode: str = "early") -> str | None:
    """A later step written too early, keeping step i's leading/trailing whitespace so it
    tokenizes like a step in that position. None if there is no later step. (`mode`: "any" and
    "early" are this one form.)

    This is the only corruption that needs no knowledge of the text.
    """
    later = later_steps(problem, i)
    if not later:
        return None
    step = problem.steps[i]
    lead = step[: len(step) - len(step.lstrip())]
    trail = step[len(step.rstrip()):]
    return lead + rng.choice(later).strip() + trail


def problem_from_row(
    row: dict,
    source,
    line: int,
    prompt_field: str = "prompt",
    response_field: str = "response",
    answer_field: str | None = None,
    step_separator: str = "\n",
    prompt_template: str = "{prompt}",
) -> Problem:
    """One row -> Problem. `prompt_template` may use any field of the row; `{prompt}` is
    the prompt field whatever its name."""
    prompt = get_text(row, prompt_field, source, line)
    response = get_field(row, response_field, source, line)
    try:
        prompt_text = prompt_template.format(**{**row, "prompt": prompt})
    except KeyError as e:
        raise InputError(f"{source}:{line}: missing field {e.args[0]!r} used by prompt_template") from None
    if isinstance(response, (list, tuple)):
        steps = steps_from_list(list(response), step_separator)
    elif isinstance(response, (str, int, float)) and not isinstance(response, bool):
        steps = split_steps(str(response), step_separator)
    else:
        raise InputError(f"{source}:{line}: field {response_field!r} must be a string or a list of strings")
    if not steps or not "".join(steps).strip():
        raise InputError(f"{source}:{line}: field {response_field!r} is empty")
    if answer_field is not None:
        answer = get_text(row, answer_field, source, line).strip()
    else:  # as evaluation reads it: the last step of the text (a list item may hold several lines)
        answer = extract_answer("".join(steps), step_separator) or ""
    meta = {"task": "jsonl", "source": str(source), "line": line, "step_separator": step_separator}
    return Problem(prompt=prompt_text, steps=steps, answer=answer, meta=meta)


def read_jsonl(
    path,
    prompt_field: str = "prompt",
    response_field: str = "response",
    answer_field: str | None = None,
    step_separator: str = "\n",
    prompt_template: str = "{prompt}",
    limit: int | None = None,
) -> list[Problem]:
    """Read a user's jsonl file (one object per line) into Problems."""
    opts = dict(prompt_field=prompt_field, response_field=response_field, answer_field=answer_field,
                step_separator=step_separator, prompt_template=prompt_template)
    return [problem_from_row(row, path, n, **opts) for n, row in iter_jsonl_rows(path, limit)]


def load_hf_dataset(
    name_or_path,
    split: str = "train",
    prompt_field: str = "prompt",
    response_field: str = "response",
    answer_field: str | None = None,
    step_separator: str = "\n",
    prompt_template: str = "{prompt}",
    limit: int | None = None,
) -> list[Problem]:
    """Load with `datasets`: a local .json/.jsonl/.csv/.parquet file, a `save_to_disk`
    directory, or a hub name (which downloads; tests only use local data).

    Errors give the 1-based row number in the split as the "line".
    """
    ds = _load_split(name_or_path, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    opts = dict(prompt_field=prompt_field, response_field=response_field, answer_field=answer_field,
                step_separator=step_separator, prompt_template=prompt_template)
    source = f"{name_or_path}[{split}]"
    return [problem_from_row(dict(row), source, n, **opts) for n, row in enumerate(ds, start=1)]


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_split(name_or_path, split: str):
    import datasets  # imported lazily: slow to import and not needed for plain jsonl

    path = Path(name_or_path)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"{path}: unknown data file type {path.suffix!r}")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{path}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    return datasets.load_dataset(str(name_or_path), split=split)
