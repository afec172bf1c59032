"""A tiny training job for tests/test_deepspeed.py, run under python, torchrun or deepspeed.

    torchrun --nproc_per_node 2 tests/helpers/ds_job.py --out DIR --deepspeed ds_configs/zero3.json

Every process builds the same tiny model and data from fixed seeds, trains through
halluc.training.train (the edit-tree Trainer path, so compute_loss sees the DeepSpeedEngine), and
writes rank<R>.json: how much of each parameter / optimizer state it holds (ZeRO sharding
seen from inside the job) and the per-step losses. Rank 0 also saves the model (gathered
from the shards by save_model) and the logits of a fixed input computed inside the job.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from halluc.sources.data import build_sft_dataset
from halluc.core.distributed import barrier, is_main, rank, strip_launcher_args, world_size
from halluc.sources.errors import ErrorConfig
from halluc.core.model import init_backtrack_embedding, tiny_llama
from halluc.tasks import arith
from halluc.core.tokens import add_backtrack_token, train_tokenizer
from halluc.core.config import LayoutSettings
from halluc.training.train import make_trainer, training_args


class ShardRecord(TrainerCallback):
    """After the first step: per parameter, the elements this rank holds vs the full tensor."""

    def __init__(self):
        self.params, self.optimizer = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        for name, p in model.named_parameters():
            held = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            self.params[name] = {"held": held, "full": full}
        # ZeRO-1/2 keep full parameters but each rank owns a slice of the fp32 master weights
        # (and the Adam moments that go with them).
        inner = getattr(optimizer, "optimizer", optimizer)
        groups = getattr(inner, "single_partition_of_fp32_groups", None)
        if groups is not None:
            self.optimizer = {"fp32_partition_numel": sum(g.numel() for g in groups),
                              "param_numel": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)

    problems = arith.make_split(64, (2, 3), seed=5)
    tok = train_tokenizer([p.prompt + p.solution for p in problems], vocab_size=300)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    bt = add_backtrack_token(tok, model)
    init_backtrack_embedding(model, tok, bt)
    if args.lora:
        from halluc.training.lora import LoraSettings, apply_lora

        if is_main():  # the base the adapter goes on (BT added and initialised), for the reload check
            model.save_pretrained(out / "base")
        model = apply_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0), bt)
    data = build_sft_dataset(problems, tok, ErrorConfig(example_rate=0.5), bt, seed=1)
    per_device = args.global_batch // world_size()
    targs = training_args(str(out / "run"), steps=args.steps, batch_size=per_device, lr=3e-3,
                          log_every=1, deepspeed=args.deepspeed, disable_tqdm=True)
    trainer = make_trainer(model, targs, data, tb_dir=str(out / "tb"),
                           layout=LayoutSettings("block_errors", "rewound", "dense"))
    shards = ShardRecord()
    trainer.add_callback(shards)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trainer.save_model(str(out / "ckpt"))  # every rank: under ZeRO-3 it gathers the shards
    ids = torch.tensor([data[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():  # every rank: a ZeRO-3 forward gathers each layer from all ranks
        logits = trainer.model(input_ids=ids).logits
    if is_main():
        tok.save_pretrained(out / "ckpt")
        torch.save({"input_ids": ids, "logits": logits}, out / "logits.pt")
    (out / f"rank{rank()}.json").write_text(json.dumps(
        {"rank": rank(), "world_size": world_size(), "losses": losses, "params": shards.params,
         "optimizer": shards.optimizer, "deepspeed": args.deepspeed}))
    barrier()


if __name__ == "__main__":
    main()
