"""Benchmark of MCTS data generation (issue 13): search throughput and what it finds, one table.

    python benchmarks/mcts.py --model runs/cache/sft-XXXX/checkpoint     # the lab's masked SFT model
    python benchmarks/mcts.py --model DIR --problems 100 --budgets 8 16 32 64

Side by side in one process, on the same SFT-split problems of the default lab (seed 0), with the
task's step verifier as the value (recipes/mcts.py value=oracle):
- sampling:  N independent solutions per problem at temperature 1 (N chosen so that it generates
             about the tokens of the largest search), the baseline every ratio is against;
- MCTS:      halluc.sources.mcts.search at each node budget (K=4 samples per expansion, PUCT c=1.5).
Columns: wall seconds; nodes per second (sampling: solutions per second); generated tokens; verified
solutions (every step right, right answer; sampling: distinct ones); generated tokens per verified
solution, and its ratio to sampling's; the fraction of problems with a verified solution; the same
among the problems the policy fails greedily. Medians of --repeats for the times; the counts are
deterministic (seeded).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from halluc.inference.generate import LoopGuards, Sampling, generate, generate_text
from halluc.pipeline.lab import LabConfig, lab_splits
from halluc.sources.mcts import SearchConfig, search
from halluc.core.model import load_causal_lm
from halluc.tasks import arith
from halluc.core.tokens import load_tokenizer
from halluc.inference.verifiers import OracleVerifier


def verified(problem, text: str) -> bool:
    report = arith.verify_steps(problem, arith.split_steps(text))
    return bool(report.all_ok and report.answer_correct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a lab policy folder (recipes/masked_sft.py's checkpoint)")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()
    problems = lab_splits(LabConfig(), 0)["sft"][:args.problems]
    oracle = OracleVerifier(arith, problems, tok)
    greedy = generate_text(model, tok, [p.prompt for p in problems], max_new_tokens=192, desc="greedy")
    failed = [i for i, (g, p) in enumerate(zip(greedy, problems)) if arith.extract_answer(g.text) != p.answer]

    rows, times = {}, {}
    for r in range(args.repeats):
        for budget in args.budgets:
            t0 = time.perf_counter()
            trees = search(model, tok, arith, problems, SearchConfig(nodes=budget, k=4, seed=0), oracle, progress=False)
            times.setdefault(f"MCTS, {budget} nodes", []).append(time.perf_counter() - t0)
            solved = [any(n.verified for n in t.nodes) for t in trees]
            rows[f"MCTS, {budget} nodes"] = dict(units=sum(len(t.nodes) for t in trees),
                                                  tokens=sum(t.generated for t in trees),
                                                  verified=sum(n.verified for t in trees for n in t.nodes),
                                                  solved=solved)
        biggest = rows[f"MCTS, {max(args.budgets)} nodes"]
        n = max(1, round(biggest["tokens"] / max(1, sum(len(g.visible) + 1 for g in greedy))))
        prompts = [tok(p.prompt)["input_ids"] for p in problems]
        t0 = time.perf_counter()
        gens = generate(model, [q for q in prompts for _ in range(n)], max_new_tokens=192, backtrack_id=None,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, sampling=Sampling(1.0, 1.0, 0),
                        guards=LoopGuards(max_backtracks=0))
        times.setdefault(f"sampling, N={n}", []).append(time.perf_counter() - t0)
        distinct = [set() for _ in problems]
        for j, g in enumerate(gens):
            text = tok.decode(g.visible, skip_special_tokens=True)
            if g.stop == "eos" and verified(problems[j // n], text):
                distinct[j // n].add(text)
        rows[f"sampling, N={n}"] = dict(units=len(gens), tokens=sum(len(g.trace) + (g.stop == "eos") for g in gens),
                                       verified=sum(len(d) for d in distinct), solved=[bool(d) for d in distinct])

    base = next(k for k in rows if k.startswith("sampling"))
    base_tpv = rows[base]["tokens"] / max(1, rows[base]["verified"])
    print(f"# benchmarks/mcts.py: {args.problems} lab problems (default lab, seed 0), {len(failed)} failed greedily; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| method | s | units/s | generated tokens | verified solutions | tokens / verified | vs sampling "
          "| solved | greedy's failures solved |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in [base] + [k for k in rows if k != base]:
        row, s = rows[name], statistics.median(times[name])
        tpv = row["tokens"] / row["verified"] if row["verified"] else float("inf")
        fail_solved = sum(row["solved"][i] for i in failed) / len(failed) if failed else float("nan")
        print(f"| {name} | {s:.1f} | {row['units'] / s:,.0f} | {row['tokens']:,} | {row['verified']:,} | {tpv:.0f} "
              f"| {tpv / base_tpv:.2f}x | {100 * sum(row['solved']) / len(problems):.0f}% | {100 * fail_solved:.0f}% |")


if __name__ == "__main__":
    main()
