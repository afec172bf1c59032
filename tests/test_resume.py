"""kill -9 mid-training, `resume=true`, and the run ends exactly where an uninterrupted one does.

The killed run stops after SFT step 13 (checkpoints at 5 and 10 are on disk; steps 11-13 are
lost) and is killed with SIGKILL: no cleanup, no final save. The resumed run continues from
checkpoint-10: model or adapter, optimizer, scheduler, RNG and the position in the seeded data
order. Its logged losses after the resume point (steps 11-15 and 16-20) must equal the
uninterrupted run's, which also shows the data order is the same batch for batch.
Variants: LoRA without DeepSpeed, and full fine-tuning under ZeRO-3 in a plain `python`
process (no launcher: halluc.core.distributed sets the env DeepSpeed needs).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, kill_when_paused, load_script, run_processes

SETTINGS = ["base.steps=20", "sft.steps=20", "base.batch_size=16", "sft.batch_size=16", "save_steps=5",
            "lab.train_size=300", "lab.sft_size=160", "lab.test_size=8", "tiny.hidden=32",
            "eval_max_new_tokens=24"]
KILL_AFTER_STEP = 13


@pytest.fixture(scope="module")
def cache(lab_cache):
    return lab_cache  # lab bases trained once per test run, whichever test needs one first


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["lora.enabled=true", "lora.r=4"], ["deepspeed=ds_configs/zero3.json"]],
                         ids=["lora", "zero3-python"])
def test_kill_9_then_resume_ends_with_the_uninterrupted_loss(tmp_path, cache, variant):
    settings = SETTINGS + [f"cache_dir={cache}"]
    recipe = load_script("recipes/masked_sft.py")
    # the uninterrupted run, here (without DeepSpeed: ZeRO-3 on 1 process trains the same) and
    # on 1 thread like the subprocesses, so even the float summation order is the same
    plain = [s for s in variant if not s.startswith("deepspeed=")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = recipe.main([f"output_dir={tmp_path / 'whole'}", *settings, *plain])["sft_train"]
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "killed"
    args = [f"output_dir={out}", *settings, *variant]
    kill_when_paused(args, out, KILL_AFTER_STEP, tmp_path / "killed.log")
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-5", "checkpoint-10"}
    assert not (out / "eval.json").exists()

    resumed = run_processes([sys.executable, "recipes/masked_sft.py", *args, "resume=true"], timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert f"resuming from {out / 'checkpoint-10'}" in resumed.stderr + resumed.stdout
    after = json.loads((out / "eval.json").read_text())["sft_train"]
    print(f"{variant}: uninterrupted {whole['losses']}\n  killed at {KILL_AFTER_STEP} + resumed {after['losses']}")
    assert after["steps"] == whole["steps"] == 20
    assert [s for s, _ in after["losses"]] == [s for s, _ in whole["losses"]] == [5, 10, 15, 20]
    for (step, a), (_, b) in zip(after["losses"], whole["losses"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (step, a, b)


def test_latest_checkpoint_skips_one_the_kill_interrupted(tmp_path):
    from halluc.training.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(tmp_path) is None
    for step, complete in ((5, True), (10, True), (15, False)):  # killed while writing checkpoint-15
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint").mkdir()  # the final model folder is not a checkpoint-N
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_output_dir_is_refused_naming_its_pid(tmp_path, cache):
    """Issue 22, item 12: two runs into one output_dir at once both trained and wrote (resume=true),
    or the second called the live one "a partial run". Now the second is refused, resumed or not,
    naming the live process; once that process is gone (kill -9), resume works as before."""
    import signal
    import time

    out = tmp_path / "out"
    args = [f"output_dir={out}", *SETTINGS, f"cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_DIR": str(out), "PAUSE_AT_STEP": "3"}
    with open(tmp_path / "live.log", "w") as log:
        live = subprocess.Popen([sys.executable, "tests/helpers/pausing_recipe.py", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 1200
        while not (out / "paused-at-3").exists():
            assert live.poll() is None, (tmp_path / "live.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        recipe = load_script("recipes/masked_sft.py")
        for extra in ([], ["resume=true"]):
            with pytest.raises(SystemExit, match=f"another process \\(pid {live.pid}\\) is using output_dir={out}"):
                recipe.main([*args, *extra])
    finally:
        os.kill(live.pid, signal.SIGKILL)
        live.wait(timeout=30)
    assert not (out / "eval.json").exists()
    resumed = run_processes([sys.executable, "recipes/masked_sft.py", *args, "resume=true"], timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "eval.json").exists()
