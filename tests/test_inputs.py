"""halluc.core.inputs: how a wrong input reaches the user (one line, exit code 2, --debug for the
traceback) and the checks that need the model's structure (LoRA targets)."""
import sys

import pytest

from halluc.core.inputs import InputError, check_lora_targets, run_cli


def run(main, argv, capsys):
    sys.argv = ["tool.py", *argv]
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("error", [SystemExit("data=x.jsonl: no such file"), InputError("x.jsonl:3: missing field 'prompt'"),
                                   FileNotFoundError(2, "No such file or directory", "x.jsonl"),
                                   PermissionError(13, "Permission denied", "out")])
def test_a_users_error_is_one_line_and_exit_code_2(error, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)

    def main():
        raise error

    code, err = run(main, ["a=1"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, err = run(main, ["a=1", "--debug"], capsys)  # --debug: the traceback, then the same line and code
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_bug_keeps_its_traceback_and_success_exits_0(capsys, monkeypatch):
    """Negative control: an error that is not the user's (a bug) is not turned into a polite line."""
    monkeypatch.setattr(sys, "argv", sys.argv)

    def buggy():
        raise KeyError("internal")

    sys.argv = ["tool.py"]
    with pytest.raises(KeyError):
        run_cli(buggy)
    seen = []
    assert run(lambda: seen.append(sys.argv[1:]) or {"report": 1}, ["a=1", "--debug"], capsys)[0] == 0
    assert seen == [["a=1"]]  # --debug is not passed on to the command's own parser
    assert run(lambda: 3, [], capsys)[0] == 3  # a returned int is the exit code (tools/sweep.py)


def test_lora_targets_are_checked_against_the_models_modules(tmp_path):
    """Issue 22, item 7: the default (Llama) targets on a GPT-2 fail before the model loads, naming
    GPT-2's layers; GPT-2's own names pass, and the defaults pass on a Llama (the control)."""
    from transformers import GPT2Config, LlamaConfig

    from halluc.core.config import DEFAULT_TARGETS

    gpt2, llama = tmp_path / "gpt2", tmp_path / "llama"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64).save_pretrained(gpt2)
    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                vocab_size=100).save_pretrained(llama)
    with pytest.raises(InputError, match=r"lora.targets: q_proj, k_proj.* are not a module of .*gpt2 \(gpt2\); "
                                         r"its linear layers: c_attn, c_fc, c_proj"):
        check_lora_targets(str(gpt2), DEFAULT_TARGETS)
    check_lora_targets(str(gpt2), ("c_attn", "c_proj"))
    check_lora_targets(str(llama), DEFAULT_TARGETS)
    with pytest.raises(InputError, match="c_attn is not a module"):
        check_lora_targets(str(llama), ("q_proj", "c_attn"))


def test_a_preference_pair_without_a_field_names_the_line_and_the_fields_present(tmp_path, lab_tokenizer):
    """Issue 22, item 9 (DPO): a row lacking `prompt` said "must be a string, got NoneType"."""
    from halluc.structure.pairs import load_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a = 1 .", "chosen": " a ?", "rejected": " b ?"}\n{"chosen": "x", "rejected": "y"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl:2: missing field 'prompt' \(fields present: \['chosen', 'rejected'\]\)"):
        load_pairs(data, lab_tokenizer, None)
    data.write_text('{"prompt": "a = 1 .", "chosen": 3, "rejected": " b ?"}\n')
    with pytest.raises(InputError, match="pairs.jsonl:1: field 'chosen' must be a string, got int"):
        load_pairs(data, lab_tokenizer, None)


def test_a_max_len_that_drops_every_example_is_a_users_error(lab_tokenizer, arith_problems, capsys):
    """max_len=5 left no example: one line naming the setting, exit code 2 (it was a traceback)."""
    from halluc.sources.data import build_sft_dataset
    from halluc.sources.errors import ErrorConfig

    def main():
        build_sft_dataset(arith_problems[:20], lab_tokenizer, ErrorConfig(source="none"), None, max_len=5)

    code, err = run(lambda: main(), [], capsys)
    assert code == 2 and "all 20 examples are longer than max_len=5 tokens: raise max_len" in err
    assert "Traceback" not in err


def test_pairs_dropped_for_the_models_positions_say_so_not_max_len(lab_tokenizer):
    """Issue 22, item 6 (DPO): with max_len=512 on a 256-position model the message blamed max_len=256."""
    from halluc.structure.pairs import pair_rows, tokenize_text_pair

    pair = tokenize_text_pair({"prompt": "a = 1 . b = a + 2 .", "chosen": " b = 3 ?", "rejected": " b = 4 ?"},
                              lab_tokenizer, None)
    with pytest.raises(SystemExit, match=r"longer than the model's 8 positions \(max_len=512 is more\) tokens .*: "
                                         "a model with more positions"):
        pair_rows([pair], max_len=8, limit="the model's 8 positions (max_len=512 is more)")
    with pytest.raises(SystemExit, match="longer than max_len=8 tokens .*: raise max_len"):  # the user's own max_len
        pair_rows([pair], max_len=8)


def test_a_bad_pairs_file_fails_before_any_model_trains_or_loads(tmp_path):
    """DPO from the lab model with data=pairs.jsonl: a bad row is found before the lab's SFT model would
    train (minutes) and before any model loads; nothing is written."""
    from conftest import load_script

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl:2: missing field 'rejected'"):
        load_script("recipes/dpo.py").main([f"data={data}", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
