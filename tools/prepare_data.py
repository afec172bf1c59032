"""Write a backtracking SFT dataset (input_ids, labels, roles) to disk with `datasets`.

    python tools/prepare_data.py --out runs/data/arith                      # embedded arith lab
    python recipes/masked_sft.py data=runs/data/arith                        # train on it (the lab base)
    python tools/prepare_data.py --task gsm8k --input ../shared/data/gsm8k/train.jsonl \\
        --tokenizer path/to/tokenizer --errors random --sites 2 --tokens-per-site 3 --out runs/data/gsm8k
    python tools/prepare_data.py --task jsonl --input my.jsonl --prompt-field q --response-field a ...

The tokenizer gets <|BACKTRACK|> if it lacks it (logged) and is saved next to the data, so the
ids in the dataset always match the tokenizer that made them.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from halluc.core.config import load_config, unescape
from halluc.core.inputs import check_input_file, check_out_folder, check_reads_outside, replace_folder, run_cli
from halluc.sources.data import PREPARED_INFO, build_sft_dataset
from halluc.sources.errors import ErrorConfig
from halluc.pipeline.lab import LabConfig, lab_splits, lab_tokenizer
from halluc.tasks import get_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="arith", choices=["arith", "gsm8k", "jsonl"])
    p.add_argument("--input", help="jsonl file (gsm8k, jsonl) or a datasets name/folder (jsonl)")
    p.add_argument("--split", default="train", help="split when --input is a datasets name/folder")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--answer-field", default=None)
    p.add_argument("--step-separator", default="\n", type=unescape, help="jsonl: what ends a step (\\n read as a newline)")
    p.add_argument("--prompt-template", default="{prompt}\n",
                   help="jsonl: the text before the response ({prompt} and any field of the row; verbatim; default {prompt} and a newline)")
    p.add_argument("--size", type=int, default=None, help="arith: number of problems (default 10000)")
    p.add_argument("--lab", action="append", default=[], metavar="KEY=VALUE",
                   help="arith: a lab setting as the recipe takes it without 'lab.' (repeat), e.g. --lab prime=5; "
                        "use the recipe's own, so the tokenizer and the held-out problems match its base")
    p.add_argument("--limit", type=int, default=None, help="read at most this many problems")
    p.add_argument("--tokenizer", help="the model's folder (its tokenizer); arith default: the lab base's tokenizer")
    p.add_argument("--vocab-size", type=int, default=384, help="arith without --tokenizer: the lab tokenizer's size "
                   "(the recipe's tiny.vocab_size)")
    p.add_argument("--errors", default="step", choices=["none", "random", "step"])
    p.add_argument("--example-rate", type=float, default=0.5)
    p.add_argument("--sites", type=int, default=1)
    p.add_argument("--tokens-per-site", type=int, default=1)
    p.add_argument("--max-error-tokens", type=int, default=0)
    p.add_argument("--unmasked", action="store_true", help="train on error tokens too (ablation)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--overlong", default="drop", choices=["drop", "truncate"])
    p.add_argument("--attention", default=None, choices=["causal", "block_errors"],
                   help="also store the edit-tree structure: attn_end and position_ids columns")
    p.add_argument("--positions", default="original", choices=["original", "rewound"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--out", required=True, help="the dataset folder (refused if it holds anything, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    a = p.parse_args(argv)
    in_lab = [kv.split("=", 1)[1].strip() for kv in a.lab if kv.split("=", 1)[0].strip() == "sft_size"]
    if in_lab and a.size is not None and not (in_lab[-1].isdigit() and int(in_lab[-1]) == a.size):
        p.error(f"--size {a.size} and --lab sft_size={in_lab[-1]} disagree: give one of them")
    if a.task == "arith" and a.limit is not None:
        p.error("--limit reads at most N problems of --input (gsm8k, jsonl); arith makes --size problems")
    check_reads_outside(a.out, {"--input": a.input, "--tokenizer": a.tokenizer})
    check_out_folder(a.out, a.overwrite)
    for name, low in (("size", 1), ("sites", 1), ("tokens_per_site", 1), ("max_error_tokens", 0), ("max_len", 1),
                      ("vocab_size", 260), ("limit", 1), ("num_proc", 1)):
        value = getattr(a, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    if not 0 <= a.example_rate <= 1:
        p.error("--example-rate must be in [0, 1]")
    return a


def arith_lab(a) -> LabConfig:
    return load_config(LabConfig, [*([f"sft_size={a.size}"] if a.size is not None else []), *a.lab])


def load_problems(a):
    if a.task == "arith":
        return lab_splits(arith_lab(a), a.seed)["sft"]
    if not a.input:
        raise SystemExit(f"--task {a.task} needs --input")
    if a.input.endswith(".jsonl") or a.task == "gsm8k":
        check_input_file(a.input, "--input")
    if a.task == "gsm8k":
        return get_task("gsm8k").read_jsonl(a.input, limit=a.limit)
    jsonl = get_task("jsonl")
    fields = dict(prompt_field=a.prompt_field, response_field=a.response_field, answer_field=a.answer_field,
                  step_separator=a.step_separator, prompt_template=a.prompt_template)
    if a.input.endswith(".jsonl"):
        return jsonl.read_jsonl(a.input, limit=a.limit, **fields)
    return jsonl.load_hf_dataset(a.input, split=a.split, limit=a.limit, **fields)


def edit_tree_columns(roles: list[int], mode: str, positions: str) -> dict:
    from halluc.structure.attention import edit_tree, position_ids

    end, depth = edit_tree(roles, mode)
    return {"attn_end": end.tolist(), "position_ids": position_ids(depth=depth, scheme=positions).tolist()}


def main(argv=None):
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    problems = load_problems(a)  # the lab settings (--lab) are checked here, before torch loads
    from halluc.core.tokens import add_backtrack_token, load_tokenizer

    if a.tokenizer:
        tokenizer = load_tokenizer(a.tokenizer)
    elif a.task == "arith":  # the lab base's own tokenizer (same lab settings and seed: the same ids)
        tokenizer = lab_tokenizer(lab_splits(arith_lab(a), a.seed)["train"], a.vocab_size)
    else:
        raise SystemExit(f"--task {a.task} needs --tokenizer")
    bt_id = add_backtrack_token(tokenizer)
    errors = ErrorConfig(source=a.errors, example_rate=a.example_rate, sites=a.sites,
                         tokens_per_site=a.tokens_per_site, max_error_tokens=a.max_error_tokens)
    ds = build_sft_dataset(problems, tokenizer, errors, bt_id, masked=not a.unmasked, max_len=a.max_len,
                           overlong=a.overlong, seed=a.seed, num_proc=a.num_proc)
    if a.attention:
        ds = ds.map(lambda roles: edit_tree_columns(roles, a.attention, a.positions), input_columns="roles",
                    num_proc=a.num_proc, desc=f"edit tree ({a.attention}, {a.positions} positions)")
    ds.save_to_disk(str(replace_folder(a.out)))
    tokenizer.save_pretrained(Path(a.out) / "tokenizer")
    made = {"task": a.task, "input": a.input, "errors": a.errors, "example_rate": a.example_rate, "sites": a.sites,
            "masked": not a.unmasked, "max_len": a.max_len, "overlong": a.overlong, "seed": a.seed,
            "lab": a.lab if a.task == "arith" else None}
    (Path(a.out) / PREPARED_INFO).write_text(json.dumps(made, indent=1))
    print(f"wrote {len(ds)} examples to {a.out} (tokenizer in {Path(a.out) / 'tokenizer'}, BT id {bt_id})")
    return ds


if __name__ == "__main__":
    run_cli(main)
