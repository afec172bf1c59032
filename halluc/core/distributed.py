"""One recipe, four launch forms: `python`, `torchrun`, the `deepspeed` launcher, `srun` + torchrun.

Launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python`
run has none. Everything a recipe needs to run unchanged under each form lives here:
- `strip_launcher_args`: the deepspeed launcher appends `--local_rank=N` to the script's
  arguments (the same value is in LOCAL_RANK), which our `key=value` parser would reject.
- `prepare_deepspeed`: checks the config file and, for a launcher-less single process, sets the
  env vars DeepSpeed needs (without them it looks for mpi4py and fails); on CPU it keeps DeepSpeed
  off its shared-memory collective (a JIT build that can hang, and RAM it never frees).
- rank helpers (`is_main`, `barrier`) for the steps only one process may do (writing files).
- at exit, the process group is destroyed (nothing else does it): left to the interpreter's
  teardown, gloo's threads were seen to abort a finished run ("terminate called without an
  active exception", exit -6) under load.
On CPU the Trainer must also get `use_cpu=True` (else accelerate sees one process and the
batch-size check fails) and the gloo backend: `halluc.training.train.training_args` does both.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
from pathlib import Path

# torch is imported inside the functions that use it: a recipe calls zero_stage and
# strip_launcher_args while it checks its settings, before any ML library loads.

log = logging.getLogger(__name__)

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@atexit.register
def _destroy_process_group() -> None:
    torch = sys.modules.get("torch")  # never imported: no process group (and no import at exit)
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # exiting anyway: say so, never mask the real exit status
            log.warning("destroying the process group at exit failed: %s", e)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process or before the process group exists)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def wait_for_file(path: Path, what: str, timeout_s: float = 7200.0) -> None:
    """Wait until rank 0 has written `path`. A barrier when the process group exists; before it does
    (a cached model skipped the training that creates it) the other ranks poll for the file."""
    import time

    barrier()
    start = time.monotonic()
    while not Path(path).exists():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"rank {rank()}: waited {timeout_s:.0f} s for rank 0 to write {path} ({what})")
        time.sleep(1.0)


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK on a GPU machine (one process per GPU), else the CPU."""
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


def launched() -> bool:
    """True under torchrun, the deepspeed launcher, or anything else that exported RANK."""
    return "RANK" in os.environ


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` (added by the deepspeed launcher)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--local_rank", "--local-rank"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"deepspeed={path}: no such file (the configs in ds_configs/ are zero2.json, "
                         "zero3.json, zero3_offload.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"deepspeed={path}: not valid JSON: {e}") from None


def zero_stage(path: str | None) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without a config)."""
    if not path:
        return 0
    return int(read_deepspeed_config(path).get("zero_optimization", {}).get("stage", 0))


def prepare_deepspeed(path: str | None) -> None:
    """Make `TrainingArguments(deepspeed=path)` work in this process, whatever launched it.

    A launcher-less single process gets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0 and a free
    MASTER_PORT on 127.0.0.1 (set only when RANK is missing, so launchers keep theirs).
    """
    if not path:
        return
    read_deepspeed_config(path)
    use_environment_extensions_dir()
    skip_shared_memory_collective()
    if launched():
        return
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    log.info("deepspeed without a launcher: one process, %s",
             " ".join(f"{k}={os.environ[k]}" for k in LAUNCHER_ENV))


def skip_shared_memory_collective() -> None:
    """Tell DeepSpeed its shared-memory all-reduce op (`deepspeed_shm_comm`) is unusable, so the
    process group uses gloo alone. That op serves only `inference_all_reduce` (AutoTP inference, which
    halluc never runs), yet every DeepSpeed process on CPU built and set it up:
    - it JIT-compiles the op at the first run in an environment (1-2 min) under a lock file that outlives a
      process killed mid-build (OOM, Ctrl-C, a timeout), and torch's build then waits on that lock forever
      in every later DeepSpeed process: a hang at start (seen in CI, and reproduced);
    - under the deepspeed launcher each rank creates a 69 MB segment in /dev/shm that nothing removes:
      RAM lost until reboot (19 GB of them had piled up on a lab machine, which then thrashed).
    DeepSpeed caches its op-compatibility probe in one dict that later reads share (deepspeed/ops/
    __init__.py); marking the op there is what its own probe does for an op that cannot build. It is
    marked whatever the machine: the CUDA accelerator has no such op (nothing changes there), and
    DS_ACCELERATOR=cpu on a GPU machine is DeepSpeed's CPU mode all the same."""
    try:
        import deepspeed.ops
    except ImportError:  # no DeepSpeed: TrainingArguments(deepspeed=...) says so itself
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_environment_extensions_dir() -> None:
    """DeepSpeed JIT-builds a CPU op (its shared-memory collective) into TORCH_EXTENSIONS_DIR, by default
    ~/.cache/torch_extensions, one folder for every Python environment of the user: a checkout whose
    environment has other paths (another clone, another venv) changes the build command, so each
    rebuilds it for the other, 1-2 silent minutes each time (measured: ninja's log here alternated between
    two command hashes, this checkout's and a fresh clone's). Unless the user set it, builds go under
    this environment (sys.prefix/torch_extensions): once per environment, and the first is announced."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    folder = Path(sys.prefix) / "torch_extensions"
    try:  # a probe, not os.access: root passes os.access on a read-only mount
        folder.mkdir(exist_ok=True)
        probe = folder / f".probe-{socket.gethostname()}-{os.getpid()}"  # one per process: ranks (and nodes) probe at once
        probe.touch()
        probe.unlink()
    except OSError:
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    if is_main() and not any(folder.rglob("deepspeed_shm_comm*.so")):
        log.info("DeepSpeed builds its CPU collective op into %s (1-2 min, once for this environment)", folder)


def release_deepspeed_config() -> None:
    """Forget the global ZeRO-3 flag a finished stage's TrainingArguments left behind.

    While it is set, `from_pretrained` builds models under `deepspeed.zero.Init`, a collective:
    reloading a checkpoint on one rank would hang, and a reloaded model would come back sharded.
    The next stage's TrainingArguments sets it again.
    """
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()
