"""recipes/self_correct.py end to end (rounds, the saved data, resume after kill -9, GSM8K files)
and the curriculum (technique 3): phases that are what they say, the shuffled control, the probe."""
import json
import os
import sys

import pytest
import torch
from conftest import kill_when_paused, load_script, run_processes

from halluc.core.example import Role, apply_backtrack
from halluc.tasks import arith

TINY = ["base.steps=150", "sft.steps=8", "base.batch_size=16", "sft.batch_size=16", "lab.train_size=400",
        "lab.sft_size=200", "lab.test_size=16", "tiny.hidden=32", "eval_max_new_tokens=40", "sampler.problems=48",
        "sampler.max_new_tokens=48", "sampler.k=2", "round_examples=96"]


@pytest.fixture(scope="module")
def cache(lab_cache):
    return lab_cache  # lab bases trained once per test run, whichever test needs one first


def recipe():
    return load_script("recipes/self_correct.py")


def check_round_data(folder, problems_by_index, tok, bt):
    from datasets import load_from_disk

    rows = list(load_from_disk(str(folder / "sft")))
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["kept"] == len(rows) and stats["samples"] == 48 * 2
    assert stats["located"] + stats["unlocated"] + stats["unaligned"] + stats["unfinished"] == stats["wrong"]
    for row in rows:
        p = problems_by_index[row["problem"]]
        prompt = tok(p.prompt)["input_ids"]
        assert row["input_ids"][:len(prompt)] == prompt
        clean = apply_backtrack(row["input_ids"][len(prompt):], bt)
        assert arith.verify_steps(p, arith.split_steps(tok.decode(clean, skip_special_tokens=True))).all_ok
        assert Role.ERROR in row["roles"] and Role.BACKTRACK in row["roles"]
    return rows, stats


def test_two_rounds_on_arith_write_valid_data_and_an_evaluation(tmp_path, cache):
    from transformers import AutoTokenizer

    from halluc.pipeline.lab import LabConfig, lab_splits
    from halluc.core.tokens import backtrack_id

    report = recipe().main([f"output_dir={tmp_path}/out", f"cache_dir={cache}", "rounds=2", *TINY])
    out = tmp_path / "out"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    tok = AutoTokenizer.from_pretrained(out / "round-2" / "checkpoint")
    sft = lab_splits(LabConfig(train_size=400, sft_size=200, test_size=16), 0)["sft"]
    for r in (1, 2):
        rows, stats = check_round_data(out / f"round-{r}" / "data", sft, tok, backtrack_id(tok))
        assert stats["kept"] > 0
        pairs = json.loads((out / f"round-{r}" / "round.json").read_text())["mix"]
        assert pairs["own"] == min(stats["kept"], 48)  # half of round_examples=96 may be own
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["after"]) == {"test_id", "test_ood"} and saved["rounds"][1]["stats"]["samples"] == 96


@pytest.mark.slow
def test_kill_9_in_round_2_then_resume_continues_at_round_2(tmp_path, cache):
    args = [f"output_dir={tmp_path}/out", f"cache_dir={cache}", "rounds=2", "save_steps=2", *TINY]
    out = tmp_path / "out"
    kill_when_paused(args, out / "round-2", 5, tmp_path / "killed.log", recipe="recipes/self_correct.py")
    data_before = (out / "round-2" / "data" / "stats.json").read_text()
    resumed = run_processes([sys.executable, "recipes/self_correct.py", *args, "resume=true"], timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-4000:]
    assert "round 1 finished already" in text and "round 2: reading its data back" in text
    assert f"resuming from {out / 'round-2' / 'checkpoint-4'}" in text
    assert (out / "round-2" / "data" / "stats.json").read_text() == data_before
    assert json.loads((out / "eval.json").read_text())["rounds"][1]["round"] == 2


