"""The settings every training recipe shares: `RunConfig`. A recipe's `Config` subclasses it and
declares only its own settings below (a dataclass adds its fields after these; a field declared
again, e.g. `output_dir`, takes the recipe's default). Fields only: no behaviour is inherited, and
each recipe's `check()` calls `check_run_rules` with the model paths it reads.

    output, cache and resuming   output_dir, cache_dir, overwrite, resume, save_steps, save_total_limit
    the model and its lab chain  model (else: lab.* problems -> tiny.* base -> base.* stage (+ base_retry.*)
                                 -> sft.* + errors.*)
    layout                       layout.attention, layout.positions, layout.backend, layout.pack
    launcher and adapters        deepspeed, ddp_timeout, lora.*, num_proc
    evaluation                   eval_max_new_tokens

Torch-free, like halluc.core.config: settings are checked before any ML library loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from halluc.core.config import LayoutSettings, LoraSettings, NonNegativeInt, PositiveInt, Range, Stage
from halluc.sources.errors import ErrorConfig
from halluc.pipeline.lab import LabConfig, ModelConfig, RetryData


@dataclass
class RunConfig:
    output_dir: str = "runs/run"          # what the run writes: checkpoint/ (or adapter/), tb/, eval.json, config.yaml
    cache_dir: str = "runs/cache"         # lab bases, lab SFT models and other artifacts, reused by equal settings
    model: str | None = None              # a local HF causal-LM folder; None = the lab's (tiny base, or its masked SFT model)
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0  # data, splits, sampling, initialisation, order
    lab: LabConfig = field(default_factory=LabConfig)
    tiny: ModelConfig = field(default_factory=ModelConfig)
    base: Stage = field(default_factory=lambda: Stage(steps=900, batch_size=32, lr=3e-3))  # the tiny lab base
    base_retry: RetryData = field(default_factory=RetryData)  # base_retry.rate > 0: retry pretraining (P2.2)
    sft: Stage = field(default_factory=lambda: Stage(steps=600, batch_size=32, lr=1e-3))   # masked SFT
    errors: ErrorConfig = field(default_factory=ErrorConfig)  # the synthetic errors of masked SFT
    layout: LayoutSettings = field(default_factory=LayoutSettings)
    max_len: PositiveInt = 256            # longer examples are dropped
    num_proc: PositiveInt | None = None   # processes for building examples (datasets.map)
    deepspeed: str | None = None          # ds_configs/zero2.json | zero3.json | zero3_offload.json
    lora: LoraSettings = field(default_factory=LoraSettings)
    save_steps: NonNegativeInt = 0        # >0: checkpoint-N every this many steps, in each stage's dir
    save_total_limit: PositiveInt = 2     # newest checkpoint-N folders kept
    resume: bool = False                  # continue each stage from its newest checkpoint-N
    overwrite: bool = False               # replace an earlier run in output_dir (else the run refuses)
    eval_max_new_tokens: PositiveInt = 192  # generation budget per test problem
    ddp_timeout: PositiveInt = 1800       # seconds a process waits for the others (rank 0 evaluating) before the job fails
