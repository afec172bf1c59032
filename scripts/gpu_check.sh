#!/usr/bin/env bash
# The one prepared GPU check (run through the device tool on an H100/H200 image with torch but
# without datasets/deepspeed/flash-attn): carried wheels, the GPU-marked tests, the masked-SFT
# recipe end to end in bf16 with block_errors through each GPU backend, and a compact table.
# Usage there:  bash scripts/gpu_check.sh   (writes logs under $OUT if set)
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, transformers; print('card', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| transformers', transformers.__version__)"
python3 -c "import flash_attn" 2>/dev/null && echo "flash-attn: installed" || echo "flash-attn: not installed (its tests skip)"
python3 -m pip show pyarrow 2>/dev/null | grep -i ^version | sed 's/^/pyarrow /'
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # halluc from this checkout (recipes and tests import it)

echo "== GPU-marked tests"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py tests/test_backends.py tests/test_objective.py tests/test_dpo.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
if ! python3 -c "import datasets" 2>/dev/null; then
  echo "datasets does not import here (pyarrow too old?): skipping the recipe runs"; exit 0
fi

echo "== masked SFT on the GPU (tiny lab, bf16): one run per backend"
printf "%-12s %-8s %-10s %-10s %-10s %-10s\n" backend rc sft_s loss_first loss_last id_acc > "$OUT/table.txt"
for backend in flex varlen_kv; do
  dir=/tmp/gpu_sft_$backend
  timeout 150 python3 recipes/masked_sft.py output_dir=$dir overwrite=true cache_dir=/tmp/gpu_cache base.steps=300 sft.steps=150 \
    base.batch_size=64 sft.batch_size=64 lab.train_size=8000 lab.sft_size=4000 lab.test_size=200 layout.attention=block_errors layout.positions=rewound \
    layout.backend=$backend > "$OUT/sft_$backend.log" 2>&1
  rc=$?
  python3 - "$dir" "$backend" "$rc" "$OUT/sft_$backend.log" >> "$OUT/table.txt" <<'PY'
import ast, json, re, sys
d, backend, rc, logfile = sys.argv[1:]
text = open(logfile, errors="replace").read().replace("\r", "\n")
sft = text[text.find("initialised the"):]  # the SFT stage's log lines only
losses = [float(ast.literal_eval(m)["loss"]) for m in re.findall(r"\{'loss'.*?\}", sft)]
try:
    r = json.load(open(f"{d}/eval.json"))
    sft_s, acc = r["seconds"]["sft"], f"{r['after']['test_id']['answer_acc']:.3f}"
except (OSError, KeyError, ValueError):
    sft_s, acc = "-", "-"
first, last = (f"{losses[0]:.3f}", f"{losses[-1]:.3f}") if losses else ("-", "-")
print(f"{backend:<12} {rc:<8} {sft_s:<10} {first:<10} {last:<10} {acc:<10}")
PY
  grep -E "attention backend|setting attn_implementation|Traceback|Error:" "$OUT/sft_$backend.log" | head -4 | cut -c1-160
done
echo "== summary"
cat "$OUT/table.txt"

if python3 -c "import trl" 2>/dev/null; then
  echo "== benchmarks/dpo.py: halluc vs TRL's DPOTrainer, bf16, ~135M params"
  timeout 240 python3 benchmarks/dpo.py --hidden 768 --layers 12 --vocab 32000 --pairs 64 --steps 6 --repeats 2 \
    2>&1 | tee "$OUT/dpo_bench.log" | grep -E "^\||^#|tokens per pair"
else
  echo "trl does not import here: skipping benchmarks/dpo.py"
fi

echo "== benchmarks/guided.py: guided vs plain decoding, bf16"
timeout 150 python3 benchmarks/guided.py --models tiny large --batch 16 --repeats 3 2>&1 | tee "$OUT/guided_bench.log" | grep -E "^\||^#"
