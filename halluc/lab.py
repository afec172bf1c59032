"""The embedded default lab: splits, the tiny model's shape, and the before/after table."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

from halluc.config import Fraction, NonNegativeFloat, PositiveInt, Range
from halluc.tasks import Problem
from halluc.tasks import arith


@dataclass
class LabConfig:
    task: Literal["arith", "gsm8k", "jsonl"] = "arith"
    train_size: PositiveInt = 20000     # clean problems for the base model
    sft_size: PositiveInt = 10000       # problems for backtrack SFT (errors inserted)
    test_size: PositiveInt = 1000       # per test split
    prime: Annotated[int, Range(2)] = 7
    train_ops_min: PositiveInt = 2
    train_ops_max: PositiveInt = 4
    ood_ops_min: PositiveInt = 6
    ood_ops_max: PositiveInt = 8
    # arith: the order of the definitions in the prompts (tasks/arith.py) of the SFT and test
    # problems (`listing`) and of the base's clean training problems (`base_listing`). The
    # "swapped" setting (listing=swapped swap_rate=0.3) gives errors a model can see after the
    # fact: a base that follows the listing names a quantity whose input is not computed yet.
    listing: Literal["dependency", "swapped", "shuffled"] = "dependency"
    swap_rate: Fraction = 0.0           # listing=swapped: chance each adjacent pair is swapped
    base_listing: Literal["dependency", "swapped", "shuffled"] = "dependency"
    train_file: str | None = None       # gsm8k / jsonl tasks: training problems (jsonl)
    test_file: str | None = None        # gsm8k / jsonl tasks: test problems (jsonl)


@dataclass
class ModelConfig:
    hidden: PositiveInt = 128
    layers: PositiveInt = 2
    heads: PositiveInt = 4
    vocab_size: Annotated[int, Range(260)] = 384   # a byte-level BPE needs the 256 bytes + specials
    init_range: NonNegativeFloat = 0.06


def lab_splits(cfg: LabConfig, seed: int = 0) -> dict[str, list[Problem]]:
    """train / sft / test_id / test_ood, with every test problem removed from train and sft.

    arith: `train` (the base's clean data) is listed in `base_listing` order; sft and the tests
    in `listing` order. Problems are drawn independently of the listing, so every listing gives
    the same problems, and held-out problems are removed by identity, not by prompt text.
    For gsm8k / jsonl the problems come from `train_file` (train and sft) and `test_file`
    (test_id; there is no out-of-distribution split).
    """
    if cfg.task != "arith":
        return file_splits(cfg)
    shown = arith.ArithConfig(prime=cfg.prime, train_ops=(cfg.train_ops_min, cfg.train_ops_max),
                              ood_ops=(cfg.ood_ops_min, cfg.ood_ops_max), listing=cfg.listing,
                              swap_rate=cfg.swap_rate)
    base = dataclasses.replace(shown, listing=cfg.base_listing)
    test_id = arith.make_split(cfg.test_size, shown.train_ops, seed * 10 + 1, shown)
    test_ood = arith.make_split(cfg.test_size, shown.ood_ops, seed * 10 + 2, shown)
    held_out = {arith.identity(p) for p in test_id + test_ood}

    def train_split(n: int, split_seed: int, a: arith.ArithConfig) -> list[Problem]:
        return [p for p in arith.make_split(n, a.train_ops, split_seed, a) if arith.identity(p) not in held_out]

    return {"train": train_split(cfg.train_size, seed * 10 + 3, base),
            "sft": train_split(cfg.sft_size, seed * 10 + 4, shown), "test_id": test_id, "test_ood": test_ood}


def base_settings(cfg: LabConfig) -> dict:
    """The lab settings the base model's data depends on (its cache key): not how the SFT and
    test problems are listed, since every listing gives the same problems."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("listing", "swap_rate")}


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
