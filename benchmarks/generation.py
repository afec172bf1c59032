"""Benchmark of backtracking generation; prints one table of ratios vs HF generate().

    python benchmarks/generation.py            # --quick (default): 256 new tokens (128 for large x 16), ~2.5 min
    python benchmarks/generation.py --full     # adds 1024 new tokens and more rows (~30 min on 2 CPU cores)
    python benchmarks/generation.py --only large:1:1024   # one config (model:batch:new tokens)

Side by side in one process, on random-weight Llamas (tiny: hidden 128, 2 layers, the lab
model's shape; large: hidden 512, 8 layers, where compute dominates), vocab 400, fp32 sdpa:
- hf:       HF `generate()`, greedy, no BTs (the reference; ratios are vs this row)
- rewind:   halluc.inference.generate, rewind semantics, BT banned (no BTs)
- rewind R: forced BT rate R (after each normal token, with prob R the next is a BT; seeded)
- naive R:  the same forced BTs, but after every BT the visible sequence is re-encoded from
            scratch (one full forward, no cache reuse). Batch 1 only: a batched naive baseline
            would re-encode every row whenever any row backtracks.
Every method is timed in turn within each repeat (the machine is shared and noisy), the
median is reported. token-forwards = tokens pushed through the model, prompts included.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


from halluc.inference.generate import Forcing, LoopGuards, generate

VOCAB, BT, PAD, PROMPT_LEN = 400, 399, 0, 32
MODELS = {"tiny": (128, 2, 4), "large": (512, 8, 8)}  # hidden, layers, heads


@dataclass
class Result:
    wall: float
    emitted: int
    forwards: int


def build_model(name: str) -> LlamaForCausalLM:
    hidden, layers, heads = MODELS[name]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         pad_token_id=PAD, eos_token_id=None, bos_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def make_prompts(batch: int) -> list[list[int]]:
    rng = random.Random(batch)  # lengths vary in a batch, so rows are left padded
    return [[rng.randrange(1, BT) for _ in range(PROMPT_LEN - (r % 5) * 2)] for r in range(batch)]


@torch.no_grad()
def run_hf(model, prompts, new_tokens: int) -> Result:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    t = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=PAD)
    wall = time.perf_counter() - t
    return Result(wall, len(prompts) * new_tokens, sum(len(p) + new_tokens - 1 for p in prompts))


def run_rewind(model, prompts, new_tokens: int, rate: float) -> Result:
    t = time.perf_counter()
    gens = generate(model, prompts, max_new_tokens=new_tokens, backtrack_id=BT, eos_token_id=None,
                    pad_token_id=PAD, semantics="rewind", guards=LoopGuards(max_backtracks=0),
                    forcing=Forcing(backtrack_rate=rate, seed=1))
    wall = time.perf_counter() - t
    return Result(wall, sum(len(g.trace) for g in gens), sum(g.token_forwards for g in gens))


@torch.no_grad()
def run_naive(model, prompts, new_tokens: int, rate: float) -> Result:
    """Batch 1: cache decoding, but every BT rebuilds the cache from prompt + visible."""
    (prompt,) = prompts
    force = random.Random(1)  # the same draws as generate(forcing=Forcing(seed=1)): same BT positions
    t = time.perf_counter()
    trace, visible = [], []
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits
    forwards = len(prompt)
    for step in range(new_tokens):
        logits[0, -1, BT] = float("-inf")  # as LoopGuards(max_backtracks=0): only forced BTs
        token = int(logits[0, -1].argmax())
        if trace and trace[-1] != BT and force.random() < rate:
            token = BT
        trace.append(token)
        if step == new_tokens - 1:
            break
        if token == BT:
            if visible:
                visible.pop()
            ids = prompt + visible  # re-encode from scratch
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
            forwards += len(ids)
        else:
            visible.append(token)
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            forwards += 1
    return Result(time.perf_counter() - t, len(trace), forwards)


def configs(full: bool):
    """(model, batch, new tokens, BT rates, naive rates)."""
    if not full:
        return [("tiny", 1, 256, (0.05, 0.2), (0.05, 0.2)), ("tiny", 16, 256, (0.05, 0.2), ()),
                ("large", 1, 256, (0.2,), (0.2,)), ("large", 16, 128, (0.2,), ())]
    out = []
    for name in MODELS:
        for batch in (1, 16):
            for new in (256, 1024):
                out.append((name, batch, new, (0.05, 0.2), (0.05, 0.2) if batch == 1 else ()))
    return out


def bench(model, batch: int, new_tokens: int, rates, naive_rates, repeats: int) -> dict[str, Result]:
    prompts = make_prompts(batch)
    methods = {"hf": lambda: run_hf(model, prompts, new_tokens),
               "rewind": lambda: run_rewind(model, prompts, new_tokens, 0.0)}
    for r in rates:
        methods[f"rewind {r:.0%}"] = lambda r=r: run_rewind(model, prompts, new_tokens, r)
    for r in naive_rates:
        methods[f"naive {r:.0%}"] = lambda r=r: run_naive(model, prompts, new_tokens, r)
    run_rewind(model, prompts, 8, 0.0)  # warm up both paths
    run_hf(model, prompts, 8)
    results: dict[str, list[Result]] = {m: [] for m in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            results[name].append(fn())
    return {m: Result(statistics.median(r.wall for r in rs), rs[0].emitted, rs[0].forwards)
            for m, rs in results.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the default: 256 new tokens (128 for large x 16), fewer configs")
    mode.add_argument("--full", action="store_true", help="tiny + large, batch 1 + 16, 256 + 1024 new tokens")
    p.add_argument("--only", action="append", default=[], metavar="MODEL:BATCH:NEW",
                   help="run just these configs (e.g. large:1:1024, with both BT rates)")
    p.add_argument("--repeats", type=int, default=None, help="default: 3 (tiny), 1 (large)")
    args = p.parse_args(argv)
    todo = configs(args.full)
    if args.only:
        wanted = [tuple(c.split(":")) for c in args.only]
        todo = [(m, int(b), int(n), (0.05, 0.2), (0.05, 0.2) if int(b) == 1 else ()) for m, b, n in wanted]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), CPU fp32 sdpa, greedy")
    rows = ["| model | batch | new | method | wall s | tokens/s | token-forwards | fwd / emitted | wall vs hf |",
            "|---|---|---|---|---|---|---|---|---|"]
    models = {}
    for name, batch, new, rates, naive_rates in todo:
        model = models.setdefault(name, build_model(name))
        repeats = args.repeats or (3 if name == "tiny" else 1)
        t0 = time.perf_counter()
        res = bench(model, batch, new, rates, naive_rates, repeats)
        prompt_total = sum(map(len, make_prompts(batch)))
        for method, r in res.items():
            # forwards per emitted token, counting the prefill once (it produces the first token)
            per_emitted = (r.forwards - prompt_total + batch) / r.emitted
            rows.append(f"| {name} | {batch} | {new} | {method} | {r.wall:.2f} | {r.emitted / r.wall:,.0f} | "
                        f"{r.forwards:,} | {per_emitted:.2f} | {r.wall / res['hf'].wall:.2f}x |")
        print(f"  {name} batch {batch} x {new}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
