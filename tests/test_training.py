"""A short masked-SFT run through the HF Trainer: the loss falls, the checkpoint reloads exactly."""
import copy
import json
from pathlib import Path

from conftest import load_script

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from halluc.core.config import LayoutSettings
from halluc.sources.data import build_sft_dataset
from halluc.sources.errors import ErrorConfig
from halluc.core.model import init_backtrack_embedding, tiny_llama
from halluc.core.tokens import BACKTRACK_TOKEN, add_backtrack_token, backtrack_id
from halluc.training.train import make_trainer, training_args

ROOT = Path(__file__).resolve().parents[1]


def test_short_training_run_loss_falls_and_checkpoint_reloads(lab_tokenizer, arith_problems, tmp_path, caplog):
    torch.manual_seed(0)
    tok = copy.deepcopy(lab_tokenizer)
    model = tiny_llama(len(tok), hidden=64, layers=2, heads=4)
    with caplog.at_level("INFO"):
        bt = add_backtrack_token(tok, model)  # a tokenizer without BT gets it; the model is resized
    assert any("added it as id" in r.message for r in caplog.records)
    assert any("resized the model's embeddings" in r.message for r in caplog.records)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == bt + 1
    init_backtrack_embedding(model, tok, bt)
    data = build_sft_dataset(arith_problems, tok, ErrorConfig(example_rate=0.5), bt)
    args = training_args(str(tmp_path / "run"), steps=60, batch_size=16, lr=3e-3, log_every=10)
    trainer = make_trainer(model, args, data, tb_dir=str(tmp_path / "tb"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
    logged = [h for h in trainer.state.log_history if "masked_label_fraction" in h]
    assert logged and all(0 < h["masked_label_fraction"] < 0.5 and h["tokens_per_s"] > 0 for h in logged)

    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert backtrack_id(tok2) == bt == tok2.convert_tokens_to_ids(BACKTRACK_TOKEN)
    ids = torch.tensor([data[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_recipe_end_to_end_tiny(tmp_path):
    """The recipe with a tiny configuration: base, eval, SFT, eval, checkpoint, TensorBoard, JSON."""
    recipe = load_script("recipes/masked_sft.py")
    report = recipe.main([f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "base.steps=30",
                          "sft.steps=20", "layout.attention=block_errors", "layout.positions=rewound", "layout.pack=256", "lab.train_size=400",
                          "lab.sft_size=200", "lab.test_size=16", "tiny.hidden=32", "eval_max_new_tokens=40",
                          "base.batch_size=8", "sft.batch_size=8"])  # 8 packed rows: ~40 examples a step
    out = tmp_path / "out"
    saved = json.loads((out / "eval.json").read_text())
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["halluc"]["attention"] == "block_errors" and config["halluc"]["positions"] == "rewound"
    assert set(saved["before"]) == set(saved["after"]) == {"test_id", "test_ood"}
    assert saved["backtrack_id"] == report["backtrack_id"]
    tok = AutoTokenizer.from_pretrained(out / "checkpoint")
    assert backtrack_id(tok) == saved["backtrack_id"]
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_s", "train/masked_label_fraction"} <= tags
    # evaluation metrics per split, before and after, and the run's settings next to them
    assert {"eval/base/test_id/answer_acc", "eval/sft/test_ood/full_solution_acc", "eval/sft/test_id/bt_per_problem",
            "hparam/eval/sft/test_id/answer_acc"} <= tags
    assert config["halluc"]["lab"]["task"] == "arith" and config["halluc"]["recipe"] == "masked_sft"
    # the second run reuses the cached base
    again = recipe.main([f"output_dir={tmp_path}/out2", f"cache_dir={tmp_path}/cache", "base.steps=30",
                         "sft.steps=2", "lab.train_size=400", "lab.sft_size=200", "lab.test_size=16",
                         "tiny.hidden=32", "eval_max_new_tokens=40", "layout.pack=256", "base.batch_size=8"])  # the base's settings
    assert again["before"] == report["before"]


def test_recipe_with_local_model_on_gsm8k(tmp_path, gsm8k_test_file):
    """--model DIR (any local HF causal LM without the BT token) on real GSM8K files."""
    from halluc.tasks import gsm8k
    from halluc.core.tokens import train_tokenizer

    problems = gsm8k.read_jsonl(gsm8k_test_file, limit=200)
    tok = train_tokenizer([p.prompt + p.solution for p in problems], vocab_size=500)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    recipe = load_script("recipes/masked_sft.py")
    train_file = gsm8k_test_file.parent / "train.jsonl"
    report = recipe.main(["--model", str(tmp_path / "base"), "lab.task=gsm8k", f"lab.train_file={train_file}",
                          f"lab.test_file={gsm8k_test_file}", "lab.sft_size=64", "lab.test_size=8",
                          "sft.steps=3", "sft.batch_size=4", f"output_dir={tmp_path}/out", "eval_max_new_tokens=16"])
    assert set(report["after"]) == {"test_id"} and report["after"]["test_id"]["n"] == 8
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "out" / "checkpoint")
    assert backtrack_id(tok2) == len(tok)  # added after the 500-token vocabulary


def test_tree_trainer_glue_matches_the_stock_loss_and_blocks_errors(bt_tokenizer, arith_problems):
    """Causal through the edit-tree path == the model's own loss; block_errors differs (control)."""
    from halluc.structure.backends import forward_loss
    from halluc.training.train import TreeCollator

    torch.manual_seed(0)
    bt = backtrack_id(bt_tokenizer)
    model = tiny_llama(len(bt_tokenizer), hidden=64, layers=2, heads=4)
    rows = list(build_sft_dataset(arith_problems[:8], bt_tokenizer, ErrorConfig(example_rate=1.0), bt))
    causal = TreeCollator("causal", "original")(rows)
    with torch.no_grad():
        # HF's own loss (it shifts the labels itself) on right-padded rows: the independent reference
        stock = model(input_ids=causal["input_ids"], attention_mask=causal["is_real"].long(),
                      labels=causal["labels"]).loss
        native, _ = forward_loss(model, causal, "native")
        tree, _ = forward_loss(model, causal, "dense")
        blocked, _ = forward_loss(model, TreeCollator("block_errors", "rewound")(rows), "dense")
    torch.testing.assert_close(native, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree, stock, rtol=1e-5, atol=1e-5)
    assert abs(blocked.item() - stock.item()) > 1e-3


def test_block_errors_packed_training_loss_falls(bt_tokenizer, arith_problems, tmp_path):
    from halluc.structure.packing import pack_examples

    torch.manual_seed(0)
    bt = backtrack_id(bt_tokenizer)
    model = tiny_llama(len(bt_tokenizer), hidden=64, layers=2, heads=4)
    data = build_sft_dataset(arith_problems, bt_tokenizer, ErrorConfig(example_rate=0.5), bt)
    packed = pack_examples(list(data), 512, "block_errors", "rewound")
    assert packed.real_fraction > 0.95
    args = training_args(str(tmp_path / "run"), steps=40, batch_size=4, lr=3e-3, log_every=10)
    trainer = make_trainer(model, args, packed.rows, str(tmp_path / "tb"),
                           layout=LayoutSettings("block_errors", "rewound", "dense_units"), packed=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_ddp_timeout_setting_reaches_the_training_arguments(tmp_path, monkeypatch):
    """Rank 0 evaluates while the others wait at a barrier whose timeout the process group takes from
    the first stage's TrainingArguments: `ddp_timeout=` must get there (docs/scaling.md)."""
    import pytest

    import halluc.pipeline.stages as stages
    from halluc.core.config import Stage, load_config
    from halluc.pipeline.sft import SFTConfig

    cfg = load_config(SFTConfig, ["ddp_timeout=7200", f"output_dir={tmp_path}/o", f"cache_dir={tmp_path}/c"])
    run = stages.RunSettings.of(cfg)
    seen = {}

    def spy(out_dir, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(stages, "training_args", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        stages.train_stage(None, [{"input_ids": [1, 2], "labels": [1, 2], "roles": [1, 1]}], Stage(steps=1), str(tmp_path), run)
    assert seen["ddp_timeout"] == 7200 and training_args(str(tmp_path), steps=1, batch_size=1, lr=0.0,
                                                         ddp_timeout=seen["ddp_timeout"]).ddp_timeout == 7200


def test_a_cached_lab_models_evaluation_is_redone_when_the_scoring_code_changes(tmp_path, monkeypatch):
    """The DPO / GRPO / PRM 'start' row comes from the cached lab model: kept beside its checkpoint,
    shared by every later run with the same problems and budget, and made again after the scoring
    code changed (its eval.json, keyed by settings alone, was reused then). Negative control: the
    same code version reads the kept one."""
    import halluc.pipeline.stages as stages
    from halluc.pipeline.sft import cached_evaluation
    from halluc.tasks import arith

    calls = []

    def fake_evaluate(model, tokenizer, problems, task, max_new_tokens, desc=""):
        calls.append(desc)
        return {"answer_acc": 0.5, "n": len(problems)}

    monkeypatch.setattr(stages, "evaluate_problems", fake_evaluate)
    checkpoint = tmp_path / "sft-123" / "checkpoint"
    checkpoint.mkdir(parents=True)
    tests = {"test_id": arith.make_split(3, (2, 2), seed=1)}
    for version in ("v1", "v1", "v2"):
        monkeypatch.setattr(stages, "evaluation_version", lambda: version)
        out = cached_evaluation(torch.nn.Linear(1, 1), None, str(checkpoint), tests, arith, 32, "start")
        assert out == {"test_id": {"answer_acc": 0.5, "n": 3}}
    assert len(calls) == 2  # v1 once (then read), v2 again
    assert len(list((tmp_path / "sft-123").glob("eval-*.json"))) == 2


def test_the_lab_chain_trains_with_the_main_jobs_length_and_packing(tmp_path):
    """GRPO from the base (`lab_base_policy`) built the lab base with the GRPO run's max_len and
    layout.pack, which its cache key leaves out: whichever run came first decided the model. The lab
    chain's settings take them from masked SFT, like `lab_sft_model`."""
    from conftest import load_script

    from halluc.core.config import load_config
    from halluc.pipeline.sft import SFTConfig, lab_chain_config

    grpo = load_script("recipes/grpo.py")
    cfg = load_config(grpo.Config, ["max_len=64", "layout.pack=512", "seed=3", "ddp_timeout=7200", f"cache_dir={tmp_path}/c"],
                      default_file=str(Path(grpo.__file__).parent / "configs" / "grpo.yaml"))
    chain = lab_chain_config(cfg, str(tmp_path / "o"))
    assert (cfg.max_len, cfg.layout.pack) == (64, 512)
    assert (chain.max_len, chain.layout.pack) == (SFTConfig.max_len, SFTConfig().layout.pack)
    assert chain.seed == 3 and chain.lab == cfg.lab and chain.cache_dir == cfg.cache_dir and chain.ddp_timeout == 7200
