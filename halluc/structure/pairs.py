"""Preference pairs (technique 6): read, tokenize and lay out prompt + chosen + rejected.

One pair is token ids and roles, the format `halluc.sources.own_errors.save_round` writes (`pairs/`):
    prompt_ids, prompt_roles       the question (PROMPT), the response so far (KEPT) and, for
                                   pairs from the model's own errors, the wrong step (ERROR)
    chosen_ids, chosen_roles       e.g. BTs erasing the error, the correction, the rest, EOS
    rejected_ids, rejected_roles   e.g. the model's own continuation after the error, EOS
Text pairs (TRL's convention: `prompt`, `chosen`, `rejected` strings, in a .jsonl file or a
`datasets` folder) are tokenized without re-encoding across the boundary: the prompt with the
tokenizer's special tokens, each completion on its own without them, EOS appended to each.
Their roles come from the BTs in them: a token a BT erases is an ERROR (in the prompt too), a
BT is a BACKTRACK, the rest KEPT.

A pair is laid out as one unit (`halluc.structure.packing.layout_two_branch`): the prompt once, then the
chosen branch, then the rejected one, which cannot see the chosen one. Every completion token
is scored (its label is its id); the prompt never is. Under `block_errors` the prompt's
trailing error run, which the chosen branch erases, moves into both branches (as ERROR before
the chosen BTs, as KEPT before the rejected continuation), unscored in both: a shared prompt
cannot be popped by one branch only.
"""
from __future__ import annotations

import logging
from pathlib import Path

from halluc.core.example import IGNORE_INDEX, Role
from halluc.structure.packing import Layout, best_fit_decreasing, concat_row, layout_two_branch
from halluc.core.inputs import InputError

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_ids", "prompt_roles", "chosen_ids", "chosen_roles", "rejected_ids", "rejected_roles")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def trace_roles(prompt_ids: list[int], completion_ids: list[int], bt_id: int | None) -> tuple[list[int], list[int]]:
    """(prompt roles, completion roles) of prompt + completion read as one trace: each BT erases
    the last visible token (an ERROR, in the prompt too), BTs are BACKTRACK; the question before
    the first erased token is PROMPT, every other token KEPT."""
    ids = list(prompt_ids) + list(completion_ids)
    roles = [int(Role.KEPT)] * len(ids)
    visible: list[int] = []
    for j, t in enumerate(ids):
        if t == bt_id:
            roles[j] = int(Role.BACKTRACK)
            if visible:
                roles[visible.pop()] = int(Role.ERROR)
        else:
            visible.append(j)
    first_edit = next((j for j, r in enumerate(roles) if r != Role.KEPT), len(prompt_ids))
    for j in range(min(first_edit, len(prompt_ids))):
        roles[j] = int(Role.PROMPT)
    return roles[:len(prompt_ids)], roles[len(prompt_ids):]


def check_text_pair(row: dict, where: str) -> None:
    """A {prompt, chosen, rejected} row has the three fields, as text."""
    for key in TEXT_COLUMNS:
        if key not in row:
            raise InputError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
        if not isinstance(row[key], str):
            raise InputError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")


def check_pairs_file(path) -> None:
    """Every row of a .jsonl pairs file, read and checked before any model loads (no tokenizer needed)."""
    from halluc.tasks.jsonl import iter_jsonl_rows

    if str(path).endswith(".jsonl"):
        for line, row in iter_jsonl_rows(path):
            check_text_pair(row, f"{path}:{line}")


def tokenize_text_pair(row: dict, tokenizer, bt_id: int | None, where: str = "") -> dict:
    """A {prompt, chosen, rejected} text row as token ids + roles (module docstring)."""
    check_text_pair(row, where)
    prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = {"prompt_ids": prompt}
    prompt_roles = [int(Role.PROMPT)] * len(prompt)
    for key in ("chosen", "rejected"):
        ids = tokenizer(row[key], add_special_tokens=False)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        p_roles, roles = trace_roles(prompt, ids, bt_id)
        # a prompt token either branch erases is an error; else the more specific role (PROMPT < KEPT)
        prompt_roles = [int(Role.ERROR) if Role.ERROR in (a, b) else max(a, b) for a, b in zip(prompt_roles, p_roles)]
        out[f"{key}_ids"], out[f"{key}_roles"] = ids, roles
    out["prompt_roles"] = prompt_roles
    return out


def check_pair(pair: dict, vocab_size: int, bt_id: int | None, where: str) -> None:
    """Lengths agree, ids fit the vocabulary, BT ids and BACKTRACK roles coincide, the prompt
    starts with the question and both completions are non-empty."""
    for part in ("prompt", "chosen", "rejected"):
        ids, roles = pair[f"{part}_ids"], pair[f"{part}_roles"]
        if len(ids) != len(roles):
            raise ValueError(f"{where}: {part}_ids has {len(ids)} tokens but {part}_roles {len(roles)}")
        if part != "prompt" and not ids:
            raise ValueError(f"{where}: empty {part} completion: a pair needs a token to score on each side")
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(f"{where}: {part}_ids has id {max(ids)} outside the model's vocabulary "
                             f"({vocab_size}): tokenized with another tokenizer?")
        bad = [i for i, (t, r) in enumerate(zip(ids, roles)) if (t == bt_id) != (r == Role.BACKTRACK)]
        if bad:
            raise ValueError(f"{where}: {part} token {bad[0]} (id {ids[bad[0]]}) has role {Role(roles[bad[0]]).name} "
                             f"but the BT id is {bt_id}: ids and roles disagree (another tokenizer?)")
    if not pair["prompt_ids"] or pair["prompt_roles"][0] != Role.PROMPT:
        raise ValueError(f"{where}: the prompt must start with the question (role PROMPT)")