def tiny_gsm8k_base(folder, gsm8k_test_file):
    """A tiny random Llama with a tokenizer trained on 120 GSM8K problems, saved to `folder`."""
    from halluc.core.model import tiny_llama
    from halluc.core.tokens import train_tokenizer
    from halluc.tasks import gsm8k

    problems = gsm8k.read_jsonl(gsm8k_test_file, limit=120)
    tok = train_tokenizer([p.prompt + p.solution for p in problems], vocab_size=500)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def test_gsm8k_files_run_and_unplaceable_errors_are_counted(tmp_path, gsm8k_test_file):
    tiny_gsm8k_base(tmp_path / "base", gsm8k_test_file)
    report = recipe().main([f"model={tmp_path / 'base'}", "lab.task=gsm8k", f"lab.train_file={gsm8k_test_file}",
                            f"lab.test_file={gsm8k_test_file.parent / 'train.jsonl'}", "lab.test_size=4",
                            "lab.sft_size=40", "lab.train_size=40", "sampler.problems=10", "sampler.k=2",
                            "sampler.max_new_tokens=24", "sampler.correction_tries=1", "sft.steps=2",
                            "sft.batch_size=4", "round_examples=16", "max_len=512", "eval_max_new_tokens=16",
                            f"output_dir={tmp_path}/out"])
    stats = report["rounds"][0]["stats"]
    assert stats["samples"] == 20 and stats["right"] + stats["wrong"] == 20
    assert stats["located"] + stats["unlocated"] + stats["unaligned"] + stats["unfinished"] == stats["wrong"]
    assert report["after"]["test_id"]["n"] == 4


def test_gsm8k_files_give_own_errors_located_by_alignment(tmp_path, gsm8k_test_file):
    """error_source=aligned needs no step verifier: GSM8K samples the judge cannot place still give
    examples, each erasing the sample's unmatched spans and ending as the reference solution."""
    from datasets import load_from_disk

    from halluc.core.tokens import backtrack_id
    from halluc.pipeline.lab import LabConfig, lab_splits

    tok = tiny_gsm8k_base(tmp_path / "base", gsm8k_test_file)
    lab = ["lab.task=gsm8k", f"lab.train_file={gsm8k_test_file}", f"lab.test_file={gsm8k_test_file.parent / 'train.jsonl'}",
           "lab.test_size=4", "lab.sft_size=40", "lab.train_size=40"]
    report = recipe().main([f"model={tmp_path / 'base'}", *lab, "error_source=aligned", "sampler.problems=10",
                            "sampler.k=2", "sampler.max_new_tokens=24", "sft.steps=2", "sft.batch_size=4",
                            "round_examples=16", "max_len=512", "eval_max_new_tokens=16", f"output_dir={tmp_path}/out"])
    stats = report["rounds"][0]["stats"]
    assert stats["samples"] == 20 and stats["right"] + stats["wrong"] == 20 and stats["kept"] > 0
    assert report["rounds"][0]["mix"]["own"] == min(stats["kept"], 8)  # mix.own=0.5 of round_examples=16
    rows = list(load_from_disk(str(tmp_path / "out" / "round-1" / "data" / "sft")))
    trained = tok.__class__.from_pretrained(tmp_path / "out" / "round-1" / "checkpoint")
    bt = backtrack_id(trained)
    sft = lab_splits(LabConfig(task="gsm8k", train_file=str(gsm8k_test_file), test_file=str(gsm8k_test_file.parent /
                                                                                       "train.jsonl"),
                               test_size=4, sft_size=40, train_size=40), 0)["sft"]
    for row in rows:
        p = sft[row["problem"]]
        prompt = trained(p.prompt)["input_ids"]
        clean = apply_backtrack(row["input_ids"][len(prompt):], bt)
        assert trained.decode(clean, skip_special_tokens=True).strip() == p.solution.strip()
        assert Role.ERROR in row["roles"] and Role.BACKTRACK in row["roles"]


# ---- curriculum ---------------------------------------------------------------------------

