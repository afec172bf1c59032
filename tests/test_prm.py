"""Technique 7: the PRM's data (against TRL's own tokenization), its objective, the recipe end to
end on arith and GSM8K files, and `recipes/evaluate.py --prm`."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_DIR, load_script

from halluc.core.example import IGNORE_INDEX
from halluc.objectives.prm import StepClassification, StepCollator, prm_example, read_stepwise, write_stepwise
from halluc.sources.step_labels import stepwise_row, verifier_labels, with_wrong_step
from halluc.tasks import arith
from helpers.trl_prm import tokenize_row


def _rows(tok, problems, n=40):
    rng = random.Random(0)
    rows = []
    for p in problems[:n]:
        steps = with_wrong_step(arith, p, rng.randrange(len(p.steps)), rng) or list(p.steps)
        rows.append(stepwise_row(tok, p, steps, verifier_labels(arith, p, steps)))
    return rows


def test_prm_rows_read_the_same_in_trls_prm_trainer(bt_tokenizer, arith_problems):
    """TRL's PRMTrainer.tokenize_row (trl 0.24, vendored: TRL 1.x dropped the PRM trainer) on our
    stepwise rows gives exactly our ids and step-end labels (halluc steps carry their separator, so
    TRL's step_separator is ""). Negative control: TRL's default separator appends one more token."""
    rows = _rows(bt_tokenizer, arith_problems)
    assert any(False in r["labels"] for r in rows)
    for row in rows:
        ours = prm_example(row)
        theirs = tokenize_row({k: row[k] for k in ("prompt", "completions", "labels")}, bt_tokenizer, "", None, None,
                              None, False, False)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]
        assert [ours["labels"][i] for i in ours["step_ends"]] == [int(x) for x in row["labels"]]
        assert prm_example({k: row[k] for k in ("prompt", "completions", "labels")}, bt_tokenizer) == ours
    other = tokenize_row(rows[0], bt_tokenizer, "\n", None, None, None, False, False)
    assert other["input_ids"] != prm_example(rows[0])["input_ids"]


def test_step_classification_is_cross_entropy_at_the_labelled_step_ends():
    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 2)
            logits[..., 1] = input_ids.float()  # P(right) rises with the token id
            return type("Out", (), {"logits": logits})()

    batch = StepCollator()([{"input_ids": [5, 0, 2], "labels": [IGNORE_INDEX, 1, 0]},
                            {"input_ids": [1, 3], "labels": [IGNORE_INDEX, 1]}])
    loss, metrics = StepClassification()(Fixed(), batch)
    # labelled: id 0 label 1, id 2 label 0, id 3 label 1; logits (0, id). The classes weigh alike (issue 23):
    # the mean of the right steps' mean loss and the wrong step's loss, not the mean over the three steps
    ce = torch.nn.functional.cross_entropy(torch.tensor([[0., 0.], [0., 2.], [0., 3.]]), torch.tensor([1, 0, 1]),
                                           reduction="none")
    torch.testing.assert_close(loss, (ce[[0, 2]].mean() + ce[1]) / 2)
    assert not torch.isclose(loss, ce.mean())  # the unweighted mean differs (the control)
    assert float(metrics["step_acc"]) == pytest.approx(1 / 3)  # ties (id 0) go to label 0
    assert (batch["shift_labels"] != IGNORE_INDEX).sum() == 3  # the items the trainer weighs by
    # a micro-batch whose step ends were all cut off: a zero loss that still backpropagates, not NaN
    weight = torch.nn.Parameter(torch.ones(()))

    class Scaled(Fixed):
        def forward(self, input_ids, attention_mask):
            out = super().forward(input_ids, attention_mask)
            out.logits = out.logits * weight
            return out

    empty = StepCollator()([{"input_ids": [5, 0], "labels": [IGNORE_INDEX, IGNORE_INDEX]}])
    loss, metrics = StepClassification()(Scaled(), empty)
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics == {} and weight.grad is not None


def test_read_stepwise_names_the_file_and_line(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completions": ["a"], "labels": [True]}) + "\n"
                    + json.dumps({"prompt": "q", "completions": ["a", "b"], "labels": [True]}) + "\n")
    with pytest.raises(ValueError, match=r"steps.jsonl:2: 2 completions but 1 labels"):
        read_stepwise(path)
    path.write_text('{"prompt": "q", "completions": [], "labels": []}\n')
    with pytest.raises(ValueError, match=r"steps.jsonl:1: completions is empty"):
        read_stepwise(path)
    path.write_text('{"prompt": "q", "labels": []}\n')
    with pytest.raises(ValueError, match=r"steps.jsonl:1: .*missing completions"):
        read_stepwise(path)


@pytest.fixture(scope="module")
def cache(lab_cache):
    return lab_cache  # lab bases trained once per test run, whichever test needs one first


TINY = ["lab.train_size=2000", "lab.sft_size=200", "lab.test_size=24", "step_data.problems=120",
        "step_data.test_problems=24", "step_data.agreement=16", "step_data.samples=1", "steps=60", "batch_size=16",
        "lr=3e-3", "eval_max_new_tokens=96"]


def test_the_recipe_trains_a_prm_guides_decoding_and_scores_it(tmp_path, lab_policy, cache):
    """model=DIR: labelled data from the policy, a PRM trained and saved as a plain HF token-
    classification folder, ProcessBench scores, rollout agreement, PRM-guided decoding; then
    recipes/evaluate.py --prm on the held-out rows prints and writes the same scores."""
    from transformers import AutoModelForTokenClassification

    folder = lab_policy[0]
    recipe = load_script("recipes/prm.py")
    report = recipe.main([f"model={folder}", f"output_dir={tmp_path}/out", f"cache_dir={cache}", *TINY])
    prm_dir = report["prm"]
    assert AutoModelForTokenClassification.from_pretrained(prm_dir).config.num_labels == 2
    # issue 22, item 2: output_dir shows the PRM and the labelled solutions (--help said so; they lay only in
    # cache_dir): links to the cached folders
    out = tmp_path / "out"
    assert (out / "prm").resolve() == Path(prm_dir).resolve() and (out / "prm" / "config.json").exists()
    assert (out / "data").resolve() == Path(report["step_data"]["folder"]).resolve()
    assert (out / "data" / "train.jsonl").exists() and (out / "data" / "test.jsonl").exists()
    bench = report["process_bench"]["all"]
    assert bench["erroneous"] > 0 and bench["correct"] > 0 and 0 <= bench["f1"] <= 1
    assert bench["step_auc"] > 0.6  # the PRM learned something about wrong steps
    assert report["step_data"]["agreement"]["steps"] > 0
    after = report["after"]["test_id"]
    assert after["guided_runs_per_problem"] > 0 and after["tokens_per_problem"] > 0
    assert len(after["per_problem"]["tokens"]) == 24

    evaluate = load_script("recipes/evaluate.py")
    data = f"{report['step_data']['folder']}/test.jsonl"
    scored = evaluate.main(["--prm", prm_dir, "--data", data, "--out", str(tmp_path / "scored")])  # calibrated alike
    assert scored["process_bench"]["all"] == pytest.approx(report["process_bench"]["all"])
    with pytest.raises(SystemExit, match="is not a PRM"):
        evaluate.main(["--prm", str(load_policy_without_head(tmp_path, folder)), "--data", data])


def load_policy_without_head(tmp_path, folder):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "verifier_head.safetensors").unlink()
    return plain


def test_head_and_best_of_n_arms(tmp_path, lab_policy, cache):
    """verifier=head scores with the policy's own head; best-of-N counts the tokens of all N samples."""
    folder = lab_policy[0]
    recipe = load_script("recipes/prm.py")
    head = recipe.main([f"model={folder}", "verifier=head", "decode=best_of_n", "n=2", f"output_dir={tmp_path}/h",
                        f"cache_dir={cache}", *TINY])
    assert head["prm"] is None and head["process_bench"]["all"]["step_auc"] is not None  # scored by the head
    assert head["step_data"]["folder"].startswith(str(cache))  # the labelled rows of the PRM run, reused
    greedy = recipe.main([f"model={folder}", "verifier=none", "decode=greedy", f"output_dir={tmp_path}/g",
                          f"cache_dir={cache}", *TINY])
    assert head["after"]["test_id"]["tokens_per_problem"] > 1.5 * greedy["after"]["test_id"]["tokens_per_problem"]
    with pytest.raises(SystemExit, match="needs a verifier"):
        recipe.load(["verifier=none", "decode=guided"])
    # no verifier: plain majority voting (self-consistency), the compute-matched baseline of sampling methods
    vote = recipe.main([f"model={folder}", "verifier=none", "decode=vote", "n=3", f"output_dir={tmp_path}/v",
                        f"cache_dir={cache}", *TINY])
    assert vote["prm"] is None and vote["process_bench"] is None
    assert vote["after"]["test_id"]["tokens_per_problem"] > 2 * greedy["after"]["test_id"]["tokens_per_problem"]


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").exists(), reason=f"GSM8K data not found at {GSM8K_DIR}")
def test_the_recipe_runs_on_gsm8k_files(tmp_path):
    """The lab on GSM8K files: a tiny base and SFT model, labels from the annotations' verifier, a PRM,
    guided decoding, and the held-out rows scored by recipes/evaluate.py --prm."""
    lines = (GSM8K_DIR / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:300]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[300:316]) + "\n")
    recipe = load_script("recipes/prm.py")
    report = recipe.main([f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "lab.task=gsm8k",
                          f"lab.train_file={tmp_path}/train.jsonl", f"lab.test_file={tmp_path}/test.jsonl",
                          "lab.sft_size=100", "lab.test_size=16", "base.steps=20", "sft.steps=4", "base.batch_size=8",
                          "sft.batch_size=8", "tiny.hidden=32", "step_data.problems=30", "step_data.samples=1",
                          "step_data.test_problems=16", "step_data.agreement=4", "steps=4", "batch_size=8",
                          "eval_max_new_tokens=24", "max_len=512"])
    assert report["after"]["test_id"]["n"] == 16
    assert report["step_data"]["train"]["wrong_step"] > 0
    evaluate = load_script("recipes/evaluate.py")
    scored = evaluate.main(["--prm", report["prm"], "--data", f"{report['step_data']['folder']}/test.jsonl",
                            "--out", str(tmp_path / "scored")])
    assert scored["process_bench"]["all"]["erroneous"] > 0


