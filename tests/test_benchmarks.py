"""The benchmarks scripts/gpu_scale.sh runs on a GPU, run here at tiny size on CPU so they cannot rot:
benchmarks/scale.py (its rows, its FLOP count against the dense mask and a hand count, one short run of
every CPU config, ZeRO-3 in a subprocess: DeepSpeed leaves launcher variables and a process group
behind), and one step of benchmarks/dpo.py and benchmarks/grpo.py against TRL."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from conftest import run_processes

from halluc.core.example import IGNORE_INDEX
from halluc.structure.attention import dense_mask

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / f"benchmarks/{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale = load_benchmark("scale")


@pytest.mark.parametrize("attention", ["causal", "block"])
def test_rows_are_full_and_pairs_match_the_dense_mask(attention):
    rows = scale.packed_rows(3, 1024, 500, attention, seed=1)
    for row in rows:
        assert len(row["input_ids"]) == 1024 and len(row["unit_starts"]) > 2  # several examples, no padding
        assert scale.allowed_pairs(row["attn_end"]) == int(dense_mask(torch.as_tensor(row["attn_end"])).sum())


def test_blocking_removes_pairs_and_only_those():
    """Negative control for the count: the same rows with errors blocked allow fewer pairs than causal
    packing (an error is hidden from what follows its BTs), and the matmul terms do not change."""
    causal, block = scale.packed_rows(2, 2048, 500, "causal", seed=3), scale.packed_rows(2, 2048, 500, "block", seed=3)
    assert [len(r["input_ids"]) for r in causal] == [len(r["input_ids"]) for r in block]
    assert all(scale.allowed_pairs(b["attn_end"]) < scale.allowed_pairs(c["attn_end"]) for b, c in zip(block, causal))
    # the same tokens and labels: the required FLOPs differ by the attention term alone
    cfg = LlamaConfig(**scale.SHAPES["tiny"])
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_pair = 12 * head_dim * cfg.num_attention_heads * cfg.num_hidden_layers
    for b, c in zip(block, causal):
        assert np.array_equal(b["labels"], c["labels"])
        diff = scale.required_flops(c, cfg) - scale.required_flops(b, cfg)
        assert diff == per_pair * (scale.allowed_pairs(c["attn_end"]) - scale.allowed_pairs(b["attn_end"]))


def test_required_flops_golden():
    """One hand-counted row: 2 examples of 3 tokens, causal; shape hidden 8, 2 heads (kv 1), inter 16,
    1 layer, vocabulary 10."""
    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    row = {"input_ids": np.arange(6), "attn_end": np.array([3, 3, 3, 6, 6, 6]),
           "labels": np.array([IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7]),
           "pred_pos": np.array([-1, 0, 1, -1, 3, 4])}
    # q 8x8, k and v 8x4 each, o 8x8, gate/up/down 8x16 each = 64 + 64 + 64 + 384 = 576 matmul weights
    matmuls = 6 * 576 * 6
    head = 6 * 8 * 10 * 3                 # three trained tokens
    attention = 12 * 4 * 2 * 1 * (6 + 6)  # each example: 3 + 2 + 1 pairs
    assert scale.required_flops(row, cfg) == matmuls + head + attention


def test_config_parsing_refuses_what_it_cannot_run():
    assert str(scale.Config.parse("block/flex+compile+ckpt")) == "block/flex+compile+ckpt"
    for bad in ("block", "sideways/flex", "block/flex+turbo", "block/flex+liger+zero3"):
        with pytest.raises(SystemExit):
            scale.Config.parse(bad)


def test_every_cpu_config_runs_and_reports(capsys):
    results = scale.main(["--lengths", "256", "--steps", "2", "--warmup", "1", "--peak-tflops", "1"])
    assert [r["config"] for r in results] == scale.DEFAULT_CONFIGS["cpu"]
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] == pytest.approx(r["tflops"] / 1)
    table = capsys.readouterr().out
    assert "| 256 | block/varlen | varlen |" in table and "block vs causal" in table


@pytest.mark.slow
def test_zero3_config_runs_in_one_process():
    out = run_processes([sys.executable, "benchmarks/scale.py", "--lengths", "256", "--steps", "2", "--warmup", "1",
                         "--configs", "block/varlen+zero3"], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 256 | block/varlen+zero3 | varlen |" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]


def test_the_dpo_benchmark_runs_its_three_trainers(capsys):
    pytest.importorskip("trl")
    load_benchmark("dpo").main(["--pairs", "8", "--batch", "4", "--steps", "2", "--warmup", "1", "--repeats", "1",
                                "--hidden", "32", "--layers", "1", "--context", "2"])
    out = capsys.readouterr().out
    for row in ("| TRL DPOTrainer (padded, prompt twice) |", "| halluc, one pair per row |", "| halluc, packed ("):
        assert row in out, out[-2000:]


def test_the_grpo_benchmark_runs_both_trainers(capsys):
    pytest.importorskip("trl")
    load_benchmark("grpo").main(["--prompts", "2", "--group", "2", "--max-new-tokens", "8", "--steps", "1",
                                 "--warmup", "1", "--hidden", "32", "--layers", "1", "--heads", "2"])
    out = capsys.readouterr().out
    assert "| TRL GRPOTrainer |" in out and "| halluc recipes/grpo.py path |" in out and "hidden 32 x 1 layers" in out


def gpu_script_commands(script: str) -> list[tuple[int, str, list[str]]]:
    """(timeout s, benchmark name, its arguments) of each `timeout N python3 benchmarks/X.py ...` line."""
    import re
    import shlex

    text = (ROOT / script).read_text().replace("\\\n", " ")
    found = re.findall(r"timeout (\d+) python3 benchmarks/(\w+)\.py ([^>\n]*)", text)
    return [(int(t), name, shlex.split(args)) for t, name, args in found]


def test_the_gpu_script_passes_arguments_its_benchmarks_read_within_one_device_call(monkeypatch):
    """The device lends one call of at most 600 s: the script's benchmark commands must parse (flags,
    configs) and their timeouts leave room for the installs. A typo here costs the scarce GPU run."""
    import argparse

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    commands = gpu_script_commands("scripts/gpu_scale.sh")
    assert {name for _, name, _ in commands} == {"scale", "dpo", "grpo"}
    for _, name, args in commands:
        with pytest.raises(Parsed) as parsed:
            load_benchmark(name).main(args)
        if name == "scale":
            assert all(scale.Config.parse(c) for c in parsed.value.args[0].configs)
    assert sum(t for t, _, _ in commands) <= 560
    with pytest.raises(SystemExit):  # negative control: a flag the benchmark does not have
        load_benchmark("scale").main(["--size", "1b", "--lenghts", "4096"])
