"""The report of a sweep (tools/sweep.py): results.json, results.md and plots, from the runs' eval.json.

Each run's eval.json holds, per split, one entry per test problem (`per_problem`); a unit is
one problem of one seed, and every statistic comes from halluc.core.stats (scipy's bootstrap).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from halluc.core.stats import (Estimate, mean_estimate, mean_of_differences, paired_mean_difference,
                               paired_ratio_difference, ratio_estimate, unpaired_resolution)

# metric -> ("mean", per-problem field) or ("ratio", numerator field, denominator field)
METRICS = {
    "answer_acc": ("mean", "answer_correct"),
    "full_solution_acc": ("mean", "full_solution"),
    # detection of the model's own errors (issue 23): first runs, first-pass errors; runs written before
    # these fields existed have none and get no estimate (their old definitions rewarded self-inflicted errors)
    "bt_precision": ("ratio", "first_run_justified", "first_run"),
    "bt_recall": ("ratio", "first_pass_caught", "first_pass_error"),
    "wasted_per_problem": ("mean", "wasted"),
    "runs_over_right_per_problem": ("mean", "runs_over_right"),  # BT runs over right text (after a right step)
    # backtracking's own effect (issue 23): the same model decoded with BT banned, same seed
    "answer_acc_bt_banned": ("mean", "answer_correct_bt_banned"),
    "bt_gain": ("mean", "bt_gain"),             # wrong->right minus right->wrong, per problem
    "wrong_to_right": ("mean", "wrong_to_right"),
    "right_to_wrong": ("mean", "right_to_wrong"),
    "tokens_per_problem": ("mean", "tokens"),  # generated tokens, BTs included (all N samples of best-of-N)
}
# metrics that are themselves a paired difference (BT allowed minus banned, per problem): their interval
# is widened as a difference's is, since "resolved" is said of them (halluc/core/stats.py)
DIFFERENCES = {"bt_gain"}
PERCENT = {"answer_acc", "full_solution_acc", "bt_precision", "bt_recall", "answer_acc_bt_banned", "bt_gain",
           "wrong_to_right", "right_to_wrong"}
TITLES = {"answer_acc": "answer acc", "full_solution_acc": "full solution", "bt_precision": "BT precision",
          "bt_recall": "BT recall", "wasted_per_problem": "wasted / problem", "tokens_per_problem": "tokens / problem",
          "answer_acc_bt_banned": "acc, BT banned", "bt_gain": "BT's own gain", "wrong_to_right": "wrong->right",
          "right_to_wrong": "right->wrong", "runs_over_right_per_problem": "BT runs over right text / problem"}
BASE = "base"  # what every arm of a seed starts from (before SFT, DPO, ...), as an arm


def outcomes(runs) -> list[dict]:
    """What a report is computed from, per finished run: its setting, arm, seed, and per split of its
    evaluations before and after, the per-problem outcomes and first-error kinds (no samples)."""
    out = []
    for run in sorted(runs, key=lambda r: (r.setting, r.arm, r.seed)):
        report = json.loads((run.out / "eval.json").read_text())
        out.append({"setting": run.setting, "arm": run.arm, "seed": run.seed,
                    **{stage: {split: {"per_problem": m["per_problem"], "first_error_kinds": m["first_error_kinds"]}
                               for split, m in (report[stage] or {}).items()} for stage in ("before", "after")}})
    return out


def write_outcomes(records: list[dict], path: Path) -> Path:
    """One JSON line per run, gzipped (a few MB for a whole sweep): commit it beside the report, and
    anyone can recompute every table (`tools/sweep.py --outcomes FILE`) without training."""
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def read_outcomes(path) -> list[dict]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _with_derived(fields: dict) -> dict:
    """Per-problem fields a run written before them can still give: BT runs over right text = runs - justified."""
    if "runs_over_right" not in fields and {"runs", "justified"} <= set(fields):
        fields = {**fields, "runs_over_right": [r - j for r, j in zip(fields["runs"], fields["justified"])]}
    return fields


BASE_SETTINGS = ("base.", "base_retry.", "tiny.")  # an arm that sets one of these trains a base of its own


def own_base_arms(arms: dict[str, list[str]]) -> set[str]:
    """The arms of a sweep that train their own base (e.g. retry pretraining: base_retry.rate=0.2)."""
    return {arm for arm, overrides in arms.items() if any(o.split("=")[0].startswith(BASE_SETTINGS) for o in overrides)}


def collect(records: list[dict], arm_order: list[str], own_base: set[str] = frozenset()) -> tuple[dict, dict]:
    """({setting: {arm: {seed: {split: per_problem}}}}, {setting: {arm: {split: first-error kinds}}})
    from `outcomes` records, with the base (what the arms start from) as the first arm, "base"; an arm
    in `own_base` trained a base of its own, reported as the arm "ARM/base" after it. Kinds are summed
    over seeds."""
    table: dict = {}
    kinds: dict = {}
    for rec in sorted(records, key=lambda r: (r["setting"], r["seed"])):
        setting, seed = rec["setting"], rec["seed"]
        arms = table.setdefault(setting, {BASE: {}})
        own = f"{rec['arm']}/base" if rec["arm"] in own_base else BASE
        for arm, stage in ((rec["arm"], "after"), (own, "before")):
            per_problem = {split: _with_derived(m["per_problem"]) for split, m in rec[stage].items()}
            if arm == BASE and seed in arms[BASE]:  # every other arm of a seed shares the base ...
                if per_problem != arms[BASE][seed]:
                    raise ValueError(f"{setting}, seed {seed}: arm {rec['arm']} started from another base "
                                     "than the other arms (an arm that changes base.*, tiny.*, max_len or model?): "
                                     "its paired comparison would mix bases")
                continue  # ... and its evaluation
            arms.setdefault(arm, {})[seed] = per_problem
            for split, m in rec[stage].items():
                counts = kinds.setdefault(setting, {}).setdefault(arm, {}).setdefault(split, {})
                for kind, n in m["first_error_kinds"].items():
                    counts[kind] = counts.get(kind, 0) + n
    order = [BASE] + [name for arm in arm_order for name in ([arm, f"{arm}/base"] if arm in own_base else [arm])]
    rank = {arm: i for i, arm in enumerate(order)}
    table = {setting: dict(sorted(arms.items(), key=lambda kv: rank.get(kv[0], len(order))))
             for setting, arms in table.items()}
    return table, kinds


def _units(by_seed: dict, split: str, seeds: list[int], key: str) -> np.ndarray:
    return np.concatenate([np.asarray(by_seed[s][split][key], dtype=float) for s in seeds])


def _measured(by_seed: dict, split: str, seeds: list[int], keys) -> bool:
    """Runs written before a metric existed lack its per-problem field: no estimate then."""
    return all(k in by_seed[s][split] for s in seeds for k in keys)


def estimate(by_seed: dict, split: str, seeds: list[int], metric: str) -> Estimate | None:
    kind, *keys = METRICS[metric]
    if not _measured(by_seed, split, seeds, keys):
        return None
    unit_seed = np.concatenate([[s] * len(by_seed[s][split][keys[0]]) for s in seeds])
    arrays = [_units(by_seed, split, seeds, k) for k in keys]
    if metric in DIFFERENCES:
        return mean_of_differences(arrays[0], unit_seed)
    return (mean_estimate if kind == "mean" else ratio_estimate)(*arrays, unit_seed)


def difference(arm: dict, base: dict, split: str, seeds: list[int], metric: str) -> Estimate | None:
    kind, *keys = METRICS[metric]
    if not (_measured(arm, split, seeds, keys) and _measured(base, split, seeds, keys)):
        return None
    arm = {s: {split: paired_by_id(arm[s][split], base[s][split], f"seed {s}, {split}")} for s in seeds}
    unit_seed = np.concatenate([[s] * len(base[s][split][keys[0]]) for s in seeds])
    a = [_units(arm, split, seeds, k) for k in keys]
    b = [_units(base, split, seeds, k) for k in keys]
    if kind == "mean":
        return paired_mean_difference(a[0], b[0], unit_seed)
    return paired_ratio_difference(a[0], a[1], b[0], b[1], unit_seed)


def paired_by_id(arm: dict, base: dict, where: str) -> dict:
    """The arm's per-problem fields in the baseline's problem order, matched by problem id (runs from
    before ids were recorded: by position, same count required). Different problems are refused: a
    paired difference over them would compare other problems."""
    n = len(next(iter(base.values())))
    if "id" not in arm or "id" not in base:
        if len(next(iter(arm.values()))) != n:
            raise ValueError(f"{where}: the arms were evaluated on different problems")
        return arm
    if sorted(arm["id"]) != sorted(base["id"]):
        missing = len(set(base["id"]) - set(arm["id"]))
        raise ValueError(f"{where}: the arms were evaluated on different problems ({missing} of the baseline's "
                         f"{n} problems are not in the arm's evaluation)")
    at: dict[str, list[int]] = {}
    for i, pid in enumerate(arm["id"]):  # a prompt listed twice: its copies match in order
        at.setdefault(pid, []).append(i)
    order = [at[pid].pop(0) for pid in base["id"]]
    return {k: [v[i] for i in order] for k, v in arm.items()}


def analyse(sweep, records: list[dict], metrics=METRICS) -> dict:
    """Per setting: every arm's estimates and its paired difference to the baseline, for `metrics`
    (names of METRICS; each estimate draws from its own fixed seed, so a subset gives the same numbers)."""
    results = {}
    own = own_base_arms(sweep.arms) | set(getattr(sweep, "own_base", []))  # declared: e.g. another starting policy
    table, kinds = collect(records, list(sweep.arms), own)
    for setting, arms in table.items():
        if not arms[BASE]:  # every arm trained its own base
            del arms[BASE]
        base_arm = arms.get(sweep.baseline, {})
        splits = sorted({split for by_seed in arms.values() for per in by_seed.values() for split in per})
        entry = {"overrides": sweep.settings.get(setting, []), "arms": {}, "vs_baseline": {}, "n_units": {},
                 "first_error_kinds": kinds[setting]}
        for arm, by_seed in arms.items():
            seeds = sorted(by_seed)
            entry["arms"][arm] = {split: {m: _dict(estimate(by_seed, split, seeds, m)) for m in metrics}
                                  for split in splits}
            entry["arms"][arm]["seeds"] = seeds
            # an arm's own base is compared with the shared base (or the baseline arm's own base)
            against = arms.get(BASE) or arms.get(f"{sweep.baseline}/base", {}) if arm.endswith("/base") else base_arm
            paired = sorted(set(by_seed) & set(against))
            if arm != sweep.baseline and by_seed is not against and paired:
                entry["vs_baseline"][arm] = {split: {m: _dict(difference(by_seed, against, split, paired, m))
                                                     for m in metrics} for split in splits}
                entry["vs_baseline"][arm]["seeds"] = paired
        for split in splits:
            seeds = sorted(base_arm) or sorted(next(iter(arms.values())))
            source = base_arm or next(iter(arms.values()))
            entry["n_units"][split] = int(sum(len(source[s][split]["answer_correct"]) for s in seeds))
        results[setting] = entry
    return results


def _dict(e: Estimate | None) -> dict | None:
    return None if e is None else {**e.as_dict(), "resolved": e.resolved()}


def _cell(e: dict | None, metric: str, signed: bool = False) -> str:
    if e is None:
        return "n/a"
    scale, unit = (100, "") if metric in PERCENT else (1, "")
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = f"{fmt.format(scale * e['value'])}{unit} [{fmt.format(scale * e['low'])}, {fmt.format(scale * e['high'])}]"
    if signed:
        per_seed = " / ".join("n/a" if v is None else fmt.format(scale * v) for v in e["per_seed"])
        text += f" ({per_seed})" + (" **resolved**" if e["resolved"] else "")
    return text


def markdown(sweep, results: dict, wall: list[dict]) -> str:
    lines = [f"# Results: {sweep.name}", ""]
    if sweep.note:
        lines += [sweep.note.strip(), ""]
    total = sum(w["seconds"] for w in wall)
    commands = sorted({w["command"] for w in wall})
    lines += [f"Recipe `{sweep.recipe}`, seeds {sweep.seeds}, baseline arm `{sweep.baseline}`; common settings "
              f"`{' '.join(sweep.common) or '(none)'}`.",
              f"Made by `{commands[0] if commands else 'python tools/sweep.py ' + sweep.name}`"
              f" ({len(wall)} invocation(s), {total / 60:.1f} min wall in all).", "",
              "Cells: value [95% CI]. Accuracies, precision and recall in %, wasted tokens per problem as counts. "
              "A unit is one test problem of one seed; CIs are a paired two-level percentile bootstrap: seeds "
              "(training runs) with replacement, then the problems within each; a difference's CI is also widened to "
              "Student's t interval over the seeds' own differences, since 3 runs make the bootstrap too narrow "
              "(halluc/core/stats.py; with one "
              "seed, problems only). Differences are `arm - baseline` on the same problems, followed by each seed's "
              "own difference; **resolved** = the CI excludes 0, over 3 or more seeds. BT precision = first "
              "BT runs that erase an error / problems with a run; recall = errors in the text written before the "
              "first BT run that this run erases / problems with such an error (errors made after backtracking "
              "began are not detection skill) "
              "(docs/generation.md). `base` is what every arm of a seed starts from, before the recipe trains: "
              "the pretrained model for masked SFT and self-correction rounds, the model DPO or GRPO starts from, "
              "the policy decoded plainly for the PRM recipe. n/a: not measured (no BT token) or undefined (no BT "
              "run, no error to catch). BT's own gain: the same model decoded with BT allowed minus BT banned, "
              "problem by problem (wrong->right minus right->wrong).", ""]
    for setting, entry in results.items():
        lines += [f"## Setting `{setting}`" + (f": `{' '.join(entry['overrides'])}`" if entry["overrides"] else ""), ""]
        for split, n in entry["n_units"].items():
            lines += [f"### {split} ({n} units)", "",
                      "| arm | " + " | ".join(TITLES[m] for m in METRICS) + " |",
                      "|---|" + "---|" * len(METRICS)]
            for arm, per in entry["arms"].items():
                lines.append(f"| {arm} | " + " | ".join(_cell(per[split][m], m) for m in METRICS) + " |")
            diffs = entry["vs_baseline"]
            if diffs:
                seed_sets = sorted({tuple(per["seeds"]) for per in diffs.values()})
                lines += ["", f"Paired differences to `{sweep.baseline}` (an `ARM/base` row: to `base`, the base "
                          "the other arms share); in brackets the 95% CI, in parentheses "
                          f"each seed's own difference, seeds {' or '.join(map(str, map(list, seed_sets)))}:", "",
                          "| arm - baseline | " + " | ".join("Δ " + TITLES[m] for m in METRICS) + " |",
                          "|---|" + "---|" * len(METRICS)]
                for arm, per in diffs.items():
                    lines.append(f"| {arm} | " + " | ".join(_cell(per[split][m], m, signed=True) for m in METRICS) + " |")
                widths = [per[split]["answer_acc"]["high"] - per[split]["answer_acc"]["low"]
                          for per in diffs.values() if per[split]["answer_acc"]]
                if widths:
                    lines += ["", f"Smallest difference these sizes resolve ({split}): paired answer-accuracy CIs "
                              f"are ±{50 * float(np.median(widths)):.1f} points (median half-width); without "
                              f"pairing, two proportions near 50% over {n} units each need "
                              f"±{100 * unpaired_resolution(n):.1f} points."]
            lines.append("")
        lines += ["### First errors", "",
                  "The first step the verifier rejects in each final visible text, counted over all seeds "
                  "(the error kinds of halluc/tasks/arith.py).", "",
                  "| arm | " + " | ".join(entry["n_units"]) + " |", "|---|" + "---|" * len(entry["n_units"])]
        for arm in entry["arms"]:
            by_split = entry["first_error_kinds"].get(arm, {})
            cells = [", ".join(f"{k} {n}" for k, n in sorted(by_split.get(split, {}).items(), key=lambda kv: -kv[1]))
                     or "none" for split in entry["n_units"]]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, baseline: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    written = []
    settings = list(results)
    splits = sorted({split for entry in results.values() for split in entry["n_units"]})
    key = [Patch(color="tab:gray", label=f"{baseline} / {BASE}"), Patch(color="tab:blue", label="other arms"),
           Line2D([], [], color="black", label="95% CI (seeds, then problems; differences: and the seeds' t)"),
           Line2D([], [], marker="o", ls="", ms=4, color="tab:orange", label="each seed")]
    for metric_group, name, what in ((("answer_acc", "full_solution_acc"), "accuracy.png", "accuracy"),
                                     (("bt_precision", "bt_recall"), "backtracking.png", "BT precision and recall")):
        fig, axes = plt.subplots(len(settings), len(splits) * len(metric_group), squeeze=False,
                                 figsize=(4.2 * len(splits) * len(metric_group), 1.1 + 2.9 * len(settings)))
        for i, setting in enumerate(settings):
            arms = results[setting]["arms"]
            for j, (split, metric) in enumerate((s, m) for s in splits for m in metric_group):
                ax = axes[i][j]
                drawn = 0
                for k, (arm, per) in enumerate(arms.items()):
                    e = per.get(split, {}).get(metric)
                    if e is None:
                        continue
                    drawn += 1
                    ax.bar(k, 100 * e["value"], color="tab:gray" if arm in (baseline, BASE) else "tab:blue")
                    ax.errorbar(k, 100 * e["value"], yerr=[[100 * (e["value"] - e["low"])], [100 * (e["high"] - e["value"])]],
                                color="black", capsize=3)
                    seeds = [100 * v for v in e["per_seed"] if v is not None]
                    ax.scatter([k] * len(seeds), seeds, s=8, color="tab:orange", zorder=3)  # each seed
                ax.set_xticks(range(len(arms)), list(arms), rotation=40, ha="right", fontsize=7)
                ax.set_title(f"{setting} / {split}: {TITLES[metric]}", fontsize=8)
                ax.set_ylabel("%", fontsize=7)
                ax.set_ylim(0, max(5.0, ax.get_ylim()[1]))  # all zeros: not matplotlib's +-0.04 on a % axis
                if not drawn:
                    ax.text(0.5, 0.5, "n/a: no arm has a value\n(no BT written, or no error to catch)",
                            transform=ax.transAxes, ha="center", va="center", fontsize=7, color="gray")
        fig.suptitle(f"{what} per arm: mean of the seeds", fontsize=9)
        fig.legend(handles=key, loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, axes = plt.subplots(len(settings), len(splits), squeeze=False,
                             figsize=(5.5 * len(splits), 0.6 + 2.6 * len(settings)))
    for i, setting in enumerate(settings):
        diffs = results[setting]["vs_baseline"]
        for j, split in enumerate(splits):
            ax = axes[i][j]
            for k, (arm, per) in enumerate(diffs.items()):
                for off, metric, color in ((-0.15, "answer_acc", "tab:blue"), (0.15, "full_solution_acc", "tab:green")):
                    e = per[split][metric]
                    if e is None:
                        continue
                    ax.errorbar(100 * e["value"], k + off, xerr=[[100 * (e["value"] - e["low"])], [100 * (e["high"] - e["value"])]],
                                fmt="o", color=color, capsize=3, label=TITLES[metric] if k == 0 else None)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(diffs)), list(diffs), fontsize=7)
            ax.set_title(f"{setting} / {split}: arm - {baseline}", fontsize=8)
            ax.set_xlabel("paired difference, points (95% CI; crossing 0: not resolved)", fontsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"each arm against {baseline}, problem by problem", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "differences.png", dpi=110)
    plt.close(fig)
    return written + [out / "differences.png"]


def write_report(sweep, records: list[dict], out: Path) -> dict[str, Path]:
    """results.json, results.md, plots and outcomes.jsonl.gz (the records they are computed from)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = analyse(sweep, records)
    wall_file = out / "wall.jsonl"
    wall = [json.loads(line) for line in wall_file.read_text().splitlines()] if wall_file.exists() else []
    (out / "results.json").write_text(json.dumps({"sweep": sweep.__dict__, "wall": wall, "settings": results}, indent=1))
    (out / "results.md").write_text(markdown(sweep, results, wall))
    paths = {"json": out / "results.json", "md": out / "results.md",
             "outcomes": write_outcomes(records, out / "outcomes.jsonl.gz")}
    if results:
        for p in plots(results, sweep.baseline, out):
            paths[p.stem] = p
    return paths
