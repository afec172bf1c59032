"""One store for what a lab chain builds: `cache_dir/<kind>-<hash of the settings that made it>`.

Lab bases, lab SFT models, sampled pairs, labelled steps, PRMs, reference log-probs and base
evaluations are all artifacts: named by the settings they depend on (`artifact_path`), built once
per name (`build_once`), reused by every later run and every arm of a sweep.

- A second process asking for an artifact that is being built waits on an exclusive file lock
  (`<name>.lock`) and then finds it built, instead of building it again.
- A folder is complete once its `done` file exists, which the builder writes last: a run killed
  while building leaves no `done`, and the next run builds it again. A one-file artifact is its
  own `done`, written whole (`write_whole`: a temporary file moved into place).
- Under a launcher (several processes) the lock is skipped: either every rank builds together
  (training: `ranks="all"`), or rank 0 builds while the others wait for `done` (`ranks="main"`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path

from halluc.core.distributed import is_main, wait_for_file, world_size

log = logging.getLogger(__name__)


def artifact_path(cache_dir, kind: str, key: str, suffix: str = "") -> Path:
    """cache_dir/<kind>-<first 10 hex digits of sha1(key)><suffix>; `key` is the settings that made it."""
    return Path(cache_dir) / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:10]}{suffix}"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive file lock (one process; under a launcher every rank trains together instead)."""
    if world_size() > 1:
        yield
        return
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock (some cluster mounts): unlocked, as before locks
            log.warning("cannot lock %s (%s): two processes could build the same artifact at once", path, e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def build_once(path: Path, done: str | None = None, ranks: str = "all", what: str = "the artifact"):
    """Yields True when this process must build `path` (and write `path/done` last; a file artifact,
    `done=None`, is complete once it exists), False when it is built already. ranks="main": only rank
    0 builds, and after the block every rank waits until it is complete."""
    if ranks not in ("all", "main"):
        raise ValueError(f"ranks must be 'all' or 'main', got {ranks!r}")
    marker = path / done if done else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        built = marker.exists()
        if built and is_main():
            log.info("reusing %s: %s", what, path)
        yield not built and (ranks == "all" or is_main())
    if ranks == "main":
        wait_for_file(marker, what)


def write_whole(path: Path, text: str) -> None:
    """Write `path` so that a reader sees all of it or nothing (a killed writer leaves no half file)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
