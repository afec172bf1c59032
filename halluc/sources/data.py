"""From problems to training examples (token ids + roles + labels), with `datasets`.

Problems are tokenized piece by piece (prompt, then each step) and only ever concatenated as
ids: nothing is decoded and re-encoded, so roles, labels and deletions always line up.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from halluc.core.inputs import InputError
from halluc.sources.errors import ErrorConfig, clean_example, random_token_errors, step_errors
from halluc.core.example import IGNORE_INDEX, ROLE_NAMES, Example, Role
from halluc.tasks import Problem, get_task

if TYPE_CHECKING:  # `datasets` is imported where a Dataset is built: examples alone need no pyarrow
    from datasets import Dataset

log = logging.getLogger(__name__)


def labels_from_roles(ids: list[int], roles: list[int], masked: bool = True) -> list[int]:
    """Technique 1: prompt never trained; error tokens trained only when `masked` is False.

    BT and correction tokens are trained: the model must learn to emit the BT after an error
    and what to write instead. In masked mode the errors stay in the input (the model sees
    them, which is what teaches it to notice them) but are never a target.
    """
    untrained = {Role.PROMPT, Role.ERROR} if masked else {Role.PROMPT}
    return [IGNORE_INDEX if r in untrained else t for t, r in zip(ids, roles)]


def tokenize_problem(problem: Problem, tokenizer) -> tuple[list[int], list[list[int]]]:
    return tokenize_problems([problem], tokenizer)[0]


def tokenize_problems(problems: list[Problem], tokenizer) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, ids of each step) per problem, in two tokenizer calls for all of them: every
    piece is still tokenized on its own (a batch call gives each text the ids it gets alone), but
    the tokenizer's per-call overhead is paid twice, not once per piece."""
    from halluc.core.tokens import continuation_ids

    if not problems:
        return []
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=True, return_attention_mask=False)["input_ids"]
    pieces = [s for p in problems for s in p.steps]
    flat = continuation_ids(tokenizer, pieces)  # each step on its own, with no word boundary added before it
    out, at = [], 0
    for p, prompt in zip(problems, prompts):
        out.append((list(prompt), [list(ids) for ids in flat[at:at + len(p.steps)]]))
        at += len(p.steps)
    return out


def make_example(problem: Problem, tokenizer, errors: ErrorConfig, bt_id: int | None,
                 rng: random.Random, tokenized: tuple[list[int], list[list[int]]] | None = None) -> Example:
    """One example from one problem; checks the invariant apply_backtrack(response) == clean.
    `tokenized`: the problem's `tokenize_problem` ids, when they were computed in bulk already."""
    prompt, steps = tokenized if tokenized is not None else tokenize_problem(problem, tokenizer)
    eos = tokenizer.eos_token_id
    # with a per-step rate every example is a candidate (the draw is per step, in step_errors)
    if errors.source == "none" or bt_id is None or (not errors.step_rate and rng.random() >= errors.example_rate):
        return clean_example(prompt, steps, eos)
    if errors.source == "random":
        specials = set(tokenizer.all_special_ids)
        vocab = [i for i in range(len(tokenizer)) if i not in specials]
        ex = random_token_errors(prompt, steps, eos, bt_id, vocab, errors, rng)
    elif errors.source == "step":
        task = get_task(problem.meta.get("task", "arith"))

        mode = {} if errors.step_kind == "any" else {"mode": errors.step_kind}

        from halluc.core.tokens import continuation_ids

        def wrong_step(i: int):
            text = task.corrupt_step(problem, i, rng, **mode)
            return None if text is None else continuation_ids(tokenizer, [text])[0]
        ex = step_errors(prompt, steps, eos, bt_id, wrong_step, errors, rng)
    else:
        raise ValueError(f"errors.source must be none, random or step, not {errors.source!r}")
    ex.check(clean_example(prompt, steps, eos).response, bt_id)
    return ex


def fit_length(ids: list[int], roles: list[int], max_len: int) -> int | None:
    """Where to cut an over-long example on the right, or None to drop it.

    Never cut between an error run and its BTs (that would train a dangling error): move the
    cut left until it follows no error token and the first dropped token is not a BT.
    """
    if len(ids) <= max_len:
        return len(ids)
    cut = max_len
    while cut > 0 and (roles[cut - 1] == Role.ERROR or roles[cut] == Role.BACKTRACK):
        cut -= 1
    return cut if cut > 0 and roles[cut - 1] != Role.PROMPT else None


def problems_to_dataset(problems: list[Problem]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p.prompt, "steps": p.steps, "answer": p.answer,
                               "meta": json.dumps(p.meta)} for p in problems])


def row_to_problem(row: dict) -> Problem:
    return Problem(prompt=row["prompt"], steps=list(row["steps"]), answer=row["answer"],
                   meta=json.loads(row["meta"]))


