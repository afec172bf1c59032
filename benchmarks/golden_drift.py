"""How far the pinned golden losses (tests/test_golden.py) move on other CPUs: the tolerance's evidence.

    python benchmarks/golden_drift.py            # every golden configuration x every emulated machine (~4 min)

Another CPU sums in another order (other SIMD width, other GEMM blocking, other thread split), and
162 training steps amplify those last-bit differences. This re-runs each golden configuration
(the test's settings, one thread) in fresh processes that emulate other machines:
- `avx2`: ATEN_CPU_CAPABILITY=avx2 + MKL_ENABLE_INSTRUCTIONS=AVX2, the kernels of an AVX2-only CPU
  (the AMD EPYC where `abs=2e-5` failed by 2.3e-5 ran these);
- `default`: ATEN_CPU_CAPABILITY=default + MKL_ENABLE_INSTRUCTIONS=SSE4_2, no vector kernels at all;
- `2 threads`: the same kernels, work split in two (other partial sums);
and prints, per configuration, the largest |loss - pin| over the four logged losses. The same table
gives the moves the golden test exists to catch (tests/test_golden.py's negative controls), so the
tolerance can sit far below them and far above the drift.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINES = {
    "this CPU": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "2 threads": {"GOLDEN_THREADS": "2"},
}

RUN = """
import json, sys, torch
sys.path.insert(0, "tests")
from conftest import load_script
import test_golden as g
torch.set_num_threads(int(sys.argv[3]))
extra = g.GOLDEN[sys.argv[1]][0] if sys.argv[1] in g.GOLDEN else g.CONTROLS[sys.argv[1]][1]
report = load_script("recipes/masked_sft.py").main([f"output_dir={sys.argv[2]}/out", f"cache_dir={sys.argv[2]}/cache",
                                                    *g.COMMON, *extra])
print("LOSSES", json.dumps([loss for _, loss in report["sft_train"]["losses"]]))
"""


def losses(name: str, env: dict) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        threads = env.get("GOLDEN_THREADS", "1")
        out = subprocess.run([sys.executable, "-c", RUN, name, tmp, threads], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": threads, **env})
    line = [x for x in out.stdout.splitlines() if x.startswith("LOSSES ")]
    if out.returncode or not line:
        raise SystemExit(f"{name} under {env} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_golden as g

    print("| configuration | " + " | ".join(MACHINES) + " |")
    print("|---|" + "---|" * len(MACHINES))
    worst = 0.0
    for name, (_, pinned) in g.GOLDEN.items():
        drifts = [max(abs(a - b) for a, b in zip(losses(name, env), pinned)) for env in MACHINES.values()]
        worst = max(worst, *drifts)
        print(f"| {name} | " + " | ".join(f"{d:.1e}" for d in drifts) + " |", flush=True)
    for name in g.CONTROLS:  # what a real change moves (this CPU only)
        pinned = g.CONTROLS[name][0]
        move = max(abs(a - b) for a, b in zip(losses(name, {}), g.GOLDEN[pinned][1]))
        print(f"| control: {name} (vs {pinned}) | {move:.1e} |" + " |" * (len(MACHINES) - 1), flush=True)
    print(f"\nlargest drift {worst:.1e}; tests/test_golden.py: TOLERANCE {g.TOLERANCE}, controls must move {g.CONTROL_MARGIN}x that")


if __name__ == "__main__":
    main()
