"""Techniques 1 and 2: masked-error SFT with a semantically initialised <|BACKTRACK|> token.

    python recipes/masked_sft.py                      # the embedded default lab, ~10 min on 2 CPU cores
    python recipes/masked_sft.py sft.steps=100 errors.source=random masked=false
    python recipes/masked_sft.py model=path/to/hf_model lab.task=gsm8k \
        lab.train_file=../shared/data/gsm8k/train.jsonl lab.test_file=../shared/data/gsm8k/test.jsonl

Steps: (1) a base model that never saw a BT (trained here on clean `arith`, cached, or --model);
(2) evaluate it in and out of distribution; (3) add the BT token, initialise its rows;
(4) SFT on examples with errors + BTs + corrections, errors masked out of the loss;
(5) evaluate again; print the before/after table; write checkpoint, TensorBoard, eval JSON.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from transformers import AutoTokenizer, set_seed  # noqa: E402

from halluc.config import as_dict, load_config  # noqa: E402
from halluc.data import build_sft_dataset  # noqa: E402
from halluc.errors import ErrorConfig  # noqa: E402
from halluc.evaluate import evaluate_problems  # noqa: E402
from halluc.lab import LabConfig, ModelConfig, eval_table, lab_splits  # noqa: E402
from halluc.packing import pack_examples  # noqa: E402
from halluc.model import init_backtrack_embedding, load_causal_lm, tiny_llama  # noqa: E402
from halluc.tasks import get_task  # noqa: E402
from halluc.tokens import add_backtrack_token, train_tokenizer  # noqa: E402
from halluc.train import make_trainer, training_args  # noqa: E402

log = logging.getLogger("masked_sft")


@dataclass
class Stage:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3


@dataclass
class Config:
    output_dir: str = "runs/masked_sft"
    cache_dir: str = "runs/cache"
    model: str | None = None            # a local HF causal-LM folder; None = tiny lab base
    seed: int = 0
    lab: LabConfig = field(default_factory=LabConfig)
    tiny: ModelConfig = field(default_factory=ModelConfig)
    base: Stage = field(default_factory=lambda: Stage(steps=1800, batch_size=32, lr=3e-3))
    sft: Stage = field(default_factory=lambda: Stage(steps=600, batch_size=32, lr=1e-3))
    errors: ErrorConfig = field(default_factory=ErrorConfig)
    masked: bool = True                 # False: train on the error tokens too (ablation)
    bt_init: str = "semantic"           # semantic | mean | random
    # Technique 4. Default causal: errors stay visible to what follows (Physics-of-LM "retry"
    # data; their pretraining study found no loss from it) and plain generate() is its exact
    # inference twin. block_errors + rewound is the twin of KV-rewinding generation.
    attention: str = "causal"           # causal | block_errors
    positions: str = "original"         # original | rewound
    backend: str = "auto"               # auto | dense | dense_units | flex | varlen | varlen_kv
    pack: int = 0                       # >0: pack examples into rows of this many tokens
    max_len: int = 256
    overlong: str = "drop"              # drop | truncate
    num_proc: int | None = None
    deepspeed: str | None = None
    eval_max_new_tokens: int = 192


def base_model(cfg: Config, splits: dict):
    """--model, or the tiny lab base trained on clean data (cached by its settings)."""
    if cfg.model:
        return load_causal_lm(cfg.model), AutoTokenizer.from_pretrained(cfg.model), None
    key = json.dumps([as_dict(cfg.lab), as_dict(cfg.tiny), as_dict(cfg.base), cfg.seed], sort_keys=True)
    cached = Path(cfg.cache_dir) / f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (cached / "config.json").exists():
        log.info("reusing the cached base model %s", cached)
        return load_causal_lm(str(cached)), AutoTokenizer.from_pretrained(cached), cached
    train = splits["train"]
    tokenizer = train_tokenizer([p.prompt + p.solution for p in train[:5000]], cfg.tiny.vocab_size)
    model = tiny_llama(len(tokenizer), cfg.tiny.hidden, cfg.tiny.layers, cfg.tiny.heads,
                       init_range=cfg.tiny.init_range, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    log.info("training the tiny base (%.2fM params) on clean %s for %d steps", model.num_parameters() / 1e6,
             cfg.lab.task, cfg.base.steps)
    data = build_sft_dataset(train, tokenizer, ErrorConfig(source="none"), None, max_len=cfg.max_len,
                             num_proc=cfg.num_proc, seed=cfg.seed)
    run(model, data, tokenizer, cfg.base, cfg, str(cached) + ".run")
    model.save_pretrained(cached)
    tokenizer.save_pretrained(cached)
    return model, tokenizer, cached


def run(model, data, tokenizer, stage: Stage, cfg: Config, out_dir: str, attention="causal",
        positions="original"):
    packed = cfg.pack > 0
    if packed:
        rows = pack_examples(list(data), cfg.pack, attention, positions)
        log.info("packed %d examples into %d rows of %d tokens: %.1f%% real tokens", rows.n_units,
                 len(rows.rows), cfg.pack, 100 * rows.real_fraction)
        data = rows.rows
    args = training_args(out_dir, steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr,
                         seed=cfg.seed, deepspeed=cfg.deepspeed)
    trainer = make_trainer(model, args, data, tokenizer.pad_token_id, tb_dir=str(Path(out_dir) / "tb"),
                           attention=attention, positions=positions, backend=cfg.backend, packed=packed)
    return trainer.train()


def main(argv=None):
    cfg = load_config(Config, argv, default_file=str(Path(__file__).parent / "configs/masked_sft.yaml"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_seed(cfg.seed)
    for name, value, allowed in (("attention", cfg.attention, ("causal", "block_errors")),
                                 ("positions", cfg.positions, ("original", "rewound")),
                                 ("bt_init", cfg.bt_init, ("semantic", "mean", "random"))):
        if value not in allowed:
            raise SystemExit(f"{name}={value!r}: choose one of {', '.join(allowed)}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = get_task(cfg.lab.task)
    splits = lab_splits(cfg.lab, cfg.seed)
    test_splits = [name for name in ("test_id", "test_ood") if name in splits]

    model, tokenizer, _ = base_model(cfg, splits)
    t_base = time.perf_counter() - t0
    before = {name: evaluate_problems(model, tokenizer, splits[name], task, cfg.eval_max_new_tokens,
                                      desc=f"eval base {name}") for name in test_splits}
    print("\n" + eval_table({"base": before}) + "\n", flush=True)

    bt_id = add_backtrack_token(tokenizer, model)
    used = init_backtrack_embedding(model, tokenizer, bt_id, cfg.bt_init)
    data = build_sft_dataset(splits["sft"], tokenizer, cfg.errors, bt_id, masked=cfg.masked,
                             max_len=cfg.max_len, overlong=cfg.overlong, seed=cfg.seed + 1,
                             num_proc=cfg.num_proc)
    t1 = time.perf_counter()
    run(model, data, tokenizer, cfg.sft, cfg, str(out), cfg.attention, cfg.positions)
    t_sft = time.perf_counter() - t1
    # generation reads this to pick its inference twin (keep for causal, rewind for block_errors)
    model.config.halluc = {"attention": cfg.attention, "positions": cfg.positions, "backtrack_token_id": bt_id}
    model.save_pretrained(out / "checkpoint")
    tokenizer.save_pretrained(out / "checkpoint")
    after = {name: evaluate_problems(model, tokenizer, splits[name], task, cfg.eval_max_new_tokens,
                                     desc=f"eval sft {name}") for name in test_splits}

    report = {"config": as_dict(cfg), "backtrack_id": bt_id, "bt_init_words": used,
              "before": before, "after": after,
              "seconds": {"base": round(t_base, 1), "sft": round(t_sft, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    table = eval_table({"base": before, "masked SFT" if cfg.masked else "unmasked SFT": after})
    (out / "eval.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\ncheckpoint: {out / 'checkpoint'}   eval: {out / 'eval.json'}   "
          f"tensorboard: {out / 'tb'}   total {report['seconds']['total']:.0f} s")
    return report


if __name__ == "__main__":
    main()
