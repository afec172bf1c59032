"""A real one-node Slurm cluster (slurmctld + slurmd + its own munged) in a temporary folder.

For tests/test_slurm.py, and by hand:
    python tests/helpers/slurm_cluster.py start   # prints `export SLURM_CONF=...`
    python tests/helpers/slurm_cluster.py stop DIR

Debian's slurm-wlm and munge run as root without systemd or cgroups (notes/environment.md).
Everything lives in one temp folder: config, state, spool, logs, pid files, and a munge socket
of our own (so a munged someone else runs is never touched). `stop` ends exactly the daemons
whose pids this cluster recorded.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def install() -> str | None:
    """apt-get install slurm-wlm munge if missing; None when ready, else why not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if shutil.which("apt-get") is None:
        return "slurm-wlm/munge are not installed and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode:
            return f"{' '.join(cmd)} failed: {(r.stderr or r.stdout)[-400:]}"
    missing = missing_binaries()
    return f"installed, but still missing {missing}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    root: Path
    pid_files: list[Path] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def submit(self, *args: str, env: dict | None = None, cwd=None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                           capture_output=True, text=True, cwd=cwd)
        if r.returncode:
            raise RuntimeError(f"sbatch failed: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 300, poll: float = 1.0) -> dict[str, str]:
        """Poll squeue until the job left the queue; its final scontrol record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
                return self.job(job_id)
            time.sleep(poll)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still queued/running after {timeout} s: {self.job(job_id)}")

    def wait_idle(self, timeout: float = 120, poll: float = 0.5) -> None:
        """Wait until the node is idle again: a finished job's steps and cleanup can outlast its queue
        entry on a loaded machine, and a job requeued before that may fail to launch."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(poll)
        raise RuntimeError(f"node not idle after {timeout} s (state {state!r})\n{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of slurmctld's and slurmd's logs (why a job failed to launch)."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """End the daemons this cluster started (by the pids in their pid files), nothing else."""
        for pid_file in reversed(self.pid_files):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                for _ in range(50):
                    if not _alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    continue
                break


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start(cpus: int | None = None, timeout: float = 60, tries: int = 3) -> Cluster:
    """munged (own socket), slurmctld, slurmd; returns once the node is idle. A daemon's port is free
    when chosen but may be taken before it binds (another test's process, on a busy machine: "Address
    already in use"): then it starts again in a new folder with new ports."""
    for attempt in range(1, tries + 1):
        try:
            return _start_once(cpus, timeout)
        except RuntimeError:
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


def _start_once(cpus: int | None, timeout: float) -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="halluc-slurm-"))
    root.chmod(0o755)  # munged runs as the munge user and must reach its socket folder
    cluster = Cluster(root)
    try:
        _start_munge(cluster)
        _write_conf(cluster, cpus or os.cpu_count() or 1)
        for daemon in ("slurmctld", "slurmd"):
            args = [_sbin(daemon)] + (["-i"] if daemon == "slurmctld" else [])
            subprocess.run(args, env=cluster.env, check=True, capture_output=True, timeout=30)
            cluster.pid_files.append(root / f"{daemon}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed"):
                return cluster
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after {timeout} s (state {state!r}); logs in {root}")
    except BaseException:
        cluster.stop()
        raise


def _start_munge(cluster: Cluster) -> None:
    mdir = cluster.root / "munge"
    mdir.mkdir()
    shutil.chown(mdir, "munge", "munge")
    mdir.chmod(0o755)  # munged insists that everyone may reach (not write) its socket folder
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "-c"], check=True, capture_output=True)
    subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={mdir}/munge.socket",
                    f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                    f"--seed-file={mdir}/munged.seed"], check=True, capture_output=True, timeout=30)
    cluster.pid_files.append(mdir / "munged.pid")


def _write_conf(cluster: Cluster, cpus: int) -> None:
    root, host = cluster.root, socket.gethostname().split(".")[0]
    mem = max(1024, _mem_mb() - 1024)
    for d in ("state", "spool"):
        (root / d).mkdir()
    cluster.conf.write_text(f"""\
ClusterName=halluctest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


if __name__ == "__main__":
    if sys.argv[1:2] == ["start"]:
        reason = install()
        if reason:
            raise SystemExit(reason)
        c = start()
        print(f"export SLURM_CONF={c.conf}\n# stop: python {sys.argv[0]} stop {c.root}")
    elif sys.argv[1:2] == ["stop"]:
        root = Path(sys.argv[2])
        Cluster(root, [root / "munge" / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]).stop()
    else:
        raise SystemExit(__doc__)
