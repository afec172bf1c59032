"""The embedded default lab: splits, the tiny model's shape, and the before/after table."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Annotated, Literal

from halluc.core.config import Escaped, Fraction, NonNegativeFloat, PositiveInt, Range
from halluc.core.inputs import check_input_file
from halluc.tasks import Problem
from halluc.tasks import arith

log = logging.getLogger(__name__)


@dataclass
class LabConfig:
    task: Literal["arith", "gsm8k", "jsonl"] = "arith"  # arith: the embedded generator; gsm8k / jsonl: files
    train_size: PositiveInt = 20000     # clean problems for the base model
    sft_size: PositiveInt = 10000       # problems for backtrack SFT (errors inserted)
    test_size: PositiveInt = 1000       # per test split
    prime: Annotated[int, Range(2)] = 7  # arith: values are modulo this
    train_ops_min: PositiveInt = 2  # arith: quantities per problem in training and test_id
    train_ops_max: PositiveInt = 4  # (inclusive)
    ood_ops_min: PositiveInt = 6    # arith: quantities per problem in test_ood (never trained)
    ood_ops_max: PositiveInt = 8
    # arith: the order of the definitions in the prompts (tasks/arith.py) of the SFT and test
    # problems (`listing`) and of the base's clean training problems (`base_listing`). The
    # "swapped" setting (listing=swapped swap_rate=0.3) gives errors a model can see after the
    # fact: a base that follows the listing names a quantity whose input is not computed yet.
    listing: Literal["dependency", "swapped", "shuffled"] = "dependency"  # SFT and test problems
    swap_rate: Fraction = 0.0           # listing=swapped: chance each adjacent pair is swapped
    base_listing: Literal["dependency", "swapped", "shuffled"] = "dependency"  # the base's clean problems
    train_file: str | None = None       # gsm8k / jsonl tasks: training problems (jsonl)
    test_file: str | None = None        # gsm8k / jsonl tasks: test problems (jsonl)
    # jsonl task: the fields of your rows (a list-valued response is a list of steps)
    prompt_field: str = "prompt"       # jsonl: the field holding the prompt
    response_field: str = "response"   # jsonl: the reference response (text or a list of steps)
    answer_field: str | None = None     # None: the last step is the answer
    step_separator: Escaped = "\n"     # jsonl: what ends a step (\n, \t read as escapes: step_separator=\n\n)
    prompt_template: str = "{prompt}\n"  # jsonl: the text before the response ({prompt}, any field); verbatim (LaTeX-safe)

    def check(self) -> None:
        files = [k for k in ("train_file", "test_file") if getattr(self, k)]
        if self.task == "arith" and files:
            raise ValueError(f"lab.{files[0]} is read only by lab.task=gsm8k or jsonl; lab.task is arith "
                             "(the embedded generator), so the file would be ignored")
        if self.task != "arith" and not self.test_file:
            raise ValueError(f"lab.task={self.task} needs lab.test_file (a jsonl file) and lab.train_file "
                             "(or a prepared data folder, data=DIR)")
        if self.train_ops_min > self.train_ops_max or self.ood_ops_min > self.ood_ops_max:
            raise ValueError("lab.*_ops_min must not exceed lab.*_ops_max")
        jsonl_fields = {"prompt_field": "prompt", "response_field": "response", "answer_field": None,
                        "step_separator": "\n", "prompt_template": "{prompt}\n"}
        changed = [k for k, v in jsonl_fields.items() if getattr(self, k) != v]
        if changed and self.task != "jsonl":
            raise ValueError(f"lab.{changed[0]} is read only by lab.task=jsonl (lab.task is {self.task})")
        if self.swap_rate and "swapped" not in (self.listing, self.base_listing):
            raise ValueError(f"lab.swap_rate={self.swap_rate} applies only to lab.listing=swapped "
                             "(or lab.base_listing=swapped)")
        for name in files:  # last: the rules above say more about a wrong combination
            check_input_file(getattr(self, name), f"lab.{name}")


@dataclass
class ModelConfig:
    hidden: PositiveInt = 128    # the tiny base Llama: hidden size
    layers: PositiveInt = 2      # decoder layers
    heads: PositiveInt = 4       # attention heads
    vocab_size: Annotated[int, Range(260)] = 384   # a byte-level BPE needs the 256 bytes + specials
    init_range: NonNegativeFloat = 0.06   # 0.02 leaves the loss flat for ~600 steps

    def check(self) -> None:
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"tiny.hidden={self.hidden} must split into tiny.heads={self.heads} heads of an even "
                             f"size (rotary positions), e.g. tiny.hidden={self.heads * max(2, 2 * round(self.hidden / self.heads / 2))}")


@dataclass
class RetryData:
    """Retry pretraining (Physics of LMs 2.2; `base_retry.*`): the lab base trains on its clean problems
    with wrong steps written and erased by BTs, the BT token in its vocabulary from the start."""

    rate: Fraction = 0.0      # each step is first written wrong, then erased, with this chance (0: a clean base)
    kind: Literal["early", "any"] = "early"  # early: a later step not computable yet (P2.2); any: the lab's wrong steps
    masked: bool = False      # P2.2: masking the errors makes no difference in pretraining (within 0.2 points)
    equal_tokens: bool = True  # unpacked: fewer steps, so the base trains on as many tokens as the clean base


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
    test problems are listed, since every listing gives the same problems (the swap rate counts
    when the base's own problems are swapped)."""
    shown_only = {"listing"} | ({"swap_rate"} if cfg.base_listing != "swapped" else set())
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in shown_only}


