"""DeepSpeed ZeRO-2/3 for real on CPU (gloo): 2 processes shard, train like 1, save what reloads.

Each test launches tests/helpers/ds_job.py (a tiny model through halluc.training.train's edit-tree
Trainer path) under torchrun or the deepspeed launcher; the job records from inside what each
rank holds and its per-step losses. The 1-process reference runs here, without DeepSpeed, with
the same global batch (8 = 2 x 4). The launcher-less `python` + ZeRO-3 form is covered by
tests/test_resume.py.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, deepspeed_launcher, load_script, run_processes, shared_memory_left
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

JOB = ROOT / "tests" / "helpers" / "ds_job.py"


def launch(launcher: list[str], out: Path, *args: str, timeout: int = 900) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = run_processes([*launcher, str(JOB), "--out", str(out), *args], env=env, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(launcher)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no DeepSpeed, batch 8: losses and final logits, full fine-tuning and LoRA."""
    job = load_script("tests/helpers/ds_job.py")
    out = {}
    for name, extra in (("full", []), ("lora", ["--lora"])):
        d = tmp_path_factory.mktemp(f"reference-{name}")
        job.main(["--out", str(d), *extra])
        out[name] = {"losses": json.loads((d / "rank0.json").read_text())["losses"],
                     "logits": torch.load(d / "logits.pt")["logits"]}
    return out


