"""GSM8K reader, verifier and corrupter, checked against the real data where present."""
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halluc.tasks import Problem, gsm8k

DATA = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"


def _need(split: str) -> Path:
    path = DATA / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K data not found at {path}")
    return path


@pytest.fixture(scope="module")
def test_set():
    path = _need("test")
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return raw, gsm8k.read_jsonl(path)


def _toy() -> Problem:
    steps = gsm8k.split_steps(" She has 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18")
    return Problem(prompt="Question: eggs?\nAnswer:", steps=steps, answer="18")


# --- the real test set ---------------------------------------------------------------

def test_reads_every_test_problem_with_the_step_convention(test_set):
    raw, problems = test_set
    assert len(problems) == 1319 == len(raw)
    for n, (row, p) in enumerate(zip(raw, problems), start=1):
        assert p.prompt == f"Question: {row['question']}\nAnswer:"
        assert "".join(p.steps) == " " + row["answer"]
        assert p.steps[0].startswith(" ") and not p.steps[0].startswith("  ")
        assert all(s.endswith("\n") for s in p.steps[:-1])
        assert p.steps[-1].startswith("####") and not p.steps[-1].endswith("\n")
        assert p.answer == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert p.meta == {"task": "gsm8k", "source": str(DATA / "test.jsonl"), "line": n}


@pytest.mark.parametrize("split", ["test", "train"])
def test_every_reference_solution_verifies(split):
    """Measured: all 1319 test and 7473 train references recompute exactly (train has two
    annotations using `//`, which the evaluator supports)."""
    problems = gsm8k.read_jsonl(_need(split))
    bad = [(p.meta["line"], gsm8k.verify_steps(p, p.steps)) for p in problems]
    bad = [(line, r) for line, r in bad if not r.all_ok]
    for line, r in bad:
        print(split, line, r)
    assert bad == []


def test_limit_reads_a_prefix(test_set):
    _, problems = test_set
    first = gsm8k.read_jsonl(_need("test"), limit=5)
    assert first == problems[:5]


def test_result_corruptions_are_flagged_and_leave_other_steps_alone(test_set):
    _, problems = test_set
    rng = random.Random(0)
    kinds_seen = set()
    for p in problems[:150]:
        for i, step in enumerate(p.steps):
            wrong = gsm8k.corrupt_step(p, i, rng, mode="result")
            if wrong is None:
                assert "<<" not in step and "####" not in step
                continue
            assert wrong != step
            assert wrong.startswith(" ") == step.startswith(" ")  # separators kept
            assert wrong.endswith("\n") == step.endswith("\n")
            kinds = gsm8k.verify_steps(p, p.steps[:i] + [wrong] + p.steps[i + 1:]).kinds
            assert kinds[i] in ("wrong_result", "wrong_answer")
            assert all(k in ("ok", "unchecked") for k in kinds[:i] + kinds[i + 1:])
            kinds_seen.add(kinds[i])
    assert kinds_seen == {"wrong_result", "wrong_answer"}


def test_early_corruption_is_a_later_step_in_this_position(test_set):
    _, problems = test_set
    rng = random.Random(1)
    p = problems[2]  # four annotated lines + answer
    wrong = gsm8k.corrupt_step(p, 0, rng, mode="early")
    assert wrong.startswith(" ") and wrong.endswith("\n")
    assert wrong.strip() in [s.strip() for s in p.steps[1:]]
    assert gsm8k.corrupt_step(p, len(p.steps) - 1, rng, mode="early") is None


# --- golden strings --------------------------------------------------------------------

def test_toy_problem_verifies():
    p = _toy()
    assert p.steps == [" She has 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n", "She makes 9 * 2 = $<<9*2=18>>18.\n", "#### 18"]
    report = gsm8k.verify_steps(p, p.steps)
    assert report.kinds == ["ok", "ok", "ok"] and report.answer_correct and report.all_ok


@pytest.mark.parametrize("step, kind", [
    ("So 2+3=<<2+3=5>>5 apples.\n", "ok"),
    ("So 2+3=<<2+3=6>>6 apples.\n", "wrong_result"),
    ("So 2+3=<<2+3=5>>6 apples.\n", "wrong_result"),      # displayed copy disagrees
    ("So 2+3=<<2+3=5>> 6 apples.\n", "ok"),               # nothing displayed right after >>
    ("It is 80,000*1.5=<<80000*1.5=120000>>120,000\n", "ok"),
    ("Half is 7/2=<<7/2=3.5>>3.5\n", "ok"),
    ("Third is 1/3=<<1/3=0.33>>0.33\n", "wrong_result"),  # rounding is beyond 1e-6
    ("Loss 11-20=<<11-20=-9>>-9\n", "ok"),
    ("Groups 560//10=<<560//10=56>>56\n", "ok"),
    ("Area 2**3=<<2**3=8>>8\n", "ok"),
    ("Cost 0.1*3=<<0.1*3=0.3>>0.3\n", "ok"),             # exact, not float, arithmetic
    ("Frac <<3/4=3/4>>3/4\n", "ok"),
    ("So 5x=<<5x=10>>10\n", "bad_annotation"),
    ("So <<2+3>>5\n", "bad_annotation"),                  # no '='
    ("So <<2+3=5 apples\n", "bad_annotation"),            # unclosed
    ("So <<__import__('os')=0>>0\n", "bad_annotation"),
    ("So <<9**9**9=1>>1\n", "bad_annotation"),            # bounded power
    ("So <<1/0=1>>1\n", "bad_annotation"),
    ("No arithmetic here.\n", "unchecked"),  # nothing to recompute: not wrong, and not counted as valid
    ("::::::::\n", "unchecked"),
    ("#### 18", "ok"),
    ("#### 18.0", "ok"),
    ("#### 17", "wrong_answer"),
    ("#### eighteen", "wrong_answer"),
])
def test_step_kinds(step, kind):
    p = _toy()
    assert gsm8k.verify_steps(p, [step]).kinds == [kind]


