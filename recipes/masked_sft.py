"""Techniques 1 and 2: masked-error SFT with a semantically initialised <|BACKTRACK|> token.

    python recipes/masked_sft.py                      # the embedded default lab, ~2.5 min on 2 CPU cores
    python recipes/masked_sft.py sft.steps=100 errors.source=random masked=false
    python recipes/masked_sft.py model=path/to/hf_model lab.task=gsm8k \
        lab.train_file=../shared/data/gsm8k/train.jsonl lab.test_file=../shared/data/gsm8k/test.jsonl
    torchrun --nproc_per_node 8 recipes/masked_sft.py deepspeed=ds_configs/zero3.json save_steps=200 resume=true
    python recipes/masked_sft.py lora.enabled=true lora.r=16     # adapter + BT rows -> OUT/adapter
(docs/scaling.md: python / torchrun / deepspeed / sbatch, LoRA and merging, resuming.)

The stage itself (base, evaluation, BT token, masked SFT, evaluation, report) is
`halluc.pipeline.sft.train_sft`; its settings `halluc.pipeline.sft.SFTConfig`, checked before the ML libraries load,
so a bad one fails in about a second. DPO, PRM and MCTS start from the model it trains
(`halluc.pipeline.sft.lab_sft_model`, cached).
"""
from __future__ import annotations

from halluc.core.config import recipe_entry
from halluc.pipeline.sft import SFTConfig as Config
from halluc.pipeline.sft import train_sft as train
from halluc.core.inputs import run_cli


load, main = recipe_entry(Config, train, __file__)  # configs/masked_sft.yaml, --config FILE, key=value

if __name__ == "__main__":
    run_cli(main)