def file_splits(cfg: LabConfig) -> dict[str, list[Problem]]:
    from halluc.tasks import get_task

    task = get_task(cfg.task)
    fields = {} if cfg.task != "jsonl" else {
        "prompt_field": cfg.prompt_field, "response_field": cfg.response_field, "answer_field": cfg.answer_field,
        "step_separator": cfg.step_separator, "prompt_template": cfg.prompt_template}
    test = task.read_jsonl(cfg.test_file, limit=cfg.test_size, **fields)
    held_out = {p.prompt for p in test}
    read = task.read_jsonl(cfg.train_file, limit=max(cfg.train_size, cfg.sft_size), **fields) if cfg.train_file else None
    train = [p for p in read if p.prompt not in held_out] if read is not None else None
    if read is not None and len(train) < len(read):
        log.warning("lab.train_file=%s: %d of %d problems are also in lab.test_file and were left out of training",
                    cfg.train_file, len(read) - len(train), len(read))
    for name, path, problems in (("test_file", cfg.test_file, test), ("train_file", cfg.train_file, train)):
        if problems is not None and not problems:
            raise SystemExit(f"lab.{name}={path}: no problems in it (an empty file"
                             f"{', or every row is also in the test file' if name == 'train_file' else ''})")
    if train is None:  # the SFT data comes prepared (data=DIR)
        return {"test_id": test}
    return {"train": train[:cfg.train_size], "sft": train[:cfg.sft_size], "test_id": test}


def lab_tokenizer(train_problems: list[Problem], vocab_size: int = 384):
    """The tiny base's tokenizer: byte-level BPE trained on the first 5,000 clean training
    problems. Training is deterministic, so data prepared with it (tools/prepare_data.py) has the
    ids of the cached base trained on the same lab settings and seed."""
    from halluc.core.tokens import train_tokenizer

    return train_tokenizer([p.prompt + p.solution for p in train_problems[:5000]], vocab_size)


def eval_table(results: dict[str, dict[str, dict]]) -> str:
    """The evaluation markdown table, one row per (model, split)."""
    from halluc.inference.evaluate import markdown_table

    rows = {f"{model} / {split}": m for model, splits in results.items() for split, m in splits.items()}
    return markdown_table(rows, first="model / split")