@pytest.mark.parametrize("text, answer", [
    ("... #### 18", "18"),
    ("#### 1,450,000", "1450000"),
    ("#### $2,125", "2125"),
    ("#### 18.0", "18.0"),
    ("#### -3", "-3"),
    ("#### 5 #### 7\n", "7"),
    ("#### 12.", "12"),
    ("no marker 18", None),
    ("#### none", None),
    ("#### 3/4", None),  # a fraction is not the answer 3 (it was read as 3)
    ("#### 10 - 2 = 8", None),  # nor is a calculation its first number
    ("#### 18%\nmore text", "18"),  # the answer's line ends it; what follows is not read
])
def test_extract_answer(text, answer):
    assert gsm8k.extract_answer(text) == answer


def test_answer_correct_is_numeric_and_needs_a_marker():
    p = _toy()
    assert gsm8k.verify_steps(p, [" 9*2=<<9*2=18>>18\n", "#### 18.00"]).answer_correct
    assert not gsm8k.verify_steps(p, [" 9*2=<<9*2=18>>18\n"]).answer_correct
    assert not gsm8k.verify_steps(p, [" #### 19"]).answer_correct


def test_split_steps_keeps_blank_lines_on_the_step_before():
    assert gsm8k.split_steps(" a\n\nb\n#### 1") == [" a\n\n", "b\n", "#### 1"]
    assert gsm8k.split_steps("") == []


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n#"))
def test_split_steps_round_trips(text):
    steps = gsm8k.split_steps(text)
    assert "".join(steps) == text
    assert all(s for s in steps)


def test_corruption_keeps_number_format():
    rng = random.Random(3)
    p = Problem(prompt="", steps=[" Total 80,000+50,000=$<<80000+50000=130000>>130,000\n", "#### 1,300"], answer="1300")
    for _ in range(20):
        wrong = gsm8k.corrupt_step(p, 0, rng, mode="result")
        inner, shown = wrong.split("=$<<")[1].split(">>")
        result = inner.rsplit("=", 1)[1]
        assert "," not in result and shown.rstrip("\n") == f"{int(result):,}" and result != "130000"
        final = gsm8k.corrupt_step(p, 1, rng, mode="result")
        assert final.startswith("#### ") and final != "#### 1,300"


def test_no_corruption_without_annotation_or_later_step():
    p = Problem(prompt="", steps=[" Just words."], answer="1")
    assert gsm8k.corrupt_step(p, 0, random.Random(0)) is None


# --- errors ----------------------------------------------------------------------------

def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    path.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3:.*malformed"):
        gsm8k.read_jsonl(path)
    assert len(gsm8k.read_jsonl(path, limit=2)) == 2


def test_missing_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 2"}) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: missing field 'answer'"):
        gsm8k.read_jsonl(path)


def test_answer_without_final_marker_is_an_error(tmp_path):
    path = tmp_path / "nofinal.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "it is 2"}) + "\n")
    with pytest.raises(ValueError, match=r"nofinal\.jsonl:1:.*####"):
        gsm8k.read_jsonl(path)


@pytest.mark.parametrize("step", [" Cost 7/2=<<7/2=3.50>>3.5 each\n", " Loss 11-20=<<11-20=-9>>-9\n",
                                  " Zero 5-5=<<5-5=0>>0\n", " Frac <<3/4=3/4>>3/4 and 1+1=<<1+1=2>>2\n"])
def test_result_corruption_of_unusual_numbers_is_flagged(step):
    rng = random.Random(5)
    p = Problem(prompt="", steps=[step, "#### 1"], answer="1")
    for _ in range(30):
        wrong = gsm8k.corrupt_step(p, 0, rng, mode="result")
        assert gsm8k.verify_steps(p, [wrong, "#### 1"]).kinds == ["wrong_result", "ok"]


def test_step_validity_counts_only_steps_the_verifier_can_check(lab_tokenizer):
    """Issue 22, item 3: an untrained model writing ':::::::' scored 100% step validity (every line an
    'ok' step). Lines with nothing to recompute are UNCHECKED: left out of step validity (n/a when no
    step can be checked) and reported as unchecked_steps; a reference solution stays at 100%."""
    from halluc.inference.evaluate import metrics_of
    from halluc.inference.generate import Generation

    p = _toy()
    garbage = Generation(trace=[], visible=[], prompt_len=1, text="::::::::\n::::::::\n")
    reference = Generation(trace=[], visible=[], prompt_len=1, text=p.solution)
    m = metrics_of(None, lab_tokenizer, [p], gsm8k, [garbage], "keep")
    assert m["step_validity"] is None and m["unchecked_steps"] == 1.0 and m["answer_acc"] == 0.0
    m = metrics_of(None, lab_tokenizer, [p, p], gsm8k, [reference, garbage], "keep")
    assert m["step_validity"] == 1.0 and m["unchecked_steps"] == 2 / 5 and m["answer_acc"] == 0.5  # 3 + 2 steps
