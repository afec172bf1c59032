"""slurm/masked_sft.sh on a real one-node Slurm cluster: 2 tasks, checkpoints, requeue -> resume.

The cluster (tests/helpers/slurm_cluster.py) gets slurm-wlm and munge from apt-get when they
are missing; without root or apt the test is skipped with the reason. The daemons it starts
(munged on its own socket, slurmctld, slurmd) are always stopped by the fixture.

The job runs the template as written; sbatch options override only what this machine lacks
(no `gpu` partition, no GPUs, 2 cores). Two srun tasks on the one node stand in for two nodes:
each runs its own torchrun agent, and the agents meet at the rendezvous as nodes would.
"""
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_script

# one cluster at a time on this machine: the module runs in one xdist worker (scripts/test.sh: --dist loadfile)
pytestmark = pytest.mark.slow
RECIPE_ARGS = ("base.steps=10 sft.steps=10 base.batch_size=8 sft.batch_size=8 lab.train_size=200 "
               "lab.sft_size=100 lab.test_size=8 tiny.hidden=32 eval_max_new_tokens=24")


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd runs jobs as any user)")
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        pytest.skip(f"this machine's hostname {socket.gethostname()!r} does not resolve (Slurm and the rendezvous need it)")
    slurm = load_script("tests/helpers/slurm_cluster.py")
    reason = slurm.install()
    if reason:
        pytest.skip(reason)
    c = slurm.start()  # stops what it started if it fails
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def submit_two_tasks(cluster, tmp_path, script: str, out, save_steps: int, recipe_args: str):
    """sbatch slurm/SCRIPT as written, with only what this machine lacks overridden: two tasks (two
    torchrun agents meeting as two nodes would), ZeRO-3 on CPU. Asserts it completed; returns
    (job id, log file, log text)."""
    (tmp_path / "logs").mkdir()  # Slurm does not create the folder of --output
    env = {"HALLUC_ROOT": str(ROOT), "PYTHON": sys.executable, "OUTPUT_DIR": str(out), "SAVE_STEPS": str(save_steps),
           "NPROC_PER_NODE": "1", "DEEPSPEED_CONFIG": "ds_configs/zero3.json", "RECIPE_ARGS": recipe_args}
    job = cluster.submit("--partition=debug", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                         "--time=10", str(ROOT / "slurm" / script), env=env, cwd=tmp_path)
    record = cluster.wait(job, timeout=1200)
    log_file = tmp_path / "logs" / f"slurm-{job}.out"
    log = log_file.read_text(errors="replace") if log_file.exists() else "(no log)"
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:] + "\n" + cluster.log_tails()
    return job, log_file, log


def test_sbatch_masked_sft_with_two_tasks_then_requeue_resumes(cluster, tmp_path):
    out = tmp_path / "out"
    job, log_file, log = submit_two_tasks(cluster, tmp_path, "masked_sft.sh", out, save_steps=5,
                                          recipe_args=f"cache_dir={tmp_path / 'cache'} {RECIPE_ARGS}")
    assert "2 agent(s) x 1 process(es)" in log and "deepspeed=ds_configs/zero3.json" in log
    report = json.loads((out / "eval.json").read_text())
    assert report["world_size"] == 2 and report["sft_train"]["steps"] == 10
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert (out / "checkpoint-10" / "trainer_state.json").exists()

    # What preemption does with --requeue: the same job again, same id, same OUTPUT_DIR. On a loaded
    # machine slurmd may refuse the relaunch while it still cleans up the first run ("Job N already
    # killed, do not launch batch job": Slurm's race, not the recipe's); such a refused launch is
    # requeued again, at most twice. What is asserted is the recipe's side: the run that did launch
    # resumed from the checkpoint and ended where the first run ended.
    refusal, refused = f"Job {job} already killed, do not launch batch job", 0
    for _ in range(3):
        cluster.wait_idle()
        cluster.run("scontrol", "requeue", job)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the requeue hold-off
        record = cluster.wait(job, timeout=1200)
        slurmd_log = (cluster.root / "slurmd.log").read_text(errors="replace")
        if record["JobState"] != "FAILED" or slurmd_log.count(refusal) == refused:
            break  # launched (whatever its end), not refused
        refused += 1
    log = log_file.read_text(errors="replace")
    assert (record["JobState"], record["ExitCode"], int(record["Restarts"])) == ("COMPLETED", "0:0", 1 + refused), \
        log[-4000:] + "\n" + cluster.log_tails()
    assert f"job {job} restart {1 + refused}:" in log  # --open-mode=append keeps every run in one log
    assert f"resuming from {out / 'checkpoint-10'}" in log
    again = json.loads((out / "eval.json").read_text())
    assert again["sft_train"]["final_loss"] == report["sft_train"]["final_loss"]


