#!/usr/bin/env bash
# Issue 26's GPU check, sized for one device call (at most about 9 minutes on an H100/H200): benchmarks/scale.py at
# the Llama-3.2-1B shape (4k and 16k rows: causal vs block_errors on flex and varlen, then torch.compile,
# Liger, activation checkpointing, ZeRO-3), DPO against TRL's DPOTrainer at ~1.6B, GRPO against TRL's
# GRPOTrainer; one table each, logs under $OUT. docs/scaling.md says what the numbers mean.
#
#   bash scripts/gpu_scale.sh --wheels   # HERE, with network: the pure-Python packages the GPU image lacks -> .whl/
#   bash scripts/gpu_scale.sh            # THERE (device tool, carry [".whl"]): install them, run, print tables
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--wheels" ]; then
  # What the device image (Python 3.12, torch, transformers, accelerate, peft, pyarrow, pandas, xxhash,
  # msgpack, ninja, py-cpuinfo: /work/.library/device/KINDS.md) lacks: pure-Python wheels, and the two
  # binary ones built for 3.12 (a wheel for this machine's 3.11 stops the whole install there).
  rm -rf .whl && mkdir -p .whl
  python3 -m pip wheel -q --no-deps -w .whl liger-kernel deepspeed==0.19.8 trl==1.16.0 hjson==3.1.0 datasets==5.2.0 \
    dill==0.4.1 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl pydantic-core==2.50.5 multiprocess==0.70.19
  ls .whl | grep -v -E "py3-none-any|py312|cp312" && { echo "a wheel above will not install on Python 3.12"; exit 1; }
  du -sh .whl; exit 0
fi
OUT=${OUT:-/tmp/gpu_scale}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch, transformers; print('card', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| transformers', transformers.__version__)"
for m in liger_kernel pydantic deepspeed trl datasets flash_attn; do
  python3 -c "import $m" 2>/dev/null && echo "$m: imports" || echo "$m: missing (its rows fail or skip)"
done

# The table when a run finished; when its timeout cut it, the configs it measured (one line each).
show() {
  if grep -q "^# benchmarks" "$1"; then sed -n '/^# benchmarks/,$p' "$1"; else
    echo "(cut by its timeout: the configs measured so far)"; grep "^{'config'" "$1" | cut -c1-260; fi
  grep -E "Traceback|Error" "$1" | head -3 | cut -c1-200
}
# Caps sum to about 530 s (+ ~30 s of installs and probes): under the device's 600 s per call.
echo "== benchmarks/scale.py, 1B shape, 4k rows (4 per step); torch.compile last (its compile is the slowest)"
timeout 220 python3 benchmarks/scale.py --size 1b --lengths 4096 --steps 12 \
  --configs causal/flex block/flex causal/varlen block/varlen block/varlen_kv block/flex+liger block/flex+compile \
  > "$OUT/scale_4k.log" 2>&1
show "$OUT/scale_4k.log"

echo "== benchmarks/scale.py, 1B shape, 16k rows (1 per step); ZeRO-3 last (it leaves a process group)"
timeout 150 python3 benchmarks/scale.py --size 1b --lengths 16384 --steps 12 \
  --configs causal/flex block/flex block/flex+liger block/flex+ckpt block/flex+zero3 \
  > "$OUT/scale_16k.log" 2>&1
show "$OUT/scale_16k.log"

if python3 -c "import trl, datasets" 2>/dev/null; then
  echo "== benchmarks/dpo.py at ~1.6B (hidden 2048 x 16 layers, untied head, vocabulary 128256), bf16"
  timeout 100 python3 benchmarks/dpo.py --hidden 2048 --layers 16 --vocab 128256 --pairs 48 --steps 4 --repeats 1 \
    > "$OUT/dpo_1b.log" 2>&1; grep -E "^\||^#|tokens per pair|repeat [0-9]" "$OUT/dpo_1b.log"
  grep -E "Traceback|Error" "$OUT/dpo_1b.log" | head -3 | cut -c1-200
  echo "== benchmarks/grpo.py at hidden 1024 x 8 layers, bf16"
  timeout 60 python3 benchmarks/grpo.py --hidden 1024 --layers 8 --heads 16 --steps 3 --warmup 1 \
    > "$OUT/grpo.log" 2>&1; grep -E "^\||bf16" "$OUT/grpo.log"
  grep -E "Traceback|Error" "$OUT/grpo.log" | head -3 | cut -c1-200
else
  echo "trl or datasets does not import: skipping the DPO and GRPO comparisons"
fi
