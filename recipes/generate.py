"""Generate from your own prompts with a trained checkpoint (or adapter), backtracking included.

    python recipes/generate.py --model runs/masked_sft/checkpoint --prompt "a = 4 , b = a + 2 . b ?"
    python recipes/generate.py --model DIR --prompts-file prompts.txt --temperature 0.7 --json out.jsonl

For every prompt it prints the visible text (what a reader sees), the raw trace with each BT shown
as ⌫, the semantics used (keep / rewind, from the checkpoint's config.halluc unless --semantics)
and why generation stopped. --json writes the same as one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from halluc.decoding import SEMANTICS, LoopGuards

SHOWN_BT = "⌫"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint or adapter folder saved by halluc (or any HF model)")
    p.add_argument("--base", default=None, help="an adapter's base folder, if not where it was at training")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--semantics", choices=SEMANTICS, default=None, help="default: from the checkpoint")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-backtracks", type=int, default=LoopGuards.max_backtracks)
    p.add_argument("--json", default=None, help="also write the results here (jsonl)")
    args = p.parse_args(argv)
    if args.prompts_file:
        args.prompt += [line.rstrip("\n") for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
                        if line.strip()]
    if not args.prompt:
        p.error("give --prompt TEXT (one or more) or --prompts-file FILE")
    if args.max_new_tokens < 1 or args.max_backtracks < 0:
        p.error("--max-new-tokens must be at least 1 and --max-backtracks at least 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The ML libraries load here, after the arguments were checked.
    from halluc.checkpoint import load_trained
    from halluc.generate import Sampling, generate_text
    from halluc.tokens import BACKTRACK_TOKEN

    model, tokenizer = load_trained(args.model, base=args.base)
    gens = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, semantics=args.semantics,
                         sampling=Sampling(args.temperature, args.top_p, args.seed),
                         guards=LoopGuards(max_backtracks=args.max_backtracks))
    results = []
    for prompt, g in zip(args.prompt, gens):
        trace = tokenizer.decode(g.trace, skip_special_tokens=False).replace(BACKTRACK_TOKEN, SHOWN_BT)
        results.append({"prompt": prompt, "visible": g.text, "trace": trace, "backtracks": g.n_backtracks,
                        "erased": g.n_erased, "semantics": g.semantics, "stop": g.stop})
        print(f"\nprompt:    {prompt}\nvisible:   {g.text}\ntrace:     {trace}\n"
              f"           {g.n_backtracks} BT, {g.n_erased} erased, semantics {g.semantics}, stop {g.stop}")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
