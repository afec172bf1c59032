"""The artifact store (halluc/core/artifacts.py): built once per settings, reused, rebuilt after a killed
build, waited for by a second process instead of built twice, and rank 0 building for all ranks."""
import json
import multiprocessing
import threading
import time

import pytest

from halluc.core.artifacts import artifact_path, build_once, write_whole


def test_the_name_is_the_settings_hash_every_cache_used():
    """The keys of caches made before the store still find their folders (no silent rebuild)."""
    import hashlib

    key = json.dumps({"a": 1, "b": [2, 3]}, sort_keys=True)
    assert artifact_path("c", "base", key).name == f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    assert artifact_path("c", "eval", key, ".json").name.endswith(".json")
    assert artifact_path("c", "base", key) != artifact_path("c", "base", key + " ")


def _build(folder, log):
    with build_once(folder, "done.json") as build:
        if build:
            (folder).mkdir(parents=True, exist_ok=True)
            (folder / "weights").write_text("w")
            (folder / "done.json").write_text("{}")
    log.append(build)


def test_built_once_then_reused(tmp_path):
    folder, log = artifact_path(tmp_path, "thing", "k"), []
    _build(folder, log)
    _build(folder, log)
    assert log == [True, False]


def test_a_build_killed_before_its_last_file_is_built_again(tmp_path):
    folder, log = artifact_path(tmp_path, "thing", "k"), []
    folder.mkdir(parents=True)
    (folder / "weights").write_text("half")  # a killed build: no done.json
    _build(folder, log)
    assert log == [True] and (folder / "weights").read_text() == "w"


def _builder(folder, first_in, second_trying, result, role, lock=True):
    import contextlib

    import halluc.core.artifacts as artifacts

    if not lock:  # the negative control: the same store without its file lock
        artifacts.file_lock = lambda path: contextlib.nullcontext()
    if role == "second":
        assert first_in.wait(60)
        second_trying.set()
    with artifacts.build_once(folder, "done.json") as build:
        if role == "first":
            first_in.set()
            assert second_trying.wait(60)
            time.sleep(0.5)  # the second process is asking now
        if build:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "done.json").write_text("{}")
    result.put((role, build))


@pytest.mark.parametrize("lock", [True, False], ids=["store", "without its lock (negative control)"])
def test_a_second_process_waits_for_the_first_instead_of_building(tmp_path, lock):
    ctx = multiprocessing.get_context("spawn")  # no torch in the children: fast and fork-safe
    folder = artifact_path(tmp_path, "thing", "k")
    first_in, second_trying, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_builder, args=(folder, first_in, second_trying, results, role, lock))
             for role in ("first", "second")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    built = dict(results.get(timeout=5) for _ in procs)
    assert built == ({"first": True, "second": False} if lock else {"first": True, "second": True})


def test_only_rank_0_builds_and_the_other_ranks_wait_for_it(tmp_path, monkeypatch):
    folder = artifact_path(tmp_path, "pairs", "k")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def rank_0_writes():
        time.sleep(1.5)
        folder.mkdir(parents=True)
        (folder / "stats.json").write_text("{}")

    writer = threading.Thread(target=rank_0_writes)
    writer.start()
    with build_once(folder, "stats.json", ranks="main") as build:
        assert not build  # rank 1 never builds what rank 0 builds
    assert (folder / "stats.json").exists()  # ...and leaves the block only once it is there
    writer.join()
    monkeypatch.setenv("RANK", "0")
    with build_once(folder, "stats.json", ranks="main") as build:
        assert not build  # built already


def test_a_file_artifact_is_written_whole(tmp_path):
    path = artifact_path(tmp_path, "eval", "k", ".json")
    with build_once(path) as build:
        assert build
        write_whole(path, json.dumps({"acc": 0.5}))
    with build_once(path) as build:
        assert not build
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    with pytest.raises(ValueError, match="ranks must be"):
        with build_once(path, ranks="some"):
            pass


def test_a_filesystem_without_flock_builds_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some cluster mounts refuse flock (EOPNOTSUPP): the store and a run's output_dir go on
    unlocked and say so, instead of crashing every run there."""
    import errno
    import fcntl
    import logging

    from halluc.training.checkpoint import _HELD, hold_output_dir

    def no_flock(*args):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder, log = artifact_path(tmp_path, "thing", "k"), []
    with caplog.at_level(logging.WARNING):
        _build(folder, log)
        hold_output_dir(tmp_path / "run")
    assert log == [True] and (folder / "done.json").exists()
    assert "cannot lock" in caplog.text and "cannot lock output_dir" in caplog.text
    _HELD.pop(str((tmp_path / "run").resolve()))
