"""tools/prepare_data.py writes a datasets folder with input_ids, labels and ClassLabel roles."""
from pathlib import Path

import pytest
from conftest import load_script

from datasets import load_from_disk
from transformers import AutoTokenizer

from halluc import apply_backtrack, backtrack_id

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    return load_script("tools/prepare_data.py")


def test_arith_to_disk(tmp_path):
    load_tool().main(["--size", "50", "--errors", "random", "--sites", "2", "--example-rate", "1",
                      "--attention", "block_errors", "--positions", "rewound", "--out", str(tmp_path / "d")])
    ds = load_from_disk(str(tmp_path / "d"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "d" / "tokenizer")
    bt = backtrack_id(tok)
    assert len(ds) == 50 and ds.features["roles"].feature.names[2] == "error"
    row = ds[0]
    assert row["input_ids"].count(bt) == 2
    visible = apply_backtrack(row["input_ids"], bt)
    assert tok.decode(visible).endswith(tok.eos_token)
    # the stored structure: every BT sees the error before it; the token after a run does not
    ids, end, pos = row["input_ids"], row["attn_end"], row["position_ids"]
    first_bt = ids.index(bt)
    after = first_bt + 1  # one token per site: error, BT, then the correction
    assert end[first_bt - 1] == after and end[0] == len(ids)
    assert pos[after] == pos[first_bt - 1]  # rewound: the correction takes the erased position


def test_gsm8k_to_disk(tmp_path, gsm8k_test_file):
    from halluc.core.tokens import train_tokenizer
    from halluc.tasks import gsm8k

    problems = gsm8k.read_jsonl(gsm8k_test_file, limit=100)
    tok = train_tokenizer([p.prompt + p.solution for p in problems], vocab_size=600)
    tok.save_pretrained(tmp_path / "tok")
    load_tool().main(["--task", "gsm8k", "--input", str(gsm8k_test_file), "--limit", "40",
                      "--tokenizer", str(tmp_path / "tok"), "--errors", "step", "--example-rate", "1",
                      "--out", str(tmp_path / "g")])
    ds = load_from_disk(str(tmp_path / "g"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "g" / "tokenizer")
    bt = backtrack_id(tok)
    assert len(ds) == 40 and sum(row.count(bt) > 0 for row in ds["input_ids"]) > 30


def test_tools_refuse_to_overwrite_a_folder_without_overwrite(tmp_path):
    """Issue 22, item 11: a second prepare_data into a dataset a run may have trained on is refused
    (it was silently replaced); --overwrite replaces it whole. merge_adapter refuses alike, before
    loading anything."""
    out = tmp_path / "d"
    load_tool().main(["--size", "20", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--out .*d already holds .*pass --overwrite"):
        load_tool().main(["--size", "6", "--out", str(out)])
    assert len(load_from_disk(str(out))) == 20
    load_tool().main(["--size", "6", "--out", str(out), "--overwrite"])
    assert len(load_from_disk(str(out))) == 6
    (tmp_path / "adapter").mkdir()
    with pytest.raises(SystemExit, match="already holds"):
        load_script("tools/merge_adapter.py").main(["--adapter", str(tmp_path / "adapter"), "--out", str(out)])


def test_merge_never_overwrites_the_folder_it_reads(tmp_path):
    """--overwrite empties --out: an --out that holds the adapter (or the base) is refused first."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds --adapter .* which this run reads"):
        load_script("tools/merge_adapter.py").main(["--adapter", str(adapter), "--out", str(tmp_path / "run"),
                                                    "--overwrite"])
    assert adapter.exists()
