"""Evaluation: generate, honour the backtracks, verify every step.

Until KV-cache rewinding lands, generation is plain HF `generate()` (the twin of `causal`
training: everything stays in the cache) and `apply_backtrack` turns the raw trace into the
visible output. The BT id comes from `backtrack_id` (looked up by name), never from encode().
"""
from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm

from halluc.example import apply_backtrack
from halluc.tasks import Problem
from halluc.tokens import backtrack_id, has_backtrack


@torch.no_grad()
def generate_traces(model, tokenizer, prompts: list[str], max_new_tokens: int = 160,
                    batch_size: int = 64, desc: str = "generating") -> list[list[int]]:
    """Greedy raw traces (BTs included, stopped at EOS), batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    traces: list[list[int]] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                traces.append(_until_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id))
    finally:
        tokenizer.padding_side = side
    return traces


def _until_eos(row: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for t in row:
        if t in (eos, pad):
            break
        out.append(t)
    return out


def evaluate_problems(model, tokenizer, problems: list[Problem], task, max_new_tokens: int = 160,
                      batch_size: int = 64, desc: str = "eval") -> dict:
    """Answer accuracy, full-solution accuracy, step validity and backtrack counts."""
    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    traces = generate_traces(model, tokenizer, [p.prompt for p in problems], max_new_tokens,
                             batch_size, desc)
    answer = full = steps_ok = steps = bts = erased = 0
    first_wrong: Counter = Counter()
    samples = []
    for problem, trace in zip(problems, traces):
        visible = apply_backtrack(trace, bt) if bt is not None else trace
        text = tokenizer.decode(visible, skip_special_tokens=True)
        report = task.verify_steps(problem, task.split_steps(text))
        n_bt = trace.count(bt) if bt is not None else 0
        answer += report.answer_correct
        full += report.all_ok and len(report.kinds) == len(problem.steps)
        steps += len(report.kinds)
        steps_ok += report.kinds.count("ok")
        bts += n_bt
        erased += len(trace) - n_bt - len(visible)
        if report.first_wrong is not None:
            first_wrong[report.kinds[report.first_wrong]] += 1
        if len(samples) < 5:
            samples.append({"prompt": problem.prompt, "trace": tokenizer.decode(trace),
                            "visible": text, "kinds": report.kinds})
    n = max(len(problems), 1)
    return {"n": len(problems), "answer_acc": answer / n, "full_solution_acc": full / n,
            "step_validity": steps_ok / max(steps, 1), "bt_per_problem": bts / n,
            "erased_per_problem": erased / n, "first_error_kinds": dict(first_wrong.most_common()),
            "samples": samples}
