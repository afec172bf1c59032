"""Benchmark of guided decoding (issue 12): throughput relative to plain decoding, one table.

    python benchmarks/guided.py                  # tiny (the lab model's shape) and large, batch 16, ~2 min
    python benchmarks/guided.py --models tiny --batch 64 --repeats 5

Side by side in one process, on random-weight Llamas (vocab 400, fp32 sdpa on CPU, bf16 on a GPU),
every method timed in turn within each repeat (the machines are noisy), medians reported:
- plain:        halluc.inference.generate, rewind semantics, no verifier (the reference; ratios are vs this)
- head, idle:   the policy's verifier head scores every step end, never below threshold
                (the cost of asking: one dot product per row per step end)
- PRM, idle:    a PRM of the policy's shape reads the whole visible text at every step end, never
                below threshold (the cost of asking a separate model)
- PRM, acting:  the same PRM with threshold 0.5 on random weights: about half the step ends erase
                their step (budget 4), so BT runs and rewrites cost tokens too
Steps end at a fixed set of 40 token ids (~1 in 10 tokens), as a separator would.
tokens/s counts every generated token, BTs included; `visible/s` only what is left.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

from halluc.inference.generate import Guide, Guided, LoopGuards, generate
from halluc.objectives.verifier_head import attach_head
from halluc.inference.verifiers import HeadVerifier, PRMVerifier

VOCAB, BT, PAD, PROMPT_LEN = 400, 399, 0, 32
MODELS = {"tiny": (128, 2, 4), "large": (512, 8, 8)}  # hidden, layers, heads
STEP_ENDS = frozenset(range(300, 340))


def config(name: str) -> LlamaConfig:
    hidden, layers, heads = MODELS[name]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       pad_token_id=PAD, eos_token_id=None, bos_token_id=None, num_labels=2,
                       attn_implementation="sdpa")


class PRMTokenizer:
    """What PRMVerifier needs from a tokenizer when policy and PRM share token ids."""

    pad_token_id = PAD


def run(model, prompts, new_tokens, verifier, guide) -> tuple[float, int, int]:
    start = time.perf_counter()
    gens = generate(model, prompts, max_new_tokens=new_tokens, backtrack_id=BT, eos_token_id=None, pad_token_id=PAD,
                    semantics="rewind", guards=LoopGuards(max_backtracks=0),
                    guided=None if verifier is None else Guided(verifier, STEP_ENDS, guide))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, sum(len(g.trace) for g in gens), sum(len(g.visible) for g in gens)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "large"], choices=list(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# benchmarks/guided.py on {where}, torch {torch.__version__}, {dtype}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print("| model | method | s | tokens/s | visible/s | verifier-triggered runs | vs plain (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        policy = LlamaForCausalLM(config(name)).to(device, dtype).eval()
        attach_head(policy)  # zero-initialised: P(right) = 0.5 everywhere
        prm = LlamaForTokenClassification(config(name)).to(device, dtype).eval()
        rng = random.Random(0)
        prompts = [[rng.randrange(1, 300) for _ in range(PROMPT_LEN)] for _ in range(args.batch)]
        prm_verifier = PRMVerifier(prm, PRMTokenizer())
        methods = {"plain": (None, Guide()),
                   "head, idle": (HeadVerifier(policy), Guide(threshold=0.0)),
                   "PRM, idle": (prm_verifier, Guide(threshold=0.0)),
                   "PRM, acting": (prm_verifier, Guide(threshold=0.5, budget=4))}
        times: dict[str, list[float]] = {m: [] for m in methods}
        sizes: dict[str, tuple[int, int]] = {}
        runs: dict[str, int] = {}
        run(policy, prompts, 8, None, Guide())  # warm-up
        for _ in range(args.repeats):
            for label, (verifier, guide) in methods.items():
                wall, made, visible = run(policy, prompts, args.new_tokens, verifier, guide)
                times[label].append(wall)
                sizes[label] = (made, visible)
        with torch.no_grad():  # how often each verifier erased a step, once
            for label, (verifier, guide) in methods.items():
                if verifier is not None:
                    gens = generate(policy, prompts, max_new_tokens=args.new_tokens, backtrack_id=BT, eos_token_id=None,
                                    pad_token_id=PAD, semantics="rewind", guards=LoopGuards(max_backtracks=0),
                                    guided=Guided(verifier, STEP_ENDS, guide))
                    runs[label] = sum(g.n_guided for g in gens)
        base = statistics.median(times["plain"])
        for label in methods:
            t = statistics.median(times[label])
            made, visible = sizes[label]
            print(f"| {name} | {label} | {t:.2f} | {made / t:,.0f} | {visible / t:,.0f} | {runs.get(label, 0)} | "
                  f"{t / base:.2f}x |")


if __name__ == "__main__":
    main()