def test_written_rows_read_back(tmp_path, bt_tokenizer, arith_problems):
    rows = _rows(bt_tokenizer, arith_problems, 5)
    write_stepwise(tmp_path / "rows.jsonl", rows)
    assert read_stepwise(tmp_path / "rows.jsonl") == json.loads(json.dumps(rows))


def test_a_lora_prm_is_merged_into_a_plain_folder(tmp_path, lab_policy, bt_tokenizer, arith_problems):
    """lora.enabled: adapters on the trunk and the new head trained whole, merged at the end: the
    saved PRM is a plain HF folder (no adapter files) whose trunk moved away from the policy's."""
    from safetensors.torch import load_file

    folder = lab_policy[0]
    rows = _rows(lab_policy[2], arith_problems, 40)
    write_stepwise(tmp_path / "steps.jsonl", rows)
    recipe = load_script("recipes/prm.py")
    report = recipe.main([f"model={folder}", f"data={tmp_path}/steps.jsonl", f"test_data={tmp_path}/steps.jsonl",
                          "decode=greedy", "lora.enabled=true", "lora.r=4", f"output_dir={tmp_path}/out",
                          f"cache_dir={tmp_path}/cache", *TINY])
    prm = load_file(f"{report['prm']}/model.safetensors")
    policy = load_file(f"{folder}/model.safetensors")
    assert not any("lora" in k for k in prm) and not (tmp_path / report["prm"] / "adapter_config.json").exists()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(prm[q], policy[q])  # the adapter was merged in
    torch.testing.assert_close(prm["model.embed_tokens.weight"], policy["model.embed_tokens.weight"])  # not adapted
    assert report["process_bench"]["all"]["erroneous"] > 0


