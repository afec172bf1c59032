"""The "what works" table of docs/results.md, computed from the committed per-problem outcomes.

    python tools/what_works.py                    # prints the table
    python tools/what_works.py --write docs/results/what_works.md

For each technique (an arm of a sweep) and lab setting: the paired difference in answer accuracy to the
sweep's baseline arm, and backtracking's own effect (the same model decoded with BT allowed vs banned:
wrong->right minus right->wrong), in and out of distribution, each with its 95% CI: the two-level bootstrap
(seeds, then problems) widened to the t interval over the seeds' own values (halluc/core/stats.py). Bold:
resolved (the CI excludes 0, over 3 or more seeds). Only sweeps whose
outcomes file exists (docs/results/<sweep>.outcomes.jsonl.gz) appear; nothing is trained. Bootstrapping
the committed outcomes takes about 45 s on 2 CPU cores (a progress bar on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# (sweep, arm, what it is): the technique each row stands for, in the order of docs/results.md
ROWS = [
    ("first_results", "masked", "masked SFT on synthetic step errors (1, 2)"),
    ("first_results", "unmasked", "the same, error tokens trained"),
    ("first_results", "block_errors", "+ hard mask and rewinding inference (4, 9)"),
    ("own_errors", "own", "the model's own errors (5)"),
    ("own_errors", "both", "own and synthetic errors, half each"),
    ("own_errors", "aligned", "own errors located by alignment (N-MARS)"),
    ("own_errors", "curriculum", "curriculum (3)"),
    ("dpo", "sigmoid_lr2e-5", "DPO on own-error pairs (6)"),
    ("dpo", "tdpo2_lr2e-5", "TDPO2 (6)"),
    ("dpo", "balanced", "DPO with balanced pairs"),
    ("dpo", "balanced_rpo", "balanced pairs + the chosen side's NLL (RPO)"),
    ("dpo", "step", "Step-DPO pairs (no BTs)"),
    ("verifiers", "prm_guided", "PRM-guided decoding (7)"),
    ("verifiers", "head_guided", "verifier-head-guided decoding (10)"),
    ("verifiers", "prm_best_of_2", "best-of-2 with the PRM (7)"),
    ("verifiers", "oracle_guided", "oracle-guided decoding (the skyline)"),
    ("mcts", "mcts", "MCTS traces (8)"),
    ("retry_pretraining", "retry_0.2/base", "a base pretrained on retry data, rate 0.2 (vs the clean base)"),
    ("retry_pretraining", "retry_0.2", "retry pretraining, rate 0.2, then clean SFT"),
    ("retry_pretraining", "retry_0.2_any", "retry pretraining with the lab's plausible wrong steps, rate 0.2, then clean SFT"),
    ("retry_pretraining", "retry_0.5/base", "a base pretrained on retry data, rate 0.5 (vs the clean base)"),
    ("retry_pretraining", "retry_0.5", "retry pretraining, rate 0.5, then clean SFT"),
    ("retry_pretraining", "retry_0.2_masked/base", "a base pretrained on retry data, rate 0.2, errors masked (vs the clean base)"),
    ("retry_pretraining", "retry_0.2_then_masked", "the main job from a retry-pretrained base (rate 0.2)"),
    ("retry_pretraining", "retry_0.2_any_then_masked", "the main job from a base pretrained on the lab's plausible wrong steps (rate 0.2)"),
    ("retry_pretraining", "ft_lora_masked", "a clean base fine-tuned on retry data, LoRA, masked (P2.2)"),
    ("retry_pretraining", "ft_full", "a clean base fine-tuned on retry data, all weights, unmasked (P2.2)"),
    ("grpo", "grpo", "GRPO from masked SFT, answer + BT reward, lr 2e-5"),
    ("grpo", "grpo_lr3e-4", "GRPO from masked SFT, answer + BT reward, lr 3e-4"),
    ("grpo", "grpo_answer_only_lr3e-4", "the same, answer reward only"),
    ("grpo", "lab_base_grpo", "GRPO from the lab base with a BT token (vs masked SFT, which the base alone beats by 12.2 on swapped)"),
    ("grpo_baselines", "vote_8", "majority vote over 8 samples of masked SFT (vs its greedy decode)"),
]


def _cell(e: dict | None) -> str:
    if e is None:
        return "n/a"
    text = f"{100 * e['value']:+.1f} [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"
    return f"**{text}**" if e["resolved"] else text


def table(results_dir: Path = ROOT / "docs" / "results", sweeps_dir: Path = ROOT / "recipes/configs/sweeps") -> str:
    from sweep import read_sweep

    from halluc.pipeline.report import analyse, read_outcomes

    from tqdm.auto import tqdm

    analysed, lines = {}, []
    names = [n for n in dict.fromkeys(s for s, _, _ in ROWS) if (results_dir / f"{n}.outcomes.jsonl.gz").exists()]
    for name in tqdm(names, desc="bootstrapping the sweeps' outcomes", unit="sweep", file=sys.stderr):
        sweep = read_sweep(str(sweeps_dir / f"{name}.yaml"))
        # only the rows' arms (an "ARM/base" row is ARM's own base) and the baseline, two metrics: the
        # estimates are the full report's (each draws from its own seed), at a fraction of the cost
        needed = {arm.removesuffix("/base") for s, arm, _ in ROWS if s == name} | {sweep.baseline}
        sweep = dataclasses.replace(sweep, arms={a: o for a, o in sweep.arms.items() if a in needed},
                                    own_base=[a for a in sweep.own_base if a in needed])
        records = [r for r in read_outcomes(results_dir / f"{name}.outcomes.jsonl.gz") if r["arm"] in needed]
        analysed[name] = (sweep, analyse(sweep, records, metrics=("answer_acc", "bt_gain")))
    lines += ["| technique (sweep: arm) | setting | baseline | Δ answer acc, ID | Δ answer acc, OOD "
              "| BT's own effect, ID | BT's own effect, OOD |", "|---|---|---|---|---|---|---|"]
    for name, arm, what in ROWS:
        if name not in analysed:
            continue
        sweep, results = analysed[name]
        for setting, entry in results.items():
            if arm not in entry["arms"]:
                continue
            diff = entry["vs_baseline"].get(arm, {})
            own = entry["arms"][arm]
            cells = [_cell(diff.get(split, {}).get("answer_acc")) for split in ("test_id", "test_ood")]
            cells += [_cell(own.get(split, {}).get("bt_gain")) for split in ("test_id", "test_ood")]
            against = "base" if arm.endswith("/base") else sweep.baseline  # an arm's own base: vs the shared one
            lines.append(f"| {what} ({name}: `{arm}`) | {setting} | `{against}` | " + " | ".join(cells) + " |")
    lines += ["", "BT's own effect: the same model decoded with BT allowed minus BT banned (wrong->right minus "
              "right->wrong). The `verifiers` arms decode the baseline's own weights differently, so their "
              "accuracy difference is itself the effect of the verifier's BTs (n/a in the last columns)."]
    missing = sorted({s for s, _, _ in ROWS} - set(analysed))
    if missing:
        lines += ["", "Not in the table yet (no committed outcomes): " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", default=None, metavar="FILE", help="also write the table to FILE")
    args = p.parse_args(argv)
    text = table()
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from halluc.core.inputs import run_cli

    run_cli(main)
