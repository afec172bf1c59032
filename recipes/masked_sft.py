"""Techniques 1 and 2: masked-error SFT with a semantically initialised <|BACKTRACK|> token.

    python recipes/masked_sft.py                      # the embedded default lab, ~10 min on 2 CPU cores
    python recipes/masked_sft.py sft.steps=100 errors.source=random masked=false
    python recipes/masked_sft.py model=path/to/hf_model lab.task=gsm8k \
        lab.train_file=../shared/data/gsm8k/train.jsonl lab.test_file=../shared/data/gsm8k/test.jsonl
    torchrun --nproc_per_node 8 recipes/masked_sft.py deepspeed=ds_configs/zero3.json save_steps=200 resume=true
    python recipes/masked_sft.py lora.enabled=true lora.r=16     # adapter + BT rows -> OUT/adapter
(docs/scaling.md: python / torchrun / deepspeed / sbatch, LoRA and merging, resuming.)

Steps: (1) a base model that never saw a BT (trained here on clean `arith`, cached, or --model);
(2) evaluate it in and out of distribution; (3) add the BT token, initialise its rows;
(4) SFT on examples with errors + BTs + corrections, errors masked out of the loss;
(5) evaluate again; print the before/after table; write checkpoint, TensorBoard, eval JSON.

Under several processes every rank trains; only rank 0 evaluates and writes files. After a
DeepSpeed stage the recipe continues from what the stage saved (ZeRO-3 leaves only shards in
memory; save_model gathers them). With lora.enabled the SFT stage trains LoRA + the BT rows and
writes OUT/adapter (adapter, tokenizer, base path); tools/merge_adapter.py makes a checkpoint.
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
from halluc.distributed import (barrier, is_main, release_deepspeed_config,  # noqa: E402
                                strip_launcher_args, world_size, zero_stage)
from halluc.errors import ErrorConfig  # noqa: E402
from halluc.evaluate import evaluate_problems  # noqa: E402
from halluc.lab import LabConfig, ModelConfig, eval_table, lab_splits  # noqa: E402
from halluc.lora import LoraSettings, apply_lora, base_identity, load_adapter, save_adapter  # noqa: E402
from halluc.packing import pack_examples  # noqa: E402
from halluc.model import init_backtrack_embedding, load_causal_lm, tiny_llama  # noqa: E402
from halluc.tasks import get_task  # noqa: E402
from halluc.tokens import add_backtrack_token, train_tokenizer  # noqa: E402
from halluc.train import latest_checkpoint, make_trainer, training_args  # noqa: E402

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
    deepspeed: str | None = None        # ds_configs/zero2.json | zero3.json | zero3_offload.json
    lora: LoraSettings = field(default_factory=LoraSettings)
    save_steps: int = 0                 # >0: checkpoint-N every this many steps, in each stage's dir
    save_total_limit: int = 2           # newest checkpoint-N folders kept
    resume: bool = False                # continue each stage from its newest checkpoint-N
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
    trainer = run(model, data, tokenizer, cfg.base, cfg, str(cached) + ".run")
    save_full(trainer, tokenizer, cached)
    if cfg.deepspeed:  # continue from the saved weights (under ZeRO-3 memory holds only shards)
        model = load_causal_lm(str(cached))
    return model, tokenizer, cached


def save_full(trainer, tokenizer, out_dir) -> None:
    """Every rank calls it (ZeRO-3 gathers the shards); rank 0 writes model + tokenizer."""
    trainer.save_model(str(out_dir))
    if is_main():
        tokenizer.save_pretrained(out_dir)
    barrier()
    release_deepspeed_config()  # from_pretrained would otherwise build a sharded model


def run(model, data, tokenizer, stage: Stage, cfg: Config, out_dir: str, attention="causal",
        positions="original"):
    packed = cfg.pack > 0
    if packed:
        rows = pack_examples(list(data), cfg.pack, attention, positions)
        log.info("packed %d examples into %d rows of %d tokens: %.1f%% real tokens", rows.n_units,
                 len(rows.rows), cfg.pack, 100 * rows.real_fraction)
        data = rows.rows
    args = training_args(out_dir, steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr,
                         seed=cfg.seed, deepspeed=cfg.deepspeed, save_steps=cfg.save_steps,
                         save_total_limit=cfg.save_total_limit,
                         drop_last=len(data) >= stage.batch_size * world_size())
    trainer = make_trainer(model, args, data, tokenizer.pad_token_id, tb_dir=str(Path(out_dir) / "tb"),
                           attention=attention, positions=positions, backend=cfg.backend, packed=packed)
    start = latest_checkpoint(out_dir) if cfg.resume else None
    if start:
        log.info("resuming from %s", start)
    trainer.train(resume_from_checkpoint=start)
    return trainer


def final_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def main(argv=None):
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)  # the deepspeed launcher adds --local_rank
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

    model, tokenizer, base_path = base_model(cfg, splits)
    base_path = cfg.model or base_path
    t_base = time.perf_counter() - t0
    before = evaluate_on_main(model, tokenizer, splits, test_splits, task, cfg, "base")
    if is_main():
        print("\n" + eval_table({"base": before}) + "\n", flush=True)

    # The SFT stage's random draws (a random BT row, LoRA's init) must not depend on whether the
    # base was trained in this process or read from the cache (a resumed run reads it).
    set_seed(cfg.seed + 1)
    identity = base_identity(model, base_path)  # what an adapter's base must match, before BT
    bt_id = add_backtrack_token(tokenizer, model)
    used = init_backtrack_embedding(model, tokenizer, bt_id, cfg.bt_init)
    # generation reads this to pick its inference twin (keep for causal, rewind for block_errors)
    halluc = {"attention": cfg.attention, "positions": cfg.positions, "backtrack_token_id": bt_id}
    model.config.halluc = halluc
    if cfg.lora.enabled:  # after the BT row is initialised: PEFT starts the trained row from it
        model = apply_lora(model, cfg.lora, bt_id)
    data = build_sft_dataset(splits["sft"], tokenizer, cfg.errors, bt_id, masked=cfg.masked,
                             max_len=cfg.max_len, overlong=cfg.overlong, seed=cfg.seed + 1,
                             num_proc=cfg.num_proc)
    t1 = time.perf_counter()
    trainer = run(model, data, tokenizer, cfg.sft, cfg, str(out), cfg.attention, cfg.positions)
    t_sft = time.perf_counter() - t1
    if cfg.lora.enabled:
        saved = out / "adapter"
        # ZeRO-3 holds shards: gather them (a collective, every rank) for rank 0 to write.
        state = trainer.accelerator.get_state_dict(trainer.deepspeed) if zero_stage(cfg.deepspeed) == 3 else None
        if is_main():
            save_adapter(model, tokenizer, saved, {**identity, "halluc": halluc}, state_dict=state)
        barrier()
        release_deepspeed_config()
        if cfg.deepspeed and is_main():  # evaluate what was saved (ZeRO-3 memory holds shards)
            model = load_adapter(saved)[0]
    else:
        saved = out / "checkpoint"
        save_full(trainer, tokenizer, saved)
        if cfg.deepspeed and is_main():
            model = load_causal_lm(str(saved))
    after = evaluate_on_main(model, tokenizer, splits, test_splits, task, cfg, "sft")
    if not is_main():
        return None

    report = {"config": as_dict(cfg), "backtrack_id": bt_id, "bt_init_words": used,
              "before": before, "after": after, "saved": str(saved),
              "world_size": world_size(),
              "sft_train": {"final_loss": final_loss(trainer), "steps": trainer.state.global_step,
                            "losses": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]},
              "seconds": {"base": round(t_base, 1), "sft": round(t_sft, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    table = eval_table({"base": before, "masked SFT" if cfg.masked else "unmasked SFT": after})
    (out / "eval.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\n{'adapter' if cfg.lora.enabled else 'checkpoint'}: {saved}   eval: {out / 'eval.json'}   "
          f"tensorboard: {out / 'tb'}   total {report['seconds']['total']:.0f} s")
    return report


def evaluate_on_main(model, tokenizer, splits, test_splits, task, cfg: Config, label: str) -> dict | None:
    """Rank 0 evaluates while the others wait (raise ddp_timeout for very long evaluations)."""
    results = None
    if is_main():
        model.eval()
        results = {name: evaluate_problems(model, tokenizer, splits[name], task, cfg.eval_max_new_tokens,
                                           desc=f"eval {label} {name}") for name in test_splits}
    barrier()
    return results


if __name__ == "__main__":
    main()