def test_weighted_vote_with_equal_scores_is_majority_voting():
    """verifier=none decode=vote: every sample scores 1, so the most frequent answer wins (a tie: the answer
    seen first), samples without an answer do not vote, and with no answer at all sample 0 is taken."""
    from halluc.inference.verifiers import weighted_vote

    assert weighted_vote(["3", "5", "5", None], [1.0] * 4) == 1
    assert weighted_vote(["3", "5", "5", "3"], [1.0] * 4) == 0  # 2 vs 2: the first seen
    assert weighted_vote([None, None], [1.0, 1.0]) == 0
    assert weighted_vote(["3", "5", "5"], [0.9, 0.1, 0.1]) == 0  # with scores it is weighted (control)
    # one number written two ways is one answer (GSM8K "1000.0"); written as it is, "7" won 1.5 to 1 + 1
    assert weighted_vote(["1000", "1000.0", "7"], [1.0, 1.0, 1.5]) == 0  # "1000" wins 2 to 1.5; its first sample
    assert weighted_vote(["1,000", "1000", "7"], [1.0, 1.0, 1.5]) == 2  # text is not parsed: the task normalises



def test_the_threshold_is_calibrated_on_half_the_problems_not_every_other_row(monkeypatch):
    """Rows come as [reference, wrong copy] per problem: split by position, the calibration half held
    only references (F1 undefined, the threshold fell back to 0.5, which calls every step wrong here).
    Split by problem, a verifier that separates right from wrong steps perfectly gets a threshold that
    does, and a problem's rows never sit on both sides."""
    from halluc.inference.verifiers import calibration_split, process_bench

    rows = []
    for k in range(20):
        for source, labels in (("reference", [True, True]), ("wrong_step", [True, False])):
            rows.append({"prompt_ids": [1, k], "completion_ids": [[2], [3]], "labels": labels, "source": source})

    class Separating:  # right steps 0.2, wrong steps 0.1
        def solution_scores(self, prompt_ids, step_ids):
            return [[0.2 if ok else 0.1 for ok in r["labels"]] for r in rows]

    out = process_bench(Separating(), rows, tokenizer=None)["all"]
    assert 0.1 <= out["threshold"] < 0.2 and out["f1"] == 1.0
    held, scored = calibration_split([r["prompt_ids"] for r in rows])
    assert {rows[i]["prompt_ids"][1] for i in held}.isdisjoint({rows[i]["prompt_ids"][1] for i in scored})
    assert sorted(held + scored) == list(range(len(rows))) and len(held) == len(scored) == 20
    # negative control: every other row, as before, calibrates on references only and misses the errors
    from halluc.inference import verifiers

    monkeypatch.setattr(verifiers, "calibration_split", lambda ids: (list(range(0, len(ids), 2)),
                                                                     list(range(1, len(ids), 2))))
    assert process_bench(Separating(), rows, tokenizer=None)["all"]["f1"] != 1.0
