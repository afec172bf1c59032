"""Evaluate a checkpoint with backtracking generation; write eval.json + eval.md, print the table.

    python recipes/evaluate.py --model runs/masked_sft/checkpoint                 # arith, in + out of distribution
    python recipes/evaluate.py --model DIR --task gsm8k --data ../shared/data/gsm8k/test.jsonl --limit 50
    python recipes/evaluate.py --model DIR --semantics rewind --out runs/eval     # override (warns on mismatch)

The semantics (keep / rewind) come from the checkpoint's config.halluc unless --semantics is
given; metric definitions are in docs/generation.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from transformers import AutoTokenizer

from halluc.evaluate import evaluate_problems, markdown_table
from halluc.generate import SEMANTICS, LoopGuards, Sampling
from halluc.lab import LabConfig, lab_splits
from halluc.model import load_causal_lm
from halluc.tasks import get_task, gsm8k

DEFAULT_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a local HF causal-LM folder (with its tokenizer)")
    p.add_argument("--task", choices=["arith", "gsm8k"], default="arith")
    p.add_argument("--data", default=None, help="gsm8k: a jsonl file (default: the shared GSM8K test set)")
    p.add_argument("--limit", type=int, default=None, help="at most N problems per split")
    p.add_argument("--semantics", choices=SEMANTICS, default=None, help="default: from the checkpoint")
    p.add_argument("--out", default=None, help="folder for eval.json and eval.md (default: the model folder)")
    p.add_argument("--seed", type=int, default=0, help="arith lab splits seed (as in training)")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-backtracks", type=int, default=LoopGuards.max_backtracks)
    p.add_argument("--max-backtracks-per-position", type=int, default=LoopGuards.max_backtracks_per_position)
    p.add_argument("--ban-erased", action="store_true", help="ban the just-erased token right after a rewind")
    return p.parse_args(argv)


def load_splits(args) -> dict:
    if args.task == "arith":
        splits = lab_splits(LabConfig(), args.seed)
        return {name: splits[name][:args.limit] for name in ("test_id", "test_ood")}
    path = Path(args.data) if args.data else DEFAULT_GSM8K
    return {path.stem: gsm8k.read_jsonl(path, args.limit)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    model = load_causal_lm(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    task = get_task(args.task)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    guards = LoopGuards(args.max_backtracks, args.max_backtracks_per_position, args.ban_erased)
    results = {name: evaluate_problems(model, tokenizer, problems, task, args.max_new_tokens, args.batch_size,
                                       desc=f"eval {name}", semantics=args.semantics, sampling=sampling,
                                       guards=guards)
               for name, problems in load_splits(args).items()}
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "task": args.task, "args": vars(args),
              "halluc": getattr(model.config, "halluc", None), "results": results,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(results)
    (out / "eval.md").write_text(f"# {args.model} ({args.task})\n\n{table}\n")
    print("\n" + table + f"\n\neval: {out / 'eval.json'}   {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