def test_phases_are_what_they_say_and_shuffled_deals_the_same_examples(bt_tokenizer):
    from halluc.pipeline.curriculum import Curriculum, Phase, phase_datasets
    from halluc.sources.errors import ErrorConfig
    from halluc.core.tokens import backtrack_id

    problems = arith.make_split(400, (2, 4), seed=11)
    phases = [Phase(steps=100, error_rate=1.0, max_error_tokens=1, ops_max=2),
              Phase(steps=100, error_rate=0.5, ops_min=3)]
    bt = backtrack_id(bt_tokenizer)
    kw = dict(examples=200, masked=True, max_len=256, overlong="drop", seed=3)
    ordered, counts = phase_datasets(Curriculum(phases), problems, bt_tokenizer, bt, ErrorConfig(), **kw)
    assert [c["examples"] for c in counts] == [len(d) for d in ordered] == [100, 100]
    first, second = ordered
    runs = [r.count(Role.ERROR) for r in first["roles"]]
    assert all(n == 1 for n in runs)  # every example one error token
    assert all(len(bt_tokenizer.decode(ids).split(" ; ")) <= 4 for ids in first["input_ids"])  # <= 2 quantities
    assert 0.3 < sum(Role.ERROR in r for r in second["roles"]) / len(second) < 0.7
    assert max(r.count(Role.ERROR) for r in second["roles"]) > 1  # whole wrong tails there

    def prompts(data):
        return {tuple(i for i, r in zip(ids, roles) if r == Role.PROMPT) for ids, roles in zip(data["input_ids"],
                                                                                               data["roles"])}
    assert not prompts(first) & prompts(second)  # no problem is used by two phases
    shuffled, _ = phase_datasets(Curriculum(phases, order="shuffled"), problems, bt_tokenizer, bt, ErrorConfig(), **kw)
    pool = sorted(map(tuple, list(first["input_ids"]) + list(second["input_ids"])))
    dealt = sorted(map(tuple, list(shuffled[0]["input_ids"]) + list(shuffled[1]["input_ids"])))
    assert dealt == pool  # the same examples
    assert any(Role.ERROR in r and r.count(Role.ERROR) > 1 for r in shuffled[0]["roles"])  # hard ones come early


def test_a_competence_phase_ends_when_the_probe_passes(bt_tokenizer, arith_problems, tmp_path):
    import copy

    from halluc.core.config import Stage
    from halluc.pipeline.curriculum import Curriculum, Phase, phase_datasets, train_phases
    from halluc.sources.errors import ErrorConfig
    from halluc.core.model import tiny_llama
    from halluc.pipeline.stages import RunSettings
    from halluc.core.tokens import backtrack_id

    tok = copy.deepcopy(bt_tokenizer)
    bt = backtrack_id(tok)
    steps, models = {}, {}
    for name, threshold in (("passes", 0.0), ("never", 1.0)):
        torch.manual_seed(0)
        model = tiny_llama(len(tok), hidden=32, layers=1, heads=2)
        cur = Curriculum([Phase(steps=12, until_recall=threshold)], probe_every=4)
        data, counts = phase_datasets(cur, arith_problems[:200], tok, bt, ErrorConfig(), examples=64, masked=True,
                                      max_len=256, overlong="drop", seed=0)
        trainer = train_phases(model, data, cur, counts, tmp_path / name, RunSettings(), Stage(12, 8, 1e-3), tok,
                               probe=(arith_problems[200:216], arith, 24))
        steps[name], models[name] = trainer.state.global_step, model
    assert steps == {"passes": 4, "never": 12}  # recall >= 0 at the first probe; never >= 1 on a tiny model
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from halluc.inference.evaluate import evaluate_problems

    def scalars(name):
        found = {}
        for events in (tmp_path / name / "tb").glob("events.out.tfevents.*"):
            acc = EventAccumulator(str(events))
            acc.Reload()
            found.update({tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]})
        return found

    tags = set(scalars("passes"))
    assert {"curriculum/phase", "curriculum/phase_end", "curriculum/probe_bt_recall", "curriculum/examples"} <= tags
    # the probe measures the model: its last recall (step 12, the final weights) is the recall an
    # evaluation of the trained model gives on the probe problems (a probe that made its number up passed)
    logged = sorted(scalars("never")["curriculum/probe_bt_recall"], key=lambda e: e.step)
    assert [e.step for e in logged][-1] == 12
    models["never"].eval()
    m = evaluate_problems(models["never"], tok, arith_problems[200:216], arith, 24, desc="check", bt_banned=False)
    assert logged[-1].value == pytest.approx(1.0 if m["bt_recall"] is None else m["bt_recall"], abs=1e-6)


