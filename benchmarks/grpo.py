"""GRPO step time: halluc's recipe path (halluc/sources/rollouts.py) against TRL's GRPOTrainer.

    python benchmarks/grpo.py                       # the tiny lab model shape, 4 prompts x G=8, 48 new tokens
    python benchmarks/grpo.py --group 16 --max-new-tokens 96 --steps 6
    python benchmarks/grpo.py --hidden 2048 --layers 16 --heads 32     # GPU (bf16): a ~1B-shaped model

The same freshly initialised Llama (the lab's tiny shape, random weights: both sample about
`--max-new-tokens` tokens per completion), the same arith prompts, the same reward (+1 / -1 for the final
answer of the visible text), the same group size, prompts per step, KL weight (0.04, a live reference)
and optimizer settings. TRL samples with `model.generate` and scores the completions padded; halluc
samples with its batched generator and scores them laid out one per row on the CPU's tree backend.
Each trainer runs `--warmup` + `--steps` steps; the table gives the median seconds per step,
completions per second and the ratio against TRL. Numbers: docs/grpo.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are queued, not done, when the callback runs
        self.times.append(time.perf_counter())


def per_step(times: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(times, times[1:])][max(warmup - 1, 0):]
    return statistics.median(gaps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=0, help="model width (0: the lab's tiny shape)")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    args = p.parse_args(argv)

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from halluc.core.config import Stage
    from halluc.core.model import load_causal_lm, tiny_llama
    from halluc.core.tokens import add_backtrack_token
    from halluc.objectives.dpo import disable_dropout
    from halluc.pipeline.lab import LabConfig, ModelConfig, lab_splits, lab_tokenizer
    from halluc.pipeline.stages import RunSettings, train_stage
    from halluc.sources.rollouts import GroupSampling, GRPOObjective, RewardSettings
    from halluc.tasks import arith

    splits = lab_splits(LabConfig(train_size=2000, sft_size=400, test_size=8), 0)
    problems = splits["sft"]
    tok = lab_tokenizer(splits["train"], ModelConfig().vocab_size)
    add_backtrack_token(tok)
    by_prompt = {p.prompt: p for p in problems}
    steps = args.warmup + args.steps
    shape = ModelConfig()
    shape = ModelConfig(hidden=args.hidden or shape.hidden, layers=args.layers or shape.layers,
                        heads=args.heads or shape.heads)
    cuda = torch.cuda.is_available()

    def fresh():
        torch.manual_seed(0)
        m = tiny_llama(len(tok), shape.hidden, shape.layers, shape.heads, init_range=shape.init_range,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        disable_dropout(m)
        return m

    rows = []
    # TRL
    def reward(prompts, completions, **kwargs):
        return [1.0 if arith.verify_steps(by_prompt[p], arith.split_steps(c)).answer_correct else -1.0
                for p, c in zip(prompts, completions)]

    start = tempfile.TemporaryDirectory()  # TRL loads the policy and its reference from a folder
    fresh().save_pretrained(start.name)
    tok.save_pretrained(start.name)
    with tempfile.TemporaryDirectory() as out:
        timer = StepTimes()
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.group,
                            num_generations=args.group, max_completion_length=args.max_new_tokens, max_steps=steps,
                            learning_rate=2e-5, beta=0.04, logging_steps=steps, report_to="none", use_cpu=not cuda, bf16=cuda,
                            save_strategy="no", temperature=1.0, seed=0)
        data = Dataset.from_list([{"prompt": p.prompt} for p in problems])
        trainer = GRPOTrainer(model=start.name, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[timer])
        trainer.train()
        rows.append(("TRL GRPOTrainer", per_step(timer.times, args.warmup)))
    # halluc
    with tempfile.TemporaryDirectory() as out:
        timer = StepTimes()
        model, reference = load_causal_lm(start.name), load_causal_lm(start.name)
        disable_dropout(model), disable_dropout(reference)
        prompts = [tok(p.prompt)["input_ids"] for p in problems]
        objective = GRPOObjective(problems, arith, tok, prompts, semantics="keep", beta=0.04, reference=reference,
                                  sampling=GroupSampling(group=args.group, max_new_tokens=args.max_new_tokens),
                                  rewards=RewardSettings(bt_term=False))
        train_stage(model, [{"problem": i} for i in range(len(problems))],
                    Stage(steps=steps, batch_size=args.prompts, lr=2e-5), out, RunSettings(),
                    objective=objective, tokenizer=tok, callbacks=[timer])
        rows.append(("halluc recipes/grpo.py path", per_step(timer.times, args.warmup)))

    trl = rows[0][1]
    n = args.prompts * args.group
    where = torch.cuda.get_device_name() + ", bf16" if cuda else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"\n{where}; hidden {shape.hidden} x {shape.layers} layers; {args.prompts} prompts x G={args.group}, "
          f"{args.max_new_tokens} new tokens, median of {args.steps} steps after {args.warmup}")
    print("\n| trainer | s / step | completions / s | time vs TRL |\n|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {n / s:.1f} | {s / trl:.2f}x |")


if __name__ == "__main__":
    main()
