"""Throughput of a self-generated-error round (technique 5): sampling, judging, corrections.

    python benchmarks/own_errors.py                      # the lab base (cached; trained on first use, ~4 min)
    python benchmarks/own_errors.py --problems 1000 --k 4 --batch-sizes 64 256

For the lab base at K samples per problem: problems/s for sampling at each batch size (side by side
in one process, the first batch size the baseline of the ratio column), for judging (locating the
first wrong step in every sample) and for corrections (the model's own continuations, then the
reference). Numbers: docs/self_correct.md.
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", type=int, default=1000)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--cache-dir", default="runs/cache")
    args = p.parse_args(argv)

    from halluc.core.config import Stage
    from halluc.inference.generate import Sampling
    from halluc.pipeline.lab import LabConfig, ModelConfig, lab_splits
    from halluc.sources.own_errors import RoundStats, corrections, locate, sample
    from halluc.pipeline.stages import RunSettings, lab_base_model
    from halluc.tasks import arith
    from halluc.core.tokens import add_backtrack_token

    lab = LabConfig()
    splits = lab_splits(lab, 0)
    model, tok, _ = lab_base_model(lab, ModelConfig(), Stage(steps=1800, batch_size=32, lr=3e-3), splits["train"],
                                   args.cache_dir, RunSettings())
    add_backtrack_token(tok, model)
    model.eval()
    problems = splits["sft"][:args.problems]
    sampling = Sampling(0.8, 0.95, 0)
    print(f"torch threads {torch.get_num_threads()}, {args.problems} problems x K={args.k}")
    rows, samples = [], None
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        samples = sample(model, tok, problems, args.k, sampling, 192, batch_size=bs)
        rows.append((f"sampling, batch {bs}", time.perf_counter() - t0))
    stats = RoundStats()
    t0 = time.perf_counter()
    errors = [e for i, ids, g in samples if (e := locate(arith, problems[i], tok, i, ids, g, stats)) is not None]
    rows.append(("judging", time.perf_counter() - t0))
    t0 = time.perf_counter()
    corrections(model, tok, arith, problems, errors, 4, sampling, 192, stats, batch_size=args.batch_sizes[-1])
    rows.append((f"corrections ({len(errors)} errors, up to 4 tries)", time.perf_counter() - t0))

    base = rows[0][1]
    print(f"\n| step | seconds | problems/s | time vs {rows[0][0]} |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {args.problems / seconds:.0f} | {seconds / base:.2f}x |")
    print(f"\nsamples {stats.samples}, wrong {stats.wrong}, located {stats.located}, corrected by the model "
          f"{stats.corrected_by_model}, by the reference {stats.corrected_by_reference}")


if __name__ == "__main__":
    main()