def assert_same_training(ranks: list[dict], out: Path, ref: dict):
    for r in ranks:  # every rank logs the loss averaged over both
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
    saved = torch.load(out / "logits.pt")
    torch.testing.assert_close(saved["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    return saved


@pytest.mark.slow
def test_zero3_two_processes_shard_train_like_one_and_save_a_checkpoint_that_reloads(tmp_path, reference):
    ranks = launch(torchrun(), tmp_path, "--deepspeed", "ds_configs/zero3.json")
    assert [r["world_size"] for r in ranks] == [2, 2]
    params = ranks[0]["params"]
    assert params, "no parameters recorded"
    # Each rank holds half of every parameter (its ds_tensor), except those under the persistence
    # threshold ("auto" = 10 x hidden): small vectors are kept whole, as on a GPU cluster.
    for name, p in params.items():
        if p["full"] > 10 * 32:
            assert p["held"] == ranks[1]["params"][name]["held"] == -(-p["full"] // 2), (name, p)
    held, full = (sum(p[k] for p in params.values()) for k in ("held", "full"))
    assert held < 0.52 * full, (held, full)
    emb = params["model.embed_tokens.weight"]
    print(f"ZeRO-3: embed_tokens {emb['held']} of {emb['full']} elements per rank; all parameters {held} of {full}")
    saved = assert_same_training(ranks, tmp_path, reference["full"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # this process, not the job's
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=saved["input_ids"]).logits, saved["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero2_deepspeed_launcher_shards_optimizer_state_and_trains_like_one(tmp_path, reference):
    launcher = deepspeed_launcher()
    ranks = launch(launcher, tmp_path, "--deepspeed", "ds_configs/zero2.json")
    assert shared_memory_left(launcher) == []  # DeepSpeed's CPU collective kept off (skip_shared_memory_collective)
    for r in ranks:
        assert all(p["held"] == p["full"] for p in r["params"].values())  # parameters stay whole
        opt = r["optimizer"]  # the fp32 master weights + Adam moments are split between ranks
        assert opt["fp32_partition_numel"] < opt["param_numel"] <= 2 * opt["fp32_partition_numel"], opt
    print(f"ZeRO-2 fp32 partition per rank: {ranks[0]['optimizer']}")
    saved = assert_same_training(ranks, tmp_path, reference["full"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=saved["input_ids"]).logits, saved["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero3_with_lora_shards_the_adapter_and_saves_it_whole(tmp_path, reference):
    from peft import PeftModel

    ranks = launch(torchrun(), tmp_path, "--deepspeed", "ds_configs/zero3.json", "--lora")
    lora = {n: p for n, p in ranks[0]["params"].items() if "lora_A" in n or "trainable_tokens_delta" in n}
    assert lora and all(p["held"] < p["full"] for p in lora.values()), lora
    saved = assert_same_training(ranks, tmp_path, reference["lora"])
    adapter = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    bt_rows = {k: v.shape for k, v in adapter.items() if "trainable_tokens_delta" in k}
    assert len(bt_rows) == 2 and all(s == (1, 32) for s in bt_rows.values()), bt_rows  # gathered, not a shard
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=saved["input_ids"]).logits, saved["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_self_correction_rounds_go_on_under_two_processes(tmp_path):
    """Round 2 samples from round 1's model on every rank: under DeepSpeed rank 1 got no model back
    from save_stage (None) and crashed; both ranks also wrote the round's data at once."""
    args = [f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "lab.train_size=400", "lab.sft_size=200",
            "lab.test_size=8", "tiny.hidden=32", "base.steps=40", "base.batch_size=8", "sft.steps=4",
            "sft.batch_size=8", "deepspeed=ds_configs/zero2.json", "eval_max_new_tokens=24", "rounds=2",
            "round_examples=48", "sampler.problems=16", "sampler.k=2", "sampler.max_new_tokens=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = run_processes([*torchrun(), "recipes/self_correct.py", *args], env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [x["round"] for x in report["rounds"]] == [1, 2]
    assert (tmp_path / "out" / "round-2" / "checkpoint" / "config.json").exists()


def test_launch_glue_without_a_launcher(monkeypatch, tmp_path):
    """The deepspeed launcher's --local_rank is dropped; a plain process gets the env DeepSpeed needs
    (and a launcher's env is left alone)."""
    from halluc.core.distributed import LAUNCHER_ENV, prepare_deepspeed, strip_launcher_args

    assert strip_launcher_args(["a=1", "--local_rank=1", "--local-rank", "0", "b=2"]) == ["a=1", "b=2"]
    # a private copy of the environment: what prepare_deepspeed sets must not reach later tests
    # (or their subprocesses, which would then wait for ranks that do not exist)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in LAUNCHER_ENV and k != "TORCH_EXTENSIONS_DIR"})
    prepare_deepspeed(None)
    assert "RANK" not in os.environ and "TORCH_EXTENSIONS_DIR" not in os.environ
    prepare_deepspeed(str(ROOT / "ds_configs" / "zero3.json"))
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == ["0", "1", "0", "127.0.0.1"]
    # issue 22, item 13: DeepSpeed's CPU op is built per environment, not in one folder every clone and
    # venv of the user shares (they rebuilt it for each other); a folder the user chose is kept
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    import deepspeed.ops  # DeepSpeed's CPU shared-memory collective off: no JIT build, no /dev/shm segments

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)  # what its probe says on CPU
    prepare_deepspeed(str(ROOT / "ds_configs" / "zero3.json"))
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "mine")
    prepare_deepspeed(str(ROOT / "ds_configs" / "zero3.json"))
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "12345")
    prepare_deepspeed(str(ROOT / "ds_configs" / "zero2.json"))
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "12345")
    with pytest.raises(SystemExit, match="no such file"):
        prepare_deepspeed(str(tmp_path / "missing.json"))
    for name in ("zero2", "zero3", "zero3_offload"):
        config = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto"
        if name != "zero2":
            assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_hung_process_tree_fails_the_test_with_its_stacks_and_ends(tmp_path):
    """tests/conftest.py run_processes, which every launcher test uses: past its timeout, a process whose
    parent has already exited (as a rank after its launcher) and holds the output pipes still prints
    where it hung and is ended; the test fails instead of waiting (CI waited 20 min, stop 35)."""
    import psutil

    pid_file = tmp_path / "pid"
    orphan = ("import os, time\ndef hung_here():\n"
              f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n    time.sleep(600)\nhung_here()\n")
    # the parent exits once the orphan is inside hung_here (however slowly Python starts on this machine)
    parent = (f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {orphan!r}])\n"
              f"while not os.path.exists({str(pid_file)!r}):\n    time.sleep(0.05)\n")
    with pytest.raises(pytest.fail.Exception, match="did not end in 10 s") as failed:
        run_processes([sys.executable, "-c", parent], timeout=10)
    assert "hung_here" in str(failed.value)  # the orphan's Python stack
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # a process that crashes (as gloo's threads at teardown, rarely) shows its stack where failure
    # messages look: at the end of stderr
    crash = "import os\ndef crashing_here():\n    os.abort()\ncrashing_here()\n"
    crashed = run_processes([sys.executable, "-c", crash], timeout=60)
    assert crashed.returncode == -6 and "crashing_here" in crashed.stderr[-1000:]
