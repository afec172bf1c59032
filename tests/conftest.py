"""Shared fixtures: a lab tokenizer trained here and tiny models built from a config in code.

scripts/test.sh runs the suite on every core with pytest-xdist: each worker is a process with its
share of the cores' threads, and what many tests need (the lab policy, the lab bases) is built once
per run in `shared_dir`, a folder all workers share, under a file lock (a second worker waits).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from halluc.tasks import arith

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # the cores split between workers: two workers x two threads on two cores thrash
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # and the recipes the tests start as processes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the run's temporary root; one process: its own)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    (root / "shared").mkdir(exist_ok=True)
    return root / "shared"


@contextmanager
def once(path: Path):
    """Build what lives at `path` once per run: workers take the recipes' exclusive file lock, the
    first builds, the others wait and find it built."""
    from halluc.core.artifacts import file_lock

    with file_lock(Path(f"{path}.lock")):
        yield path.exists()


@pytest.fixture(scope="session")
def lab_cache(shared_dir) -> Path:
    """The recipes' cache_dir for tests: lab bases are keyed by their settings and built under a lock,
    so tests with the same base settings in any worker train it once per run."""
    (shared_dir / "lab-cache").mkdir(exist_ok=True)
    return shared_dir / "lab-cache"


@pytest.fixture(scope="session")
def arith_problems():
    return arith.make_split(300, (2, 4), seed=123)


@pytest.fixture(scope="session")
def lab_tokenizer(arith_problems):
    """The lab tokenizer (no BT yet, like a pretrained one); tests copy it before adding BT."""
    from halluc.core.tokens import train_tokenizer

    return train_tokenizer([p.prompt + p.solution for p in arith_problems])


@pytest.fixture(scope="session")
def bt_tokenizer(lab_tokenizer):
    import copy

    from halluc.core.tokens import add_backtrack_token

    tok = copy.deepcopy(lab_tokenizer)
    add_backtrack_token(tok)
    return tok


@pytest.fixture
def gsm8k_test_file():
    path = GSM8K_DIR / "test.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K data not found at {GSM8K_DIR}")
    return path


ROOT = Path(__file__).resolve().parents[1]

# The lab of `lab_policy`: big enough that the tiny model writes about half its test solutions right
POLICY_LAB = ["base.steps=400", "sft.steps=40", "base.batch_size=32", "sft.batch_size=16", "lab.train_size=2000",
              "lab.sft_size=200", "lab.test_size=24", "tiny.hidden=64"]


@pytest.fixture(scope="session")
def lab_policy(shared_dir):
    """(folder, model, tokenizer, test problems) of a tiny lab policy with BT and a verifier head,
    trained once per test run (~30 s; workers share it): masked SFT with verifier_head_weight=1
    (technique 10)."""
    from halluc.pipeline.lab import LabConfig, lab_splits
    from halluc.core.model import load_causal_lm
    from halluc.core.tokens import load_tokenizer
    from halluc.objectives.verifier_head import load_head

    out = shared_dir / "lab-policy"
    with once(out) as built:
        if not built:
            load_script("recipes/masked_sft.py").main([f"output_dir={out}/sft", f"cache_dir={out}/cache",
                                                       "verifier_head_weight=1.0", "eval_max_new_tokens=8", *POLICY_LAB])
    folder = out / "sft" / "checkpoint"
    model = load_causal_lm(str(folder)).eval()
    load_head(folder, model)
    problems = lab_splits(LabConfig(train_size=2000, sft_size=200, test_size=24), seed=0)["test_id"]
    return folder, model, load_tokenizer(folder), problems


def load_script(relative: str):
    """Import a recipe or tool file as a module (they are scripts, not package modules)."""
    import importlib.util
    import sys

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def kill_when_paused(args: list[str], pause_dir: Path, step: int, log_path: Path, recipe: str = "recipes/masked_sft.py",
                     timeout: float = 1200) -> None:
    """Run `recipe args` through tests/helpers/pausing_recipe.py until the stage training in
    `pause_dir` ends step `step`, then `kill -9` it: no cleanup, no final save."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_DIR": str(pause_dir), "PAUSE_AT_STEP": str(step),
           "PAUSE_RECIPE": recipe}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "tests/helpers/pausing_recipe.py", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not (pause_dir / f"paused-at-{step}").exists():
                assert proc.poll() is None, Path(log_path).read_text()[-3000:]
                assert time.monotonic() < deadline, f"the run never reached step {step}"
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()


def run_processes(cmd: list[str], *, timeout: float, env: dict | None = None, cwd: Path = ROOT):
    """`subprocess.run(cmd, capture_output=True, text=True)` for a command that starts processes (a launcher
    and its ranks, a recipe): when it runs past `timeout`, every process it started prints its Python stack
    (faulthandler, on SIGABRT; no core file) and is killed, and the test fails showing those stacks.
    subprocess.run's own timeout kills the launcher alone: its hung ranks went on taking the CPU for the
    rest of the suite, and nothing said where they hung (CI, stop 35). Its processes are found by a mark
    in their environment too, so one whose parent is gone (a rank after its launcher) is not missed."""
    import resource
    import signal
    import subprocess
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1", "HALLUC_TEST_PROCESSES": mark}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        def marked(p):
            try:
                return p.environ().get("HALLUC_TEST_PROCESSES") == mark
            except (psutil.Error, OSError):
                return False

        for sig in (signal.SIGABRT, signal.SIGKILL):  # first the stacks, then an end
            tree = [p for p in psutil.process_iter() if p.pid != os.getpid() and marked(p)]
            for p in tree:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(tree, timeout=15)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired as e:  # a pipe still held open: what came so far
            proc.kill()
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        pytest.fail(f"{' '.join(map(str, cmd))[:300]} did not end in {timeout:.0f} s; what its processes printed "
                    f"last (with their Python stacks at the timeout):\n{out[-2000:]}\n{err[-10000:]}", pytrace=False)
    if proc.returncode and "Fatal Python error" in err:  # a crash (rare: gloo at teardown, distributed.py):
        # repeat faulthandler's stacks at the end, where the tests' failure messages show stderr's tail
        at = err.index("Fatal Python error")
        err += "\n[run_processes: the fatal error above, again]\n" + err[at:at + 6000]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def deepspeed_launcher(processes: int = 2) -> list[str]:
    """`deepspeed --num_gpus N --master_port P` of this environment, P a free port (the last item)."""
    import sys

    from halluc.core.distributed import free_port

    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(processes), "--master_port",
            str(free_port())]


def stale_build_lock(tmp_path: Path) -> dict:
    """The environment of a machine where a process was killed while it JIT-built DeepSpeed's CPU
    collective op: its lock file is left, and torch's build waits on such a lock forever (it hung CI,
    stop 35). halluc keeps DeepSpeed off that op on CPU (`skip_shared_memory_collective`), so a run
    with this environment must start all the same."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    return {"TORCH_EXTENSIONS_DIR": str(extensions)}


def shared_memory_left(launcher: list[str]) -> list[str]:
    """The /dev/shm segments DeepSpeed's CPU collective made for the job on this launcher's port (69 MB per
    rank, never removed: RAM lost until reboot). halluc's runs must leave none."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{launcher[-1]}_*"))
