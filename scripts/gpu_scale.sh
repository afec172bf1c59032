#!/usr/bin/env bash
# Issue 26's GPU check, sized for one device call (about 8 minutes on an H100/H200): benchmarks/scale.py at
# the Llama-3.2-1B shape (4k and 16k rows: causal vs block_errors on flex and varlen, then torch.compile,
# Liger, activation checkpointing, ZeRO-3), DPO against TRL's DPOTrainer at ~1.2B, GRPO against TRL's
# GRPOTrainer; one table each, logs under $OUT. docs/scaling.md says what the numbers mean.
#
#   bash scripts/gpu_scale.sh --wheels   # HERE, with network: the pure-Python packages the GPU image lacks -> .whl/
#   bash scripts/gpu_scale.sh            # THERE (device tool, carry [".whl"]): install them, run, print tables
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .whl
  python3 -m pip wheel -q --no-deps -w .whl liger-kernel deepspeed==0.19.8 trl==1.16.0 hjson py-cpuinfo msgpack ninja
  du -sh .whl; exit 0
fi
OUT=${OUT:-/tmp/gpu_scale}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch, transformers; print('card', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| transformers', transformers.__version__)"
for m in liger_kernel deepspeed trl datasets flash_attn; do
  python3 -c "import $m" 2>/dev/null && echo "$m: imports" || echo "$m: missing (its rows fail or skip)"
done

echo "== benchmarks/scale.py, 1B shape, 4k rows (4 per step)"
timeout 240 python3 benchmarks/scale.py --size 1b --lengths 4096 --steps 12 \
  --configs causal/flex block/flex causal/varlen block/varlen block/varlen_kv block/flex+compile block/flex+liger \
  > "$OUT/scale_4k.log" 2>&1
sed -n '/^# benchmarks/,$p' "$OUT/scale_4k.log"; grep -E "Traceback|Error" "$OUT/scale_4k.log" | head -3 | cut -c1-200

echo "== benchmarks/scale.py, 1B shape, 16k rows (1 per step)"
timeout 170 python3 benchmarks/scale.py --size 1b --lengths 16384 --steps 12 \
  --configs causal/flex block/flex block/flex+liger block/flex+ckpt block/flex+zero3 \
  > "$OUT/scale_16k.log" 2>&1
sed -n '/^# benchmarks/,$p' "$OUT/scale_16k.log"; grep -E "Traceback|Error" "$OUT/scale_16k.log" | head -3 | cut -c1-200

if python3 -c "import trl, datasets" 2>/dev/null; then
  echo "== benchmarks/dpo.py at ~1.2B (hidden 2048 x 16 layers, vocabulary 128256), bf16"
  timeout 100 python3 benchmarks/dpo.py --hidden 2048 --layers 16 --vocab 128256 --pairs 48 --steps 4 --repeats 1 \
    > "$OUT/dpo_1b.log" 2>&1; grep -E "^\||^#|tokens per pair" "$OUT/dpo_1b.log"
  echo "== benchmarks/grpo.py at hidden 1024 x 8 layers, bf16"
  timeout 60 python3 benchmarks/grpo.py --hidden 1024 --layers 8 --heads 16 --steps 3 --warmup 1 \
    > "$OUT/grpo.log" 2>&1; grep -E "^\||bf16" "$OUT/grpo.log"
else
  echo "trl or datasets does not import: skipping the DPO and GRPO comparisons"
fi
