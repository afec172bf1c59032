"""Generic prompt/response readers: jsonl files and local `datasets` loads (no downloads)."""
import json
import random

import pytest

from halluc.tasks import jsonl

ROWS = [
    {"q": "Add 2 and 3.", "response": "2 + 3\n= 5\nanswer: 5", "final": 5},
    {"q": "Name a colour.", "response": ["think", "red"], "final": "red"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_round_trip_of_a_jsonl_file(tmp_path):
    path = _write(tmp_path / "data.jsonl", ROWS)
    problems = jsonl.read_jsonl(path, prompt_field="q", prompt_template="Q: {prompt}\nA:")
    assert [p.prompt for p in problems] == ["Q: Add 2 and 3.\nA:", "Q: Name a colour.\nA:"]
    assert problems[0].steps == ["2 + 3\n", "= 5\n", "answer: 5"]
    assert problems[0].solution == ROWS[0]["response"]
    assert problems[1].steps == ["think\n", "red"]  # a list response: separator between steps
    assert [p.answer for p in problems] == ["answer: 5", "red"]  # last step when no answer field
    assert problems[1].meta == {"task": "jsonl", "source": str(path), "line": 2, "step_separator": "\n"}
    for p in problems:
        assert jsonl.verify_steps(p, p.steps).all_ok


def test_answer_field_and_custom_separator(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "p", "response": "a ; b ; 5", "final": 5}])
    [p] = jsonl.read_jsonl(path, answer_field="final", step_separator=" ; ")
    assert p.steps == ["a ; ", "b ; ", "5"] and p.answer == "5"
    assert jsonl.verify_steps(p, p.steps).answer_correct
    assert not jsonl.verify_steps(p, ["a ; ", "6"]).answer_correct
    assert jsonl.verify_steps(p, ["a ; ", "b ; ", "6"]).kinds == ["unchecked"] * 3  # no step verifier for free text


def test_template_may_use_other_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "p", "sys": "S", "response": "r"}])
    assert jsonl.read_jsonl(path, prompt_template="{sys}|{prompt}")[0].prompt == "S|p"
    with pytest.raises(ValueError, match=r"d\.jsonl:1: missing field 'nope'"):
        jsonl.read_jsonl(path, prompt_template="{nope}{prompt}")


def test_limit_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": str(i), "response": "r"}) for i in range(5)) + "\n\n")
    assert [p.prompt for p in jsonl.read_jsonl(path, limit=3)] == ["0", "1", "2"]
    assert len(jsonl.read_jsonl(path)) == 5


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n[1, 2\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2:.*malformed"):
        jsonl.read_jsonl(path)


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list\.jsonl:1:.*object"):
        jsonl.read_jsonl(path)


@pytest.mark.parametrize("missing", ["prompt", "response", "final"])
def test_missing_field_names_field_file_and_line(tmp_path, missing):
    row = {"prompt": "p", "response": "r", "final": "r"}
    del row[missing]
    path = _write(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r", "final": "r"}, row])
    with pytest.raises(ValueError, match=rf"rows\.jsonl:2: missing field '{missing}'"):
        jsonl.read_jsonl(path, answer_field="final")


def test_split_steps_round_trips_and_keeps_separator_runs():
    for text in ["", "a", "a\n", "a\nb", "\na\n\nb\n", "x;;y;", "abc;"]:
        for sep in ["\n", ";", ";;"]:
            assert "".join(jsonl.split_steps(text, sep)) == text
    assert jsonl.split_steps("a\n\nb", "\n") == ["a\n\n", "b"]
    assert jsonl.extract_answer("work\n  42 \n") == "42"
    assert jsonl.extract_answer("") is None
    assert jsonl.extract_answer("work\n42\n \n\t") == "42"  # blank trailing lines are not the answer
    assert jsonl.extract_answer(" \n\n") is None


def test_corrupt_step_writes_a_later_step_early():
    [p] = [jsonl.problem_from_row({"prompt": "p", "response": " one\ntwo\nthree"}, "mem", 1)]
    wrong = jsonl.corrupt_step(p, 0, random.Random(0))
    assert wrong in (" two\n", " three\n")
    assert jsonl.corrupt_step(p, 2, random.Random(0)) is None


def test_load_hf_dataset_from_local_json(tmp_path):
    path = _write(tmp_path / "local.jsonl", [{"prompt": "p1", "response": "a\nb", "final": "b"},
                                             {"prompt": "p2", "response": "c", "final": "c"}])
    from_hf = jsonl.load_hf_dataset(path, answer_field="final")
    direct = jsonl.read_jsonl(path, answer_field="final")
    assert [(p.prompt, p.steps, p.answer) for p in from_hf] == [(p.prompt, p.steps, p.answer) for p in direct]
    assert from_hf[1].meta["line"] == 2


def test_load_hf_dataset_from_saved_dir_and_errors(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "p", "response": ["s1", "s2"]}, {"prompt": "q", "response": None}])
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved\[test\]:2: missing field 'response'"):
        jsonl.load_hf_dataset(tmp_path / "saved", split="test")
    [p] = jsonl.load_hf_dataset(tmp_path / "saved", split="test", limit=1)
    assert p.steps == ["s1\n", "s2"] and p.answer == "s2"
    with pytest.raises(ValueError, match="no split"):
        jsonl.load_hf_dataset(tmp_path / "saved", split="train")


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    """Issue 22, item 9: some editors start a UTF-8 file with a BOM; it was 'malformed JSON'."""
    path = _write(tmp_path / "bom.jsonl", ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [p.prompt for p in jsonl.read_jsonl(path, prompt_field="q")] == \
        [p.prompt for p in jsonl.read_jsonl(_write(tmp_path / "plain.jsonl", ROWS), prompt_field="q")]


def test_lab_jsonl_settings_read_escapes_and_put_a_newline_between_prompt_and_response(tmp_path):
    """Issue 22, item 4: lab.step_separator=\\n\\n was stored as backslash-n characters; the jsonl task
    joined prompt and response with nothing between them; prompt_template was not a setting."""
    import json

    from halluc.core.config import load_config
    from halluc.pipeline.lab import LabConfig, lab_splits

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} + 1?", "response": f"{i} + 1\n\n= {i + 1}"}) + "\n"
                            for i in range(6)))
    common = ["task=jsonl", f"train_file={data}", f"test_file={data}", "prompt_field=q", "test_size=2"]
    cfg = load_config(LabConfig, [*common, r"step_separator=\n\n"])
    assert cfg.step_separator == "\n\n" and cfg.prompt_template == "{prompt}\n"
    problem = lab_splits(cfg)["test_id"][0]
    assert problem.prompt == "What is 0 + 1?\n" and problem.steps == ["0 + 1\n\n", "= 1"]
    assert (problem.prompt + problem.solution).startswith("What is 0 + 1?\n0 + 1")  # not "...?0 + 1"
    cfg = load_config(LabConfig, [*common, "prompt_template=Q: {prompt}\nA: "])  # a real newline (bash: $'...')
    assert lab_splits(cfg)["test_id"][0].prompt == "Q: What is 0 + 1?\nA: "
    latex = load_config(LabConfig, [*common, r"prompt_template=\times {prompt}"])  # a template is verbatim
    assert latex.prompt_template == r"\times {prompt}"
    yaml_file = tmp_path / "lab.yaml"
    yaml_file.write_text("step_separator: '\\n\\n'\n")  # single-quoted YAML keeps the backslashes: read them too
    assert load_config(LabConfig, ["--config", str(yaml_file), *common]).step_separator == "\n\n"
