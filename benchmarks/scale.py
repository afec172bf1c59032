"""Masked SFT at the sizes users train: tokens/s per GPU, MFU, peak memory, the cost of blocking errors.

    python benchmarks/scale.py                                   # CPU smoke: tiny shape, 512-token rows, fp32
    python benchmarks/scale.py --size 1b --lengths 4096 16384    # GPU: Llama-3.2-1B shape, bf16, every config
    python benchmarks/scale.py --size 1b --configs causal/flex block/flex block/flex+compile

The model is built from a config in code (`SHAPES`, random weights: speed does not depend on them),
the rows are GSM8K-shaped examples (prompt ~90 tokens, response ~160, half of them with one wrong step
of 2-12 tokens erased by as many BTs and rewritten) packed into rows of exactly L tokens, and every
config trains `--steps` optimizer steps through halluc's own trainer (halluc.training.train: the HF
Trainer, AdamW, bf16 autocast on a GPU), so the table is what a recipe gets. A config is
`attention/backend[+option...]`:

- attention `causal`: packed examples, each attends only to itself (document masking, the baseline);
  `block`: the same rows with errors blocked (technique 4: `block_errors`, rewound positions);
- backend: `flex` (GPU), `varlen`, `varlen_kv` (halluc.structure.backends), `dense_units` (CPU);
- options: `compile` (torch.compile), `ckpt` (activation checkpointing), `liger` (Liger's fused linear
  cross-entropy on the trained positions: the (tokens x vocabulary) logits are never materialised),
  `zero3` (ds_configs/zero3.json in this one process).

MFU counts the FLOPs the work requires, not what a kernel happens to spend (`required_flops`):
6 x (decoder matmul parameters) per real token, 6 x hidden x vocabulary per TRAINED token (the
trainer computes logits only where a label is trained), and 12 x head_dim x heads x layers per
(query, key) pair the mask allows (4 per pair forward, QK and PV; backward twice that). Work beyond
it (varlen's repeated prefixes, flex's partly masked 128x128 tiles, recomputation under `ckpt`) is
overhead, not credit. Peak FLOP/s: the card's dense bf16 number (`PEAK_TFLOPS`) or `--peak-tflops`.
Numbers: docs/scaling.md.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from halluc.core.config import LayoutSettings  # noqa: E402
from halluc.core.distributed import release_deepspeed_config  # noqa: E402
from halluc.core.example import IGNORE_INDEX, Role  # noqa: E402
from halluc.structure.packing import concat_row, layout_example  # noqa: E402
from halluc.training.train import make_trainer, training_args  # noqa: E402

BT = 3
# Llama-3.2-1B's published shape (head_dim 64, GQA 32/8, tied embeddings; its llama3 RoPE scaling does
# not change the cost and is left out). "tiny" is for the CPU smoke run and the test.
SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
# dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts; the PCIe H100 is 756)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
ATTENTION = {"causal": "causal", "block": "block_errors"}
OPTIONS = ("compile", "ckpt", "liger", "zero3")


@dataclass
class Config:
    attention: str       # causal | block
    backend: str
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Config":
        head, *options = text.split("+")
        attention, _, backend = head.partition("/")
        if attention not in ATTENTION or not backend:
            raise SystemExit(f"config {text!r}: write attention/backend[+option...], attention in {list(ATTENTION)}")
        if unknown := set(options) - set(OPTIONS):
            raise SystemExit(f"config {text!r}: unknown options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
        if {"liger", "zero3"} <= set(options):
            raise SystemExit(f"config {text!r}: liger reads the LM head's weight outside the forward, where "
                             "ZeRO-3 has it sharded: not combined here")
        return cls(attention, backend, tuple(options))

    def __str__(self) -> str:
        return "+".join([f"{self.attention}/{self.backend}", *self.options])


# --------------------------------------------------------------------------- data

def gsm8k_shaped_example(rng, vocab: int, length: int | None = None) -> dict:
    """Prompt ~90 tokens, response ~160; half the examples hold one wrong step of 2-12 tokens, then as
    many BTs and the rewrite. `length`: a clean example of exactly this many tokens (a row's filler)."""
    if length is not None:
        n_prompt = min(max(length // 3, 1), length - 1)
        roles = [Role.PROMPT] * n_prompt + [Role.KEPT] * (length - n_prompt)
    else:
        roles = [Role.PROMPT] * int(np.clip(rng.lognormal(4.5, 0.35), 30, 250))
        response = int(np.clip(rng.lognormal(5.05, 0.4), 40, 500))
        if rng.random() < 0.5:
            at, k = int(rng.integers(5, response)), int(rng.integers(2, 13))
            roles += [Role.KEPT] * at + [Role.ERROR] * k + [Role.BACKTRACK] * k + [Role.KEPT] * (response - at)
        else:
            roles += [Role.KEPT] * response
    roles = np.array(roles)
    ids = rng.integers(4, vocab, size=len(roles))
    ids[roles == Role.BACKTRACK] = BT
    labels = np.where((roles == Role.PROMPT) | (roles == Role.ERROR), IGNORE_INDEX, ids)
    return {"input_ids": ids, "labels": labels, "roles": roles}


def packed_rows(n_rows: int, length: int, vocab: int, attention: str, seed: int = 0) -> list[dict]:
    """`n_rows` rows of exactly `length` real tokens (a short clean example fills each row's end), so
    every step has the same shape and the same work."""
    mode = ATTENTION[attention]
    positions = "rewound" if mode == "block_errors" else "original"
    rng, rows = np.random.default_rng(seed), []
    for _ in range(n_rows):
        units, used = [], 0
        while True:
            ex = gsm8k_shaped_example(rng, vocab)
            if used + len(ex["input_ids"]) > length - 16:
                ex = gsm8k_shaped_example(rng, vocab, length=length - used)
            units.append(layout_example(ex, mode, positions))
            used += len(units[-1])
            if used == length:
                break
        rows.append(concat_row(units))
    return rows


# --------------------------------------------------------------------------- FLOPs

def allowed_pairs(attn_end: np.ndarray) -> int:
    """(query, key) pairs the mask allows in one row of real tokens: key k is seen by queries k..end[k]-1."""
    end = np.asarray(attn_end, dtype=np.int64)
    return int((end - np.arange(len(end))).sum())


def required_flops(row: dict, cfg: LlamaConfig) -> float:
    """Training FLOPs (forward + backward) one row requires; see the module docstring."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    matmul_params = layers * (h * q_out + 2 * h * kv_out + q_out * h + 3 * h * inter)
    trained = int(((np.asarray(row["labels"]) != IGNORE_INDEX) & (np.asarray(row["pred_pos"]) >= 0)).sum())
    tokens = len(row["input_ids"])
    attention = 12 * head_dim * cfg.num_attention_heads * layers * allowed_pairs(row["attn_end"])
    return 6 * matmul_params * tokens + 6 * h * cfg.vocab_size * trained + attention


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if all(w in name for w in k.split())), None)


# --------------------------------------------------------------------------- one config

class StepClock(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


class FusedLinearCrossEntropy:
    """Token cross-entropy with Liger's fused linear cross-entropy: the LM head is an identity, so the
    trainer's forward returns hidden states at the trained positions, and the kernel multiplies them by
    the head's weight chunk by chunk inside the loss."""

    item_mean = True

    def __init__(self, weight: torch.nn.Parameter):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        self.weight, self.loss = weight, LigerFusedLinearCrossEntropyLoss()

    def __call__(self, model, batch):
        t = model.targets(batch)
        return self.loss(self.weight, t.logits, t.ids), {}


def build_model(shape: dict, length: int, device: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(max_position_embeddings=max(length, 2048), attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def run_config(conf: Config, shape: dict, length: int, rows_per_step: int, steps: int, warmup: int,
               device: str, peak: float | None) -> dict:
    """Train one config; tokens/s and MFU over the steps after `warmup`, peak memory over the run."""
    model = build_model(shape, length, device)
    rows = packed_rows(rows_per_step * (steps + warmup), length, shape["vocab_size"], conf.attention)
    objective = None
    if "liger" in conf.options:
        objective = FusedLinearCrossEntropy(model.lm_head.weight)
        model.lm_head = torch.nn.Identity()
    layout = LayoutSettings(attention=ATTENTION[conf.attention],
                            positions="rewound" if conf.attention == "block" else "original", backend=conf.backend)
    extra = {}
    if "compile" in conf.options:
        extra["torch_compile"] = True
    if "ckpt" in conf.options:
        extra.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = training_args(out, steps=steps + warmup, batch_size=rows_per_step, lr=1e-4, warmup=0, log_every=10**6,
                             deepspeed=str(ROOT / "ds_configs/zero3.json") if "zero3" in conf.options else None,
                             disable_tqdm=True, logging_steps=steps + warmup, **extra)
        trainer = make_trainer(model, args, rows, str(Path(out) / "tb"), objective=objective, layout=layout,
                               packed=True)
        trainer.add_callback(clock)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    w = max(warmup, 1)  # the first step's end is the earliest clock mark: gaps start after it
    per_step = statistics.median(b - a for a, b in zip(clock.times[w - 1:], clock.times[w:]))
    flops = statistics.mean(required_flops(r, model.config) for r in rows) * rows_per_step
    result = {"config": str(conf), "length": length, "backend": trainer.backend, "step_s": per_step,
              "tokens_per_s": rows_per_step * length / per_step, "tflops": flops / per_step / 1e12,
              "mfu": flops / per_step / (peak * 1e12) if peak else None,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    del trainer, model
    release_deepspeed_config()  # else the next config's model would be built sharded
    if "compile" in conf.options:
        torch._dynamo.reset()  # the compiled graphs hold the model's memory until they go
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- table

DEFAULT_CONFIGS = {
    "cuda": ["causal/flex", "block/flex", "causal/varlen", "block/varlen", "block/varlen_kv",
             "block/flex+compile", "block/flex+liger", "block/flex+ckpt", "block/flex+zero3"],
    "cpu": ["causal/dense_units", "block/dense_units", "causal/varlen", "block/varlen"],
}


def overhead(results: list[dict], r: dict) -> str:
    """block vs causal packed: the same backend, options and length."""
    if not r["config"].startswith("block/"):
        return ""
    twin = "causal/" + r["config"].split("/", 1)[1]
    base = next((b for b in results if b["config"] == twin and b["length"] == r["length"] and "error" not in b), None)
    return f"{r['step_s'] / base['step_s'] - 1:+.1%}" if base and "error" not in r else ""


def format_table(results: list[dict]) -> str:
    head = ["L", "config", "backend", "s/step", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "block vs causal"]
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append([str(r["length"]), r["config"], "-", "failed: " + r["error"][:90], "", "", "", "", ""])
            continue
        lines.append([str(r["length"]), r["config"], r["backend"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['tflops']:.2f}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
                      f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-", overhead(results, r)])
    return "\n".join("| " + " | ".join(c) + " |" for c in [lines[0], ["---"] * len(head), *lines[1:]])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SHAPES), default=None, help="default: 1b on a GPU, tiny on CPU")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="row lengths (default: 4096 16384 on a GPU)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per optimizer step (default 16384 on a GPU, 1024 on CPU): rows = this / L")
    p.add_argument("--configs", nargs="+", default=None, help="attention/backend[+option...] (default: see DEFAULT_CONFIGS)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on a GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak (default: from its name)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.size or ("1b" if cuda else "tiny")]
    lengths = args.lengths or ([4096, 16384] if cuda else [512])
    tokens = args.tokens_per_step or (16384 if cuda else 1024)
    steps = args.steps or (20 if cuda else 3)
    configs = [Config.parse(c) for c in (args.configs or DEFAULT_CONFIGS[device])]
    peak = peak_tflops(args.peak_tflops)
    results = []
    for length in lengths:
        for conf in configs:
            try:
                r = run_config(conf, shape, length, max(tokens // length, 1), steps, args.warmup, device, peak)
            except Exception as e:  # one config failing (a kernel missing, out of memory) must not lose the table
                r = {"config": str(conf), "length": length, "error": f"{type(e).__name__}: {e}".replace("\n", " ")}
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            results.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    n_params = sum(p.numel() for p in build_model(shape, 16, "meta").parameters())
    print(f"\n# benchmarks/scale.py on {dev}, torch {torch.__version__}, {n_params / 1e6:,.1f}M parameters, "
          f"{tokens} tokens per step, peak {peak or '-'} TFLOP/s, {'bf16' if cuda else 'fp32'}")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