def test_a_curriculum_with_an_own_errors_phase_runs_in_a_round(tmp_path, cache):
    phases = "[{steps: 4, error_rate: 0.5, max_error_tokens: 1}, {steps: 4, source: own, error_rate: 0.5}]"
    report = recipe().main([f"output_dir={tmp_path}/out", f"cache_dir={cache}", f"curriculum.phases={phases}",
                            "curriculum.probe_size=16", *TINY])
    mix = report["rounds"][0]["mix"]
    assert len(mix) == 2 and mix[1]["own_errors"] > 0 and "synthetic_errors" in mix[0]
    assert (tmp_path / "out" / "round-1" / "phase-2").is_dir()


def test_a_short_own_share_shrinks_every_part_of_the_mix(bt_tokenizer, arith_problems):
    """Fewer own examples than mix.own asks: the set shrinks so the shares stay as set (the own arm
    keeps the error share of the synthetic arm), and clean examples come from other problems."""
    from halluc.sources.data import build_sft_dataset
    from halluc.sources.errors import ErrorConfig
    from halluc.pipeline.rounds import round_mix
    from halluc.core.tokens import backtrack_id

    cfg = recipe().load(["mix.own=0.5", "mix.clean=0.5", "round_examples=100"])
    bt = backtrack_id(bt_tokenizer)
    own = [{**row, "problem": i} for i, row in
           enumerate(build_sft_dataset(arith_problems[:10], bt_tokenizer, ErrorConfig(example_rate=1.0), bt))]
    data, counts = round_mix(cfg, 1, own, arith_problems, bt_tokenizer, bt)
    assert counts == {"own": 10, "clean": 10} and len(data) == 20
    own_prompts = {p.prompt for p in arith_problems[:10]}
    decoded = [bt_tokenizer.decode([i for i, r in zip(ids, roles) if r == Role.PROMPT], skip_special_tokens=True)
               for ids, roles in zip(data["input_ids"], data["roles"]) if Role.ERROR not in roles]
    assert len(decoded) == 10 and not own_prompts & set(decoded)


def test_mcts_traces_as_the_own_share_of_a_round(tmp_path, lab_policy):
    """error_source=mcts (technique 8 through technique 5's round): the round's own share is MCTS
    traces of the model (the lab policy: it solves some problems) on the sampler's problems, each
    reading as a verified solution, trained with the same mix."""
    from halluc.pipeline.lab import LabConfig, lab_splits
    from halluc.core.tokens import backtrack_id
    from transformers import AutoTokenizer

    report = recipe().main([f"output_dir={tmp_path}/out", f"model={lab_policy[0]}", "error_source=mcts",
                            "mcts.nodes=12", "mcts.k=3", *TINY])
    data = tmp_path / "out" / "round-1" / "data"
    from datasets import load_from_disk

    rows, stats = list(load_from_disk(str(data / "sft"))), json.loads((data / "stats.json").read_text())
    assert stats["problems"] == 48 and stats["kept"] == len(rows) > 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "round-1" / "checkpoint")
    bt = backtrack_id(tok)
    sft = lab_splits(LabConfig(train_size=400, sft_size=200, test_size=16), 0)["sft"]
    for row in rows:
        p = sft[row["problem"]]
        prompt = tok(p.prompt)["input_ids"]
        clean = tok.decode(apply_backtrack(row["input_ids"][len(prompt):], bt), skip_special_tokens=True)
        report_ = arith.verify_steps(p, arith.split_steps(clean))
        assert report_.all_ok and report_.answer_correct and Role.ERROR in row["roles"]
    assert report["rounds"][0]["mix"]["own"] == min(len(rows), 48)
    with pytest.raises(SystemExit, match="error_source=mcts"):  # nothing would use the search
        recipe().load(["error_source=mcts", "mix.own=0", "mix.synthetic=0.5"])
