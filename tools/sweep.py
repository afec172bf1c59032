"""Run an experiment: named arms x lab settings x seeds of one recipe, then a report with CIs.

    python tools/sweep.py recipes/configs/sweeps/first_results.yaml          # run what is missing, report
    python tools/sweep.py SWEEP.yaml --jobs 2 --seeds 0 1 --out runs/sweeps/x
    python tools/sweep.py SWEEP.yaml --report-only                            # re-report finished runs
    python tools/sweep.py SWEEP.yaml --arms own aligned --settings default    # run only these; report all finished
    python tools/sweep.py A.yaml --jobs 1 --threads 1 & python tools/sweep.py B.yaml --jobs 1 --threads 1   # two at once

A run is the recipe run as a script, with its log in OUT/SETTING/ARM/seed-S/run.log:
    python RECIPE output_dir=OUT/SETTING/ARM/seed-S seed=S cache_dir=OUT/cache overwrite=true COMMON.. SETTING.. ARM..
On Linux with a CPU build of torch (`--launch auto`), the runner imports the training stack once
and forks each run from itself: a run then skips the ~4.5 s of imports a new process pays (most of
a tiny run). `--launch process` starts each run as that command line (GPU builds always do: a
forked child cannot use CUDA its parent touched); both give the same results (tests/test_sweep.py).
Every run's settings are checked before anything starts (`RECIPE --check-settings`, about a second).
A run whose folder holds eval.json made with the run's settings is finished and skipped, so a
killed sweep resumes where it stopped (an interrupted run, or an arm edited since, runs again). Runs of one seed share the cached lab base, so the
first run of each seed goes first and the others of that seed wait for it. `--jobs` runs go at
once, each with cores/jobs threads (a tiny model gains little from threads, a lot from processes).

The report (halluc.core.stats; OUT/results.json, OUT/results.md, OUT/*.png): for every setting,
arm and split, the mean and 95% CI of answer accuracy, full-solution accuracy, BT precision,
BT recall and wasted tokens per problem, and each arm's paired difference to the baseline arm,
with every seed's own value. "base" is what every arm of a seed starts from, before the recipe trains (the same for every arm).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from halluc.core.config import CHECK_SETTINGS, flat_dict
from halluc.core.inputs import check_input_file, run_cli

ROOT = Path(__file__).resolve().parents[1]
FINISHED = "eval.json"
NOT_SETTINGS = ("overwrite", "resume", "output_dir", "cache_dir", "ddp_timeout")  # how a run ran, not what it measures


@dataclass
class Sweep:
    """A sweep file (recipes/configs/sweeps/*.yaml)."""

    name: str
    recipe: str
    baseline: str                       # the arm every other arm is compared with
    arms: dict[str, list[str]]          # arm -> recipe overrides
    settings: dict[str, list[str]] = field(default_factory=lambda: {"default": []})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    common: list[str] = field(default_factory=list)  # overrides for every run
    note: str = ""                      # what the sweep asks, for the report
    own_base: list[str] = field(default_factory=list)  # arms that start from another model (besides base.* arms)


@dataclass(eq=False)  # one object per run, hashed by identity
class Run:
    setting: str
    arm: str
    seed: int
    out: Path
    args: list[str]
    settings: dict | None = None  # the recipe's settings for `args` (flat), once checked

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.arm}/seed-{self.seed}"

    @property
    def finished(self) -> bool:
        """eval.json is there and was made with this run's settings (an arm edited since runs again;
        where the run's folders are does not count, so a moved sweep folder is still finished)."""
        path = self.out / FINISHED
        if not path.exists():
            return False
        try:
            report = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # cut by a kill while written: run it again
            return False
        if self.settings is None:
            return True
        saved = flat_dict(report.get("config", {}))
        # a setting the saved run lacks (made before it existed) counts only when this run sets it itself:
        # that run could not have had it
        explicit = {arg.split("=", 1)[0].lstrip("-").replace("-", "_") for arg in self.args if "=" in arg}
        return all(saved[k] == v if k in saved else k not in explicit
                   for k, v in self.settings.items() if k not in NOT_SETTINGS)


def read_sweep(path: str) -> Sweep:
    check_input_file(path, "sweep file")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not readable as YAML: {e}") from None
    known = set(Sweep.__dataclass_fields__)
    if unknown := set(data) - known:
        raise SystemExit(f"{path}: unknown key(s) {sorted(unknown)}; a sweep has {sorted(known)}")
    missing = {"name", "recipe", "baseline", "arms"} - set(data)
    if missing:
        raise SystemExit(f"{path}: missing key(s) {sorted(missing)}")
    sweep = Sweep(**data)
    seeds = sweep.seeds
    if not isinstance(seeds, list) or not seeds or not all(type(x) is int and x >= 0 for x in seeds):
        raise SystemExit(f"{path}: seeds must be a list of non-negative integers (seeds: [0, 1, 2]), got {seeds!r}")
    if not isinstance(sweep.common, list) or not all(isinstance(o, str) and "=" in o for o in sweep.common):
        raise SystemExit(f"{path}: common must be a list of key=value strings, got {sweep.common!r}")
    for key in ("arms", "settings"):
        if not isinstance(getattr(sweep, key), dict) or not getattr(sweep, key):
            raise SystemExit(f"{path}: {key} must map names to lists of key=value strings, got {getattr(sweep, key)!r}")
        for name, overrides in getattr(sweep, key).items():
            if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
                raise SystemExit(f"{path}: {key}.{name} must be a list of key=value strings, got {overrides!r}")
    if "base" in sweep.arms:
        raise SystemExit(f"{path}: 'base' is the report's name for the model the arms start from: rename that arm")
    if unknown := set(sweep.own_base) - set(sweep.arms):
        raise SystemExit(f"{path}: own_base names arms that do not exist: {sorted(unknown)}")
    if sweep.baseline not in sweep.arms:
        raise SystemExit(f"{path}: baseline {sweep.baseline!r} is not one of the arms {list(sweep.arms)}")
    return sweep


def plan(sweep: Sweep, out: Path) -> list[Run]:
    """Every (setting, arm, seed), leaders first: the first run of each seed trains its base."""
    runs = [Run(setting, arm, seed, out / setting / arm / f"seed-{seed}",
                # overwrite: a run without eval.json was interrupted; it starts again from scratch
                [f"output_dir={out / setting / arm / f'seed-{seed}'}", f"seed={seed}", f"cache_dir={out / 'cache'}",
                 "overwrite=true", *sweep.common, *overrides, *sweep.arms[arm]])
            for seed in sweep.seeds for setting, overrides in sweep.settings.items() for arm in sweep.arms]
    leaders = {r.seed: r for r in reversed(runs)}
    return sorted(runs, key=lambda r: r is not leaders[r.seed])


def check_settings(sweep: Sweep, runs: list[Run]) -> None:
    """Every run's settings, checked by the recipe's own loader before anything starts: one
    `RECIPE --check-settings` process for all runs (halluc.core.config.check_settings_lines), no ML library."""
    proc = subprocess.run([sys.executable, str(ROOT / sweep.recipe), CHECK_SETTINGS], cwd=ROOT, capture_output=True,
                          text=True, input="".join(json.dumps(run.args) + "\n" for run in runs))
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(results) != len(runs):
        raise SystemExit(f"{sweep.recipe} --check-settings failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for run, result in zip(runs, results):
        if "error" in result:
            raise SystemExit(f"{run.name}: {result['error']}")
        run.settings = result["settings"]


class Forked:
    """A run forked from this process (the training stack already imported): Popen's poll/returncode."""

    def __init__(self, script: Path, args: list[str], log, env: dict, threads: int):
        sys.stdout.flush(), sys.stderr.flush()  # or the child writes this process's buffered output again
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:
            code = 1
            try:
                os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
                os.chdir(ROOT)
                os.environ.update(env)
                import torch
                torch.set_num_threads(threads)
                sys.argv = [str(script), *args]
                try:
                    runpy.run_path(str(script), run_name="__main__")
                    code = 0
                except SystemExit as e:  # what `python RECIPE` would exit with
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                    if not isinstance(e.code, (int, type(None))):
                        print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def can_fork() -> bool:
    """Fork runs from a pre-imported parent: Linux (macOS frameworks are not fork-safe) and a CPU build
    of torch (a CUDA runtime the parent initialised, even to count devices, is unusable in a child)."""
    if sys.platform != "linux":
        return False
    import torch
    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def execute(sweep: Sweep, runs: list[Run], jobs: int, launch: str = "auto", threads: int | None = None) -> list[Run]:
    """Run what is not finished, `jobs` at a time (forked or in new processes); returns the runs that failed."""
    import tqdm as tqdm_module
    from tqdm.auto import tqdm

    todo = [r for r in runs if not r.finished]
    print(f"{len(runs)} runs: {len(runs) - len(todo)} finished already, {len(todo)} to run, {jobs} at a time",
          flush=True)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    leader_done: dict[int, bool] = {}  # a finished run of the seed left its base in the cache
    for r in runs:
        leader_done[r.seed] = leader_done.get(r.seed, False) or r.finished
    fork = bool(todo) and (launch == "fork" or (launch == "auto" and can_fork()))
    if fork:
        import halluc.training.train  # noqa: F401  (what every run imports first: the children start with it)
        tqdm_module.tqdm.monitor_interval = 0  # no monitor thread in the parent: forked children get none
    running: dict[Run, tuple[subprocess.Popen | Forked, float]] = {}
    failed: list[Run] = []
    bar = tqdm(total=len(todo), desc=sweep.name, unit="run")
    while todo or running:
        for run, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[run]
            leader_done[run.seed] = True  # its base is cached now (or failed: the next run retries)
            took = time.monotonic() - started
            if proc.returncode == 0 and run.finished:
                after = json.loads((run.out / FINISHED).read_text())["after"]
                accs = "answer acc " + "  ".join(f"{split} {m['answer_acc']:.1%}" for split, m in after.items())
                bar.write(f"done   {run.name} in {took:.0f} s: {accs}")
            else:
                failed.append(run)
                bar.write(f"FAILED {run.name} (exit {proc.returncode}) after {took:.0f} s: see {run.out / 'run.log'}")
            bar.update(1)
        while len(running) < jobs:
            # ready: its seed's base is cached, or no run of its seed is running (it becomes the leader)
            ready = [r for r in todo if leader_done[r.seed] or all(o.seed != r.seed for o in running)]
            if not ready:
                break
            run = ready[0]
            todo.remove(run)
            run.out.mkdir(parents=True, exist_ok=True)
            log = open(run.out / "run.log", "w")
            if fork:
                proc = Forked(ROOT / sweep.recipe, run.args, log, env, threads)
            else:
                proc = subprocess.Popen([sys.executable, str(ROOT / sweep.recipe), *run.args], cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
            log.close()  # the run holds its own copy
            running[run] = (proc, time.monotonic())
            bar.write(f"start  {run.name}")
        time.sleep(0.5)
    bar.close()
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="a sweep file, e.g. recipes/configs/sweeps/first_results.yaml")
    p.add_argument("--out", default=None, help="default: runs/sweeps/<name>")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the sweep's seeds")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: the number of cores)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the finished runs (none there: from docs/results/<name>.outcomes.jsonl.gz)")
    p.add_argument("--outcomes", default=None, metavar="FILE",
                   help="write the report from a committed outcomes file (docs/results/<name>.outcomes.jsonl.gz), "
                        "no runs needed")
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="run only these arms (default: all); the report covers every finished run")
    p.add_argument("--settings", nargs="+", default=None, metavar="SETTING",
                   help="run only these lab settings (default: all); the report covers every finished run")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: cores / jobs; 1 when another sweep shares the cores: "
                        "more threads than cores slow every run down many times)")
    p.add_argument("--launch", choices=("auto", "fork", "process"), default="auto",
                   help="fork runs from this process (auto: Linux with a CPU torch) or start each in a new one")
    args = p.parse_args(argv)
    sweep = read_sweep(args.sweep)
    for flag, chosen, known in (("--arms", args.arms, sweep.arms), ("--settings", args.settings, sweep.settings)):
        if chosen and (unknown := sorted(set(chosen) - set(known))):
            raise SystemExit(f"{args.sweep}: {flag} names {unknown}, not in the sweep's {list(known)}")
    if args.seeds:
        sweep.seeds = args.seeds
    out = Path(args.out or f"runs/sweeps/{sweep.name}").resolve()
    committed = ROOT / "docs" / "results" / f"{sweep.name}.outcomes.jsonl.gz"
    if args.report_only and not args.outcomes and committed.exists() and not any(
            (out / s / a / f"seed-{seed}" / "eval.json").exists()
            for s in sweep.settings for a in sweep.arms for seed in sweep.seeds):
        print(f"sweep.py: no finished run under {out}: the report comes from the committed outcomes {committed}",
              file=sys.stderr)
        args.outcomes = str(committed)
    if args.outcomes:  # the report from what a sweep recorded: nothing is planned, checked or run
        from halluc.pipeline.report import read_outcomes, write_report

        check_input_file(args.outcomes, "--outcomes")
        records = [r for r in read_outcomes(args.outcomes) if not args.seeds or r["seed"] in args.seeds]
        paths = write_report(sweep, records, out)
        print("\n" + Path(paths["md"]).read_text())
        print(f"report: {', '.join(str(v) for v in paths.values())}")
        return 0
    runs = plan(sweep, out)
    failed = []
    check_settings(sweep, runs)
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        chosen = [r for r in runs if r.arm in (args.arms or sweep.arms) and r.setting in (args.settings or sweep.settings)]
        failed = execute(sweep, chosen, args.jobs or os.cpu_count() or 1, args.launch, args.threads)
        with open(out / "wall.jsonl", "a") as f:  # every invocation's wall time (a resumed sweep has several)
            f.write(json.dumps({"seconds": round(time.monotonic() - t0, 1), "jobs": args.jobs, "launch": args.launch,
                                "command": " ".join(["python", "tools/sweep.py", *(argv or sys.argv[1:])])}) + "\n")
    finished = [r for r in runs if r.finished]
    if not finished:  # an empty report would read as a result
        print(f"sweep.py: no finished run of {args.sweep} under {out} to report on "
              f"({len(runs)} planned): run the sweep first, or give --out where it ran", file=sys.stderr)
        return 2
    from halluc.pipeline.report import outcomes, write_report

    paths = write_report(sweep, outcomes(finished), out)
    print("\n" + Path(paths["md"]).read_text())
    print(f"report: {', '.join(str(v) for v in paths.values())}")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(r.name for r in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