def test_sbatch_dpo_with_two_tasks(cluster, tmp_path):
    """slurm/dpo.sh as written: two torchrun agents, ZeRO-3, preference pairs from a jsonl file."""
    import torch

    from halluc.core.model import tiny_llama
    from halluc.tasks import arith
    from halluc.core.tokens import add_backtrack_token, train_tokenizer

    problems = arith.make_split(64, (2, 3), seed=5)
    tok = train_tokenizer([p.prompt + p.solution for p in problems], vocab_size=300)
    add_backtrack_token(tok)
    torch.manual_seed(0)
    tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    pairs = [{"prompt": p.prompt, "chosen": p.solution, "rejected": p.solution[::-1]} for p in problems[:8]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "out"
    submit_two_tasks(cluster, tmp_path, "dpo.sh", out, save_steps=2,
                     recipe_args=f"model={tmp_path / 'sft'} data={tmp_path / 'pairs.jsonl'} steps=4 batch_size=2 "
                                 "lab.test_size=4 eval_max_new_tokens=8")
    report = json.loads((out / "eval.json").read_text())
    assert report["world_size"] == 2 and report["dpo_train"]["steps"] == 4
    assert (out / "checkpoint-4" / "trainer_state.json").exists() and (out / "train.json").exists()


def test_sbatch_prm_with_two_tasks(cluster, tmp_path, bt_tokenizer, arith_problems):
    """slurm/prm.sh as written: two torchrun agents train a PRM under ZeRO-3 from stepwise rows, and
    rank 0 decodes with it."""
    import torch

    from halluc.core.model import tiny_llama
    from halluc.objectives.prm import write_stepwise
    from halluc.sources.step_labels import stepwise_row

    torch.manual_seed(0)
    tiny_llama(len(bt_tokenizer), hidden=32, layers=1, heads=2, pad_token_id=bt_tokenizer.pad_token_id,
               eos_token_id=bt_tokenizer.eos_token_id).save_pretrained(tmp_path / "policy")
    bt_tokenizer.save_pretrained(tmp_path / "policy")
    rows = [stepwise_row(bt_tokenizer, p, p.steps, [i % 2 == 0 for i in range(len(p.steps))]) for p in arith_problems[:16]]
    write_stepwise(tmp_path / "steps.jsonl", rows)
    out = tmp_path / "out"
    submit_two_tasks(cluster, tmp_path, "prm.sh", out, save_steps=2,
                     recipe_args=f"model={tmp_path / 'policy'} data={tmp_path / 'steps.jsonl'} "
                                 f"test_data={tmp_path / 'steps.jsonl'} cache_dir={tmp_path / 'cache'} steps=4 "
                                 "batch_size=2 lab.test_size=4 eval_max_new_tokens=8")
    report = json.loads((out / "eval.json").read_text())
    assert report["world_size"] == 2 and report["prm_train"]["steps"] == 4
    assert (Path(report["prm"]) / "config.json").exists() and report["process_bench"]["all"]["erroneous"] > 0
