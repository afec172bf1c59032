"""Retry pretraining (Physics of LMs 2.2; issue 24): the lab base trained on solutions whose steps are
first written wrong and erased, at a per-step rate, at the clean base's token budget."""
import random

import pytest
from conftest import load_script

from halluc.core.example import Role, apply_backtrack
from halluc.core.tokens import backtrack_id
from halluc.sources.data import make_example, tokenize_problem
from halluc.sources.errors import ErrorConfig
from halluc.tasks import arith


def test_an_early_error_is_a_later_step_not_computable_yet(arith_problems):
    """mode=early writes only P2.2's error: a later step whose input is not computed yet (the verifier
    says not_computed after the right prefix); never at the answer step. mode=any mixes kinds."""
    seen = 0
    for p in arith_problems[:150]:
        rng = random.Random(0)
        n_ops = len(p.steps) - 1
        assert arith.corrupt_step(p, n_ops, rng, mode="early") is None  # the answer step
        for i in range(n_ops):
            wrong = arith.corrupt_step(p, i, rng, mode="early")
            if wrong is None:
                continue
            seen += 1
            assert wrong in p.steps[i + 1:] and wrong != p.steps[i]
            assert arith.verify_steps(p, p.steps[:i] + [wrong]).kinds[i] == "not_computed"
    assert seen > 100
    kinds = {arith.verify_steps(p, p.steps[:1] + [arith.corrupt_step(p, 1, random.Random(s))]).kinds[1]
             for p in arith_problems[:40] if len(p.steps) > 3 for s in range(3)}
    assert len(kinds) > 1  # the default mix: retrieval / arithmetic / early errors
    with pytest.raises(ValueError, match="any or early"):
        arith.corrupt_step(arith_problems[0], 0, random.Random(0), mode="result")


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_every_step_gets_an_error_at_the_per_step_rate(bt_tokenizer, arith_problems, rate):
    """step_rate draws each step independently (P2.2's retry_rate): over ~1,000 steps the error rate is
    within 4 standard errors of the rate; every example erases back to the clean solution."""
    bt = backtrack_id(bt_tokenizer)
    errors = ErrorConfig(source="step", step_rate=rate, step_kind="any")
    rng, steps, wrong = random.Random(1), 0, 0
    for p in arith_problems:
        prompt, pieces = tokenize_problem(p, bt_tokenizer)
        ex = make_example(p, bt_tokenizer, errors, bt, rng, (prompt, pieces))
        clean = [t for s in pieces for t in s] + [bt_tokenizer.eos_token_id]
        assert apply_backtrack(ex.response, bt) == clean
        runs = sum(1 for j, r in enumerate(ex.roles) if r == Role.BACKTRACK and ex.roles[j - 1] != Role.BACKTRACK)
        steps += len(pieces)
        wrong += runs
    assert abs(wrong / steps - rate) < 4 * (rate * (1 - rate) / steps) ** 0.5, (wrong, steps)


def test_the_retry_base_trains_on_the_clean_base_token_budget_and_keeps_its_bt_row(tmp_path):
    """base_retry.rate=0.5: the base's tokenizer has BT from the start, it trains fewer steps so steps x
    mean tokens per example equals the clean base's, its BT row is kept through SFT (no semantic init),
    and backtracking's own effect is measured on the base too. A clean base beside it keeps its key."""
    import json

    recipe = load_script("recipes/masked_sft.py")
    common = [f"cache_dir={tmp_path}/cache", "base.steps=40", "sft.steps=4", "lab.train_size=300", "lab.sft_size=100",
              "lab.test_size=8", "tiny.hidden=32", "eval_max_new_tokens=24", "base.batch_size=8", "sft.batch_size=8"]
    report = recipe.main([f"output_dir={tmp_path}/retry", "base_retry.rate=0.5", *common])
    bases = sorted(p for p in (tmp_path / "cache").glob("base-*") if p.is_dir() and not p.name.endswith(".run"))
    assert len(bases) == 1
    train = json.loads((bases[0] / "train.json").read_text())
    assert train["clean_steps"] == 40 and train["mean_tokens_per_example"] > train["clean_mean_tokens_per_example"]
    assert train["steps"] == round(40 * train["clean_mean_tokens_per_example"] / train["mean_tokens_per_example"]) < 40
    assert train["bt_per_example"] > 1
    from transformers import AutoTokenizer

    assert backtrack_id(AutoTokenizer.from_pretrained(bases[0])) == report["backtrack_id"]
    assert report["bt_init_words"] is None  # the trained row is kept, not initialised again
    assert "answer_acc_bt_banned" in report["before"]["test_id"]  # the base can backtrack: its own effect
    clean = recipe.main([f"output_dir={tmp_path}/clean", *common])
    assert clean["bt_init_words"] is not None and len([p for p in (tmp_path / "cache").glob("base-*")
                                           if p.is_dir() and not p.name.endswith(".run")]) == 2


def test_cache_keys_of_clean_runs_stay_what_they_were_and_retry_runs_get_their_own():
    """Models cached before retry pretraining existed are found again: the lab SFT model's key leaves out
    errors.step_kind / step_rate at their defaults and base_retry at rate 0 (the base's key likewise, in
    lab_base_model); a retry base or per-step errors change the key. errors.step_rate needs step errors."""
    from halluc.pipeline.sft import lab_sft_settings

    dpo = load_script("recipes/dpo.py")
    clean = lab_sft_settings(dpo.load(["output_dir=/tmp/x"]))
    assert "base_retry" not in clean and not {"step_kind", "step_rate"} & set(clean["errors"])
    assert set(clean) == {"seed", "lab", "tiny", "base", "sft", "errors", "num_proc", "deepspeed",
                          "eval_max_new_tokens", "attention", "positions", "backend"}  # the keys cached models have
    retry = lab_sft_settings(dpo.load(["output_dir=/tmp/x", "base_retry.rate=0.2"]))
    assert retry["base_retry"]["rate"] == 0.2
    assert lab_sft_settings(dpo.load(["output_dir=/tmp/x", "errors.step_rate=0.2"]))["errors"]["step_rate"] == 0.2
    with pytest.raises(SystemExit, match="errors.step_rate=0.2 draws wrong steps"):
        dpo.load(["output_dir=/tmp/x", "errors.step_rate=0.2", "errors.source=random"])


def test_a_clean_base_keeps_its_cache_key(tmp_path):
    """The clean lab base's folder is named by the key it had before base_retry existed (negative
    control: a retry base is not)."""
    import json

    from halluc.core.artifacts import artifact_path
    from halluc.core.config import Stage, as_dict
    from halluc.pipeline.lab import LabConfig, ModelConfig, RetryData, base_settings
    from halluc.pipeline import stages

    lab, tiny, stage = LabConfig(train_size=40, sft_size=20, test_size=4), ModelConfig(hidden=16), Stage(steps=1)
    old_key = json.dumps([base_settings(lab), as_dict(tiny), as_dict(stage), 0, 0, 256, 1], sort_keys=True)
    splits = __import__("halluc.pipeline.lab", fromlist=["lab_splits"]).lab_splits(lab, 0)
    run = stages.RunSettings()
    _, _, folder = stages.lab_base_model(lab, tiny, stage, splits["train"], str(tmp_path), run)
    assert folder == artifact_path(str(tmp_path), "base", old_key)
    _, _, retry = stages.lab_base_model(lab, tiny, stage, splits["train"], str(tmp_path), run, retry=RetryData(rate=0.5))
    assert retry != folder
