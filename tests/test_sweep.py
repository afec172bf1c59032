"""The experiment runner end to end on a tiny sweep: runs, report, resume, fast failures."""
import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, load_script

TINY = ["base.steps=20", "sft.steps=6", "base.batch_size=8", "sft.batch_size=8", "lab.train_size=200",
        "lab.sft_size=100", "lab.test_size=12", "tiny.hidden=32", "eval_max_new_tokens=30"]


def write_sweep(path, arms, **extra):
    path.write_text(yaml.safe_dump({"name": "tiny", "recipe": "recipes/masked_sft.py", "baseline": "clean",
                                    "seeds": [0, 1], "common": TINY, "arms": arms, **extra}))
    return path


def sweep(*args, timeout=600):
    return subprocess.run([sys.executable, "tools/sweep.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_sweep_runs_reports_and_resumes(tmp_path):
    spec = write_sweep(tmp_path / "tiny.yaml", {"clean": ["errors.source=none"], "masked": []},
                       settings={"default": [], "swapped": ["lab.listing=swapped", "lab.swap_rate=0.5"]})
    out = tmp_path / "out"
    # --arms/--settings run a part of the sweep; the rest runs on the next invocation
    part = sweep(spec, "--out", out, "--jobs", "2", "--threads", "1", "--arms", "clean", "--settings", "swapped")
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    assert "2 runs: 0 finished already, 2 to run" in part.stdout
    assert sorted(p.parent.name for p in out.glob("*/*/seed-*/eval.json")) == ["seed-0", "seed-1"]
    assert len(list(out.glob("swapped/clean/seed-*/eval.json"))) == 2
    first = sweep(spec, "--out", out, "--jobs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "8 runs: 2 finished already, 6 to run" in first.stdout
    evals = sorted(out.glob("*/*/seed-*/eval.json"))
    assert len(evals) == 8
    # one base per seed, shared by both settings and both arms
    assert len(list((out / "cache").glob("base-*/config.json"))) == 2
    results = json.loads((out / "results.json").read_text())["settings"]
    assert set(results) == {"default", "swapped"}
    for entry in results.values():
        assert set(entry["arms"]) == {"clean", "masked", "base"} and set(entry["vs_baseline"]) == {"masked", "base"}
        assert entry["n_units"] == {"test_id": 24, "test_ood": 24}
        acc = entry["arms"]["masked"]["test_id"]["answer_acc"]
        assert acc["low"] <= acc["value"] <= acc["high"] and len(acc["per_seed"]) == 2
    # the same problems under both listings, listed differently
    default = json.loads((out / "default/clean/seed-0/eval.json").read_text())["after"]["test_id"]["samples"]
    swapped = json.loads((out / "swapped/clean/seed-0/eval.json").read_text())["after"]["test_id"]["samples"]
    assert [s["prompt"] for s in default] != [s["prompt"] for s in swapped]
    md = (out / "results.md").read_text()
    assert "## Setting `swapped`" in md and "Paired differences to `clean`" in md and "Smallest difference" in md
    for png in ("accuracy.png", "backtracking.png", "differences.png"):
        assert (out / png).stat().st_size > 1000
    # issue 23: the per-problem outcomes are written beside the report, and the report comes back from
    # them alone (no runs), the same numbers
    from_outcomes = sweep(spec, "--outcomes", out / "outcomes.jsonl.gz", "--out", tmp_path / "recomputed")
    assert from_outcomes.returncode == 0, from_outcomes.stderr[-3000:]
    assert json.loads((tmp_path / "recomputed" / "results.json").read_text())["settings"] == results
    assert (out / "outcomes.jsonl.gz").stat().st_size < 200_000

    # a second invocation finds every run finished and only reports
    stamps = [p.stat().st_mtime for p in evals]
    again = sweep(spec, "--out", out, "--jobs", "2")
    assert again.returncode == 0 and "8 runs: 8 finished already, 0 to run" in again.stdout
    assert [p.stat().st_mtime for p in evals] == stamps
    # a killed sweep: a run without eval.json runs again, the others are kept. The runs above were
    # forked from the runner (Linux, CPU torch); this one runs in its own process and must measure
    # exactly what its forked twin measured
    killed = out / "swapped/masked/seed-1/eval.json"
    forked = json.loads(killed.read_text())["after"]
    killed.unlink()
    resumed = sweep(spec, "--out", out, "--jobs", "2", "--launch", "process")
    assert "8 runs: 7 finished already, 1 to run" in resumed.stdout and "done   swapped/masked/seed-1" in resumed.stdout
    assert json.loads(killed.read_text())["after"] == forked
    assert len((out / "wall.jsonl").read_text().splitlines()) == 4
    # an arm edited since is not finished: its runs would run again (the others stay finished)
    runner = load_script("tools/sweep.py")
    edited = runner.read_sweep(str(write_sweep(tmp_path / "edited.yaml", {"clean": ["errors.source=none"],
                                                                          "masked": ["sft.lr=0.002"]},
                                               settings={"default": [], "swapped": ["lab.listing=swapped",
                                                                                    "lab.swap_rate=0.5"]})))
    runs = runner.plan(edited, out)
    runner.check_settings(edited, runs)
    assert sorted(r.name for r in runs if not r.finished) == sorted(
        f"{setting}/masked/seed-{seed}" for setting in ("default", "swapped") for seed in (0, 1))
    # a run saved before a setting existed is finished unless this sweep sets that setting itself
    done = next(r for r in runs if r.finished)
    report = json.loads((done.out / "eval.json").read_text())
    del report["config"]["sft"]["lr"]
    (done.out / "eval.json").write_text(json.dumps(report))
    assert done.finished  # sft.lr is no override of this run: the default it had then
    done.args = [*done.args, f"sft.lr={done.settings['sft.lr']}"]
    assert not done.finished  # set here, and the saved run cannot say it had it


def test_a_bad_arm_fails_before_anything_runs(tmp_path):
    spec = write_sweep(tmp_path / "bad.yaml", {"clean": ["errors.source=none"], "broken": ["layout.attention=foo"]})
    result = sweep(spec, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "default/broken/seed-0" in result.stderr and "layout.attention='foo': choose one of causal, block_errors" in result.stderr
    assert not (tmp_path / "out").exists()
    result = sweep(spec, "--out", tmp_path / "out", "--arms", "clean", "cleen")
    assert result.returncode != 0 and "--arms names ['cleen'], not in the sweep's ['broken', 'clean']" in result.stderr
    missing = write_sweep(tmp_path / "nobase.yaml", {"masked": []})
    result = sweep(missing, "--out", tmp_path / "out")
    assert "baseline 'clean' is not one of the arms" in result.stderr


@pytest.mark.parametrize("extra, message", [
    ({"seeds": 0}, "seeds must be a list of non-negative integers (seeds: [0, 1, 2]), got 0"),  # was a TypeError
    ({"seeds": []}, "seeds must be a list of non-negative integers"),
    ({"seeds": [0, "1"]}, "seeds must be a list of non-negative integers"),
    ({"common": "sft.steps=3"}, "common must be a list of key=value strings"),
    ({"settings": ["lab.listing=swapped"]}, "settings must map names to lists of key=value strings"),
])
def test_a_sweep_file_of_the_wrong_shape_is_one_line(tmp_path, extra, message):
    runner = load_script("tools/sweep.py")
    spec = write_sweep(tmp_path / "bad.yaml", {"clean": ["errors.source=none"]}, **extra)
    with pytest.raises(SystemExit, match=re.escape(message)):
        runner.read_sweep(str(spec))


def test_a_report_with_no_finished_run_is_refused(tmp_path):
    """Issue 22, item 5: --report-only where nothing ran says so and exits 2 (it wrote an empty report)."""
    spec = write_sweep(tmp_path / "tiny.yaml", {"clean": ["errors.source=none"]})
    result = sweep(spec, "--out", tmp_path / "out", "--report-only")
    assert result.returncode == 2 and "no finished run" in result.stderr
    assert not (tmp_path / "out" / "results.md").exists()


@pytest.mark.slow
def test_report_only_without_runs_reads_the_committed_outcomes(tmp_path):
    """Issue 23: `--report-only` where no run finished reports from docs/results/<name>.outcomes.jsonl.gz
    when the sweep has one committed (here the first results, seed 0 only to keep it short)."""
    import shutil

    from conftest import ROOT

    if not (ROOT / "docs/results/first_results.outcomes.jsonl.gz").exists():
        pytest.skip("no committed first_results outcomes")
    spec = tmp_path / "first_results.yaml"
    shutil.copy(ROOT / "recipes/configs/sweeps/first_results.yaml", spec)
    result = sweep(spec, "--out", tmp_path / "out", "--report-only", "--seeds", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from the committed outcomes" in result.stderr
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## Setting `default`" in report and "| masked |" in report


def test_the_what_works_table_comes_from_committed_outcomes(tmp_path):
    """tools/what_works.py: per technique and setting, the paired accuracy difference to the sweep's
    baseline and backtracking's own effect, bold only when resolved; sweeps without outcomes are named."""
    import random

    from conftest import load_script

    from halluc.pipeline.report import write_outcomes

    (tmp_path / "first_results.yaml").write_text(
        "name: first_results\nrecipe: recipes/masked_sft.py\nbaseline: clean_sft\nseeds: [0, 1, 2]\n"
        "arms:\n  clean_sft: [errors.source=none]\n  masked: []\n")
    rng = random.Random(0)

    def split(p_right, gain):
        right = [int(rng.random() < p_right) for _ in range(300)]
        return {"per_problem": {"id": [f"p{i}" for i in range(300)], "answer_correct": right,
                                "bt_gain": [gain if r else 0 for r in right]}, "first_error_kinds": {}}

    base = {s: {"test_id": split(0.5, 0), "test_ood": split(0.2, 0)} for s in range(3)}
    records = []
    for s in range(3):
        records.append({"setting": "default", "arm": "clean_sft", "seed": s, "before": base[s],
                        "after": {"test_id": split(0.5, 0), "test_ood": split(0.2, 0)}})
        records.append({"setting": "default", "arm": "masked", "seed": s, "before": base[s],
                        "after": {"test_id": split(0.9, 1), "test_ood": split(0.2, 0)}})
    write_outcomes(records, tmp_path / "first_results.outcomes.jsonl.gz")
    text = load_script("tools/what_works.py").table(results_dir=tmp_path, sweeps_dir=tmp_path)
    row = next(line for line in text.splitlines() if "`masked`" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:3] == ["default", "`clean_sft`"]
    assert cells[3].startswith("**+") and 35 < float(cells[3][3:7]) < 45 and not cells[4].startswith("**")  # ~+40 resolved
    assert cells[5].startswith("**+8")  # BT's own gain: +1 on every right problem (~90%)
    assert "Not in the table yet" in text and "`dpo`" in text


def test_a_half_written_eval_json_is_a_run_to_do_again(tmp_path):
    """A kill while eval.json was written left a file json cannot read: the resumed sweep stopped on it."""
    runner = load_script("tools/sweep.py")
    run = runner.Run("default", "a", 0, tmp_path, [])
    assert not run.finished
    (tmp_path / "eval.json").write_text('{"config": {"seed": 0}, "after": {')
    assert not run.finished
    (tmp_path / "eval.json").write_text('{"config": {"seed": 0}, "after": {}}')
    assert run.finished  # the control: a whole file is a finished run
