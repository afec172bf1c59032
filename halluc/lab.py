"""The embedded default lab: splits, the tiny model's shape, and the before/after table."""
from __future__ import annotations

from dataclasses import dataclass

from halluc.tasks import Problem
from halluc.tasks import arith


@dataclass
class LabConfig:
    task: str = "arith"
    train_size: int = 20000     # clean problems for the base model
    sft_size: int = 10000       # problems for backtrack SFT (errors inserted)
    test_size: int = 200        # per test split
    prime: int = 7
    train_ops_min: int = 2
    train_ops_max: int = 4
    ood_ops_min: int = 6
    ood_ops_max: int = 8
    train_file: str | None = None   # gsm8k / jsonl tasks: training problems (jsonl)
    test_file: str | None = None    # gsm8k / jsonl tasks: test problems (jsonl)


@dataclass
class ModelConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 384
    init_range: float = 0.06


def lab_splits(cfg: LabConfig, seed: int = 0) -> dict[str, list[Problem]]:
    """train / sft / test_id / test_ood, with every test prompt removed from train and sft.

    For gsm8k / jsonl the problems come from `train_file` (train and sft) and `test_file`
    (test_id; there is no out-of-distribution split).
    """
    if cfg.task != "arith":
        return file_splits(cfg)
    a = arith.ArithConfig(prime=cfg.prime, train_ops=(cfg.train_ops_min, cfg.train_ops_max),
                          ood_ops=(cfg.ood_ops_min, cfg.ood_ops_max))
    test_id = arith.make_split(cfg.test_size, a.train_ops, seed * 10 + 1, a)
    test_ood = arith.make_split(cfg.test_size, a.ood_ops, seed * 10 + 2, a)
    held_out = {p.prompt for p in test_id + test_ood}
    train = [p for p in arith.make_split(cfg.train_size, a.train_ops, seed * 10 + 3, a) if p.prompt not in held_out]
    sft = [p for p in arith.make_split(cfg.sft_size, a.train_ops, seed * 10 + 4, a) if p.prompt not in held_out]
    return {"train": train, "sft": sft, "test_id": test_id, "test_ood": test_ood}


def file_splits(cfg: LabConfig) -> dict[str, list[Problem]]:
    from halluc.tasks import get_task

    if not cfg.train_file or not cfg.test_file:
        raise SystemExit(f"task {cfg.task} needs lab.train_file and lab.test_file (jsonl)")
    task = get_task(cfg.task)
    test = task.read_jsonl(cfg.test_file, limit=cfg.test_size)
    held_out = {p.prompt for p in test}
    train = [p for p in task.read_jsonl(cfg.train_file, limit=max(cfg.train_size, cfg.sft_size))
             if p.prompt not in held_out]
    return {"train": train[:cfg.train_size], "sft": train[:cfg.sft_size], "test_id": test}


def eval_table(results: dict[str, dict[str, dict]]) -> str:
    """The evaluation markdown table, one row per (model, split)."""
    from halluc.evaluate import markdown_table

    return markdown_table({f"{model} / {split}": m for model, splits in results.items()
                           for split, m in splits.items()})
