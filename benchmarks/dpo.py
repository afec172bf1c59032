"""DPO training throughput: halluc's prompt-once pairs (halluc.objectives.dpo) against TRL's DPOTrainer.

    python benchmarks/dpo.py                       # CPU: a small Llama, fp32, 2 repeats side by side
    python benchmarks/dpo.py --hidden 768 --layers 12 --vocab 32000   # GPU: ~135M params, bf16, flex

The same text pairs (long shared prompts: a few arith problems as context, then a question; short
chosen / rejected completions), the same model and reference (live, sigmoid loss), the same pairs
per optimizer step. TRL pads prompt + chosen and prompt + rejected as two rows each; halluc lays a
pair out as the prompt once and both branches (one pair per row, padded to the batch's longest),
or packs pairs padding-free (`--pack` tokens per row, about the same pairs per step). Each trainer
runs `--steps` steps after `--warmup`; the table gives the median seconds per step, pairs/s, tokens
per step (TRL's count of prompt + completion tokens, the same work for both) per second, the ratio
against TRL, and on a GPU the peak memory. Numbers: docs/dpo.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def text_pairs(n: int, seed: int, context: int) -> list[dict]:
    """Pairs whose prompt is `context` solved arith problems then a question: long and shared."""
    from halluc.tasks import arith

    problems = arith.make_split(n * (context + 1), (2, 5), seed=seed)
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        shots = problems[i * (context + 1): i * (context + 1) + rng.randint(context // 2, context)]
        q = problems[i * (context + 1) + context]
        wrong = arith.corrupt_step(q, 0, rng) or q.steps[0]
        prompt = "".join(s.prompt + s.solution + "\n" for s in shots) + q.prompt
        pairs.append({"prompt": prompt, "chosen": q.solution, "rejected": wrong})
    return pairs


def run_trl(model, ref, tok, pairs, args, out: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    cfg = DPOConfig(output_dir=out, beta=0.1, learning_rate=1e-5, max_steps=args.warmup + args.steps,
                    per_device_train_batch_size=args.batch, bf16=on_gpu, use_cpu=not on_gpu, report_to="none",
                    logging_steps=1000, save_strategy="no", max_length=None, gradient_checkpointing=False,
                    dataloader_drop_last=True, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(pairs))
    return _timed(trainer, args.warmup)


def run_ours(model, ref, tok, pairs, args, out: str, pack: int):
    from halluc.objectives.dpo import PairCollator, PreferenceObjective
    from halluc.structure.pairs import load_pairs, pair_rows
    from halluc.core.tokens import backtrack_id
    from halluc.training.train import make_trainer, training_args

    path = Path(out) / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rows = pair_rows(load_pairs(path, tok, backtrack_id(tok)), max_len=100_000, pack_len=pack)
    per_row = len(pairs) / len(rows)
    batch = max(1, round(args.batch / per_row))
    targs = training_args(out, steps=args.warmup + args.steps, batch_size=batch, lr=1e-5, log_every=1000,
                          drop_last=True, disable_tqdm=True, logging_steps=10_000)
    trainer = make_trainer(model, targs, rows, tb_dir=str(Path(out) / "tb"), packed=True,
                           objective=PreferenceObjective("sigmoid", 0.1, reference=ref),
                           collator=PairCollator())
    seconds, memory = _timed(trainer, args.warmup)
    return seconds * args.batch / (batch * per_row), memory  # per step of args.batch pairs


def _timed(trainer, warmup: int):
    """(median seconds per step after `warmup` steps, peak GPU memory in GiB or None)."""
    times = StepTimes()
    trainer.add_callback(times)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start] + times.times, times.times)]
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return statistics.median(steps[warmup:]), memory


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--context", type=int, default=8, help="solved problems in front of each question (at most)")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=0, help="model vocabulary (0: the tokenizer's)")
    p.add_argument("--pack", type=int, default=0, help="halluc packed rows of this many tokens (0: about --batch pairs)")
    args = p.parse_args(argv)

    from halluc.core.model import init_backtrack_embedding, tiny_llama
    from halluc.tasks import arith
    from halluc.core.tokens import add_backtrack_token, backtrack_id, train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([q.prompt + q.solution for q in arith.make_split(2000, (2, 5), seed=1)])
    add_backtrack_token(tok)
    pairs = text_pairs(args.pairs, 0, args.context)
    n_tokens = [len(tok(x["prompt"])["input_ids"]) for x in pairs]
    n_comp = [len(tok(x[k], add_special_tokens=False)["input_ids"]) + 1 for x in pairs for k in ("chosen", "rejected")]
    trl_tokens = sum(2 * a for a in n_tokens) + sum(n_comp)  # prompt twice, each completion once
    ours_tokens = sum(n_tokens) + sum(n_comp)
    mean_pair = ours_tokens / len(pairs)
    pack = args.pack or int(mean_pair * args.batch * 1.1)
    base = tiny_llama(max(args.vocab, len(tok)), hidden=args.hidden, layers=args.layers, heads=max(2, args.hidden // 64),
                      max_positions=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    init_backtrack_embedding(base, tok, backtrack_id(tok))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# benchmarks/dpo.py on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}: {base.num_parameters() / 1e6:.1f}M params, "
          f"{len(pairs)} pairs, mean prompt {statistics.mean(n_tokens):.0f} tokens, mean completion "
          f"{statistics.mean(n_comp):.1f}; {args.batch} pairs/step; halluc packs {pack} tokens/row")
    results: dict[str, list] = {"TRL DPOTrainer (padded, prompt twice)": [], "halluc, one pair per row": [],
                                f"halluc, packed ({pack} tokens/row)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # side by side, alternating: this machine's noise hits every arm
            for name in results:
                model, ref = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device)
                out = f"{tmp}/{r}-{len(results[name])}-{name[:5]}"
                if name.startswith("TRL"):
                    results[name].append(run_trl(model, ref, tok, pairs, args, out))
                else:
                    results[name].append(run_ours(model, ref, tok, pairs, args, out,
                                                  pack if "packed" in name else 0))
                print(f"  repeat {r + 1}: {name}: {results[name][-1][0]:.3f} s/step", flush=True)
    trl = statistics.median(s for s, _ in results["TRL DPOTrainer (padded, prompt twice)"])
    tokens_per_step = trl_tokens / len(pairs) * args.batch
    print("\n| trainer | s / step | pairs / s | tokens / s | vs TRL | peak GPU memory |\n|---|---|---|---|---|---|")
    for name, runs in results.items():
        s = statistics.median(x for x, _ in runs)
        mem = max((m for _, m in runs if m is not None), default=None)
        print(f"| {name} | {s:.3f} | {args.batch / s:.1f} | {tokens_per_step / s:,.0f} | {trl / s:.2f}x | "
              f"{f'{mem:.2f} GiB' if mem is not None else 'n/a (CPU)'} |")
    print(f"\ntokens per pair: TRL {trl_tokens / len(pairs):.0f} (prompt twice), halluc {mean_pair:.0f} (prompt once)")


if __name__ == "__main__":
    main()