def build_sft_dataset(problems: list[Problem], tokenizer, errors: ErrorConfig, bt_id: int | None,
                      masked: bool = True, max_len: int = 512, overlong: str = "drop",
                      seed: int = 0, num_proc: int | None = None) -> Dataset:
    """A `datasets.Dataset` with input_ids, labels, roles (ClassLabel names), built with map."""
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be drop or truncate, not {overlong!r}")

    def build(problem, idx, tokenized):
        rng = random.Random(seed * 1_000_003 + idx)  # per example: same data for any num_proc
        ex = make_example(problem, tokenizer, errors, bt_id, rng, tokenized)
        cut = fit_length(ex.ids, ex.roles, max_len)
        keep = cut is not None and (cut == len(ex.ids) or overlong == "truncate")
        cut = cut or 0
        return {"input_ids": ex.ids[:cut], "roles": ex.roles[:cut],
                "labels": labels_from_roles(ex.ids[:cut], ex.roles[:cut], masked),
                "keep": keep, "overlong": len(ex.ids) > max_len}

    def build_batch(batch, indices):
        # batched: the problems of a batch are tokenized together (tokenize_problems), and
        # `datasets` formats a batch once instead of every row; each example is built as before
        problems_here = [row_to_problem(dict(zip(batch, values))) for values in zip(*batch.values())]
        out = {k: [] for k in ("input_ids", "roles", "labels", "keep", "overlong")}
        for problem, idx, tokenized in zip(problems_here, indices, tokenize_problems(problems_here, tokenizer)):
            for k, v in build(problem, idx, tokenized).items():
                out[k].append(v)
        return out

    if not problems:
        raise InputError("no problems to build examples from (an empty training file?)")
    ds = problems_to_dataset(problems).map(build_batch, with_indices=True, batched=True, batch_size=1000,
                                           num_proc=num_proc, desc="building examples")
    n_over, n_drop = sum(ds["overlong"]), len(ds) - sum(ds["keep"])
    if n_over:
        log.warning("%d of %d examples (%.0f%%) are longer than max_len=%d tokens: %s (%d dropped); raise "
                    "max_len%s", n_over, len(ds), 100 * n_over / len(ds), max_len,
                    "dropped" if overlong == "drop" else "truncated on the right", n_drop,
                    " or set overlong=truncate" if overlong == "drop" else "")
    if n_drop == len(ds):
        raise InputError(f"all {len(ds)} examples are longer than max_len={max_len} tokens: raise max_len")
    ds = ds.filter(lambda k: k, input_columns="keep").remove_columns(["keep", "overlong"])
    from datasets import ClassLabel, Sequence

    return ds.cast_column("roles", Sequence(ClassLabel(names=ROLE_NAMES)))



PREPARED_INFO = "halluc_data.json"  # what tools/prepare_data.py made the data from (task, errors, lengths)


def check_prepared_task(folder, task: str | None) -> dict:
    """A prepared folder's record ({} without one); refused when it was made from another task than
    `task` (its evaluation would score another task). Torch-free: settings check it at load."""
    info = Path(folder) / PREPARED_INFO
    made = json.loads(info.read_text()) if info.is_file() else {}
    if task is not None and made.get("task") not in (None, task):
        raise InputError(f"data={folder} was prepared from {made['task']} problems, but lab.task={task} "
                         f"(evaluation would score another task): set lab.task={made['task']}")
    return made


def load_prepared(folder, tokenizer, task: str | None = None) -> Dataset:
    """A dataset written by tools/prepare_data.py, checked against the model's tokenizer (after
    the BT token was added: its ids must mean the same tokens, or training would be garbage) and
    against the task it is evaluated on."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "dataset_info.json").exists():
        raise SystemExit(f"data={folder}: not a dataset folder written by tools/prepare_data.py (no dataset_info.json)")
    made = check_prepared_task(folder, task)
    if made:
        log.info("data=%s: made by tools/prepare_data.py with %s; errors, masking and lengths are fixed there "
                 "(errors.*, masked, max_len and overlong do not apply)", folder, made)
    ds = load_from_disk(str(folder))
    missing = {"input_ids", "labels", "roles"} - set(ds.column_names)
    if missing:
        raise SystemExit(f"data={folder}: missing column(s) {sorted(missing)} (has {ds.column_names})")
    if (folder / "tokenizer").exists():
        theirs = AutoTokenizer.from_pretrained(folder / "tokenizer").get_vocab()
        ours = tokenizer.get_vocab()
        if theirs != ours:
            differ = sorted(t for t in set(theirs) | set(ours) if theirs.get(t) != ours.get(t))
            raise SystemExit(f"data={folder} was tokenized with another tokenizer than the model's "
                             f"({len(differ)} tokens differ, e.g. {differ[:5]}): prepare it with "
                             "--tokenizer set to the model's folder (arith: the same lab settings, seed and "
                             "--vocab-size as the recipe's lab and tiny.vocab_size)")
    else:
        log.warning("data=%s has no tokenizer/ folder: cannot check that its ids match the model's", folder)
    extra = [c for c in ("attn_end", "position_ids") if c in ds.column_names]
    if extra:  # the recipe lays every example out from its roles with its own attention settings
        ds = ds.remove_columns(extra)
    if len(ds) == 0:
        raise SystemExit(f"data={folder}: no examples")
    log.info("SFT data: %d prepared examples from %s", len(ds), folder)
    return ds