def load_pairs(source, tokenizer, bt_id: int | None, limit: int | None = None) -> list[dict]:
    """Pairs from a .jsonl file of text pairs, or a `datasets` folder of id pairs (own_errors'
    `pairs/`, or a round's `data/` holding one) or of text pairs; checked against the tokenizer."""
    from halluc.tasks.jsonl import iter_jsonl_rows

    path = Path(source)
    if path.is_dir() and not (path / "dataset_info.json").exists() and (path / "pairs" / "dataset_info.json").exists():
        path = path / "pairs"
    if path.suffix == ".jsonl":
        if not path.exists():
            raise SystemExit(f"data={source}: no such file")
        rows = [(f"{path}:{line}", tokenize_text_pair(row, tokenizer, bt_id, f"{path}:{line}"))
                for line, row in iter_jsonl_rows(path, limit)]
    elif (path / "dataset_info.json").exists():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        if all(c in ds.column_names for c in PAIR_COLUMNS):
            form = "form" in ds.column_names  # own-error pairs: bt, step or balanced (halluc/sources/pair_forms.py)
            rows = [(f"{path} row {i}", {**{k: list(r[k]) for k in PAIR_COLUMNS}, **({"form": r["form"]} if form else {})})
                    for i, r in enumerate(ds)]
        elif all(c in ds.column_names for c in TEXT_COLUMNS):
            rows = [(f"{path} row {i}", tokenize_text_pair(r, tokenizer, bt_id, f"{path} row {i}"))
                    for i, r in enumerate(ds)]
        else:
            raise SystemExit(f"data={source}: a pairs folder needs the columns {list(PAIR_COLUMNS)} or "
                             f"{list(TEXT_COLUMNS)}; it has {ds.column_names}")
    else:
        raise SystemExit(f"data={source}: not a .jsonl file of prompt/chosen/rejected text nor a `datasets` "
                         "folder of pairs (recipes/self_correct.py writes them to round-N/data/pairs)")
    pairs = []
    for where, pair in rows:
        try:
            check_pair(pair, len(tokenizer), bt_id, where)
        except ValueError as e:
            raise SystemExit(f"data={source}: {e}") from None
        pairs.append(pair)
    if not pairs:
        raise SystemExit(f"data={source}: no pairs")
    log.info("%d preference pairs from %s", len(pairs), source)
    return pairs


def layout_pair(pair: dict, mode: str = "causal", positions: str = "original") -> Layout:
    """One pair as one unit: the prompt once, chosen, rejected (module docstring)."""
    p_ids, p_roles = list(pair["prompt_ids"]), list(pair["prompt_roles"])
    tail = 0  # the prompt's trailing error run
    while mode != "causal" and tail < len(p_roles) and p_roles[len(p_roles) - 1 - tail] == Role.ERROR:
        tail += 1
    cut = len(p_ids) - tail
    branches = []
    for key, tail_role in (("chosen", Role.ERROR), ("rejected", Role.KEPT)):
        ids = p_ids[cut:] + list(pair[f"{key}_ids"])
        roles = [int(tail_role)] * tail + list(pair[f"{key}_roles"])
        labels = [IGNORE_INDEX] * tail + list(pair[f"{key}_ids"])
        branches.append({"input_ids": ids, "roles": roles, "labels": labels})
    return layout_two_branch({"input_ids": p_ids[:cut], "roles": p_roles[:cut]}, *branches, mode=mode,
                             positions=positions)


def pair_rows(pairs: list[dict], mode: str = "causal", positions: str = "original", max_len: int = 512,
              pack_len: int = 0, limit: str | None = None) -> list[dict]:
    """The rows a preference trainer takes: one pair per row, or (pack_len > 0) pairs packed
    best-fit into rows of pack_len tokens, no pair split. Pairs longer than max_len (prompt and
    both completions) are dropped, with a warning. `limit`: what set max_len when it is not the
    user's setting (the model's positions), named in the messages."""
    what = limit or f"max_len={max_len}"
    fix = "a model with more positions" if limit else "raise max_len"
    units, too_long = [], 0
    for pair in pairs:
        unit = layout_pair(pair, mode, positions)
        if len(unit) > max_len:
            too_long += 1
            continue
        units.append(unit)
    if too_long:
        log.warning("%d of %d pairs are longer than %s tokens (prompt + chosen + rejected) and were "
                    "dropped: %s", too_long, len(pairs), what, fix)
    if not units:
        raise SystemExit(f"every pair is longer than {what} tokens (prompt + chosen + rejected): {fix}")
    if pack_len:
        kept = [i for i, u in enumerate(units) if len(u) <= pack_len]
        if len(kept) < len(units):
            log.warning("%d pairs are longer than layout.pack=%d tokens and were dropped: raise layout.pack",
                        len(units) - len(kept), pack_len)
        groups = [[kept[j] for j in g] for g in best_fit_decreasing([len(units[i]) for i in kept], pack_len)]
        rows = [_row([units[i] for i in g]) for g in groups]
        real = sum(len(units[i]) for i in kept)
        log.info("packed %d pairs into %d rows of %d tokens: %.1f%% real tokens", len(kept), len(rows), pack_len,
                 100 * real / max(len(rows) * pack_len, 1))
        return rows
    return [_row([u]) for u in units]


def _row(units: list[Layout]) -> dict:
    row = concat_row(units)
    del row["branches"]  # spans for inspection; the trainer reads branch_ids
    return row
