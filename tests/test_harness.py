"""lm-evaluation-harness: the `halluc` model answers with the visible text of backtracking decoding
(the same text halluc's own evaluation scores), and lm_eval's command line runs a local GSM8K task
offline on a tiny model."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT

from halluc.inference.generate import generate_text
from halluc.core.model import tiny_llama
from halluc.core.example import apply_backtrack
from halluc.core.tokens import BACKTRACK_TOKEN, add_backtrack_token, backtrack_id

ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
         "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a, b in
        ((3, 4), (10, 5), (7, 8), (2, 2), (6, 1))]


def saved_model(tokenizer, folder: Path) -> Path:
    tok = copy.deepcopy(tokenizer)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2)
    bt = add_backtrack_token(tok, model)
    with torch.no_grad():  # make BTs likely, so the visible text and the raw trace differ: the BT row
        # points along the mean final hidden state, scaled to win at about half the positions
        ids = torch.tensor([tok(f"Question: {r['question']}\nAnswer:")["input_ids"] for r in ROWS[:1]])
        out = model(ids, output_hidden_states=True)
        h, logits = out.hidden_states[-1][0], out.logits[0]
        m = h.mean(0)
        model.lm_head.weight[bt] = m / m.dot(m) * logits.max(-1).values.median()
    model.config.halluc = {"attention": "causal", "positions": "original", "backtrack_token_id": bt}
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_the_model_class_answers_with_the_visible_text(lab_tokenizer, tmp_path):
    from lm_eval.api.instance import Instance

    from halluc.inference.harness import HallucLM, cut_at

    folder = saved_model(lab_tokenizer, tmp_path / "model")
    lm = HallucLM(pretrained=str(folder), max_gen_toks=24)
    prompts = [f"Question: {r['question']}\nAnswer:" for r in ROWS]
    requests = [Instance("generate_until", {}, (p, {"until": ["Question:"], "max_gen_toks": 24}), i)
                for i, p in enumerate(prompts)]
    answers = lm.generate_until(requests)
    ours = generate_text(lm.model, lm.tokenizer, prompts, max_new_tokens=24)
    bt = backtrack_id(lm.tokenizer)
    visible = [lm.tokenizer.decode(apply_backtrack(g.trace, bt), skip_special_tokens=True) for g in ours]
    assert answers == [cut_at(v, ["Question:"]) for v in visible]  # the trace with every BT applied
    assert sum(g.n_backtracks for g in ours) > 0  # the control: traces did backtrack ...
    assert all(BACKTRACK_TOKEN not in a for a in answers)  # ... and the answers hold none of it
    # ... nor what the BTs erased: the trace with its BTs merely dropped reads otherwise
    bts_dropped = [cut_at(lm.tokenizer.decode([t for t in g.trace if t != bt], skip_special_tokens=True),
                          ["Question:"]) for g in ours]
    assert any(d != a for d, a in zip(bts_dropped, answers))


def test_lm_eval_command_line_runs_offline_on_a_local_gsm8k_file(lab_tokenizer, tmp_path):
    folder = saved_model(lab_tokenizer, tmp_path / "model")
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = subprocess.run(
        [sys.executable, "-m", "halluc.inference.harness", "run", "--model", "halluc", "--model_args",
         f"pretrained={folder},max_gen_toks=16", "--tasks", "halluc_gsm8k", "--include_path",
         str(ROOT / "halluc" / "inference" / "harness_tasks"), "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
        env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
             "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert saved
    scores = json.loads(saved[0].read_text())["results"]["halluc_gsm8k"]
    assert 0.0 <= scores["exact_match,strict-match"] <= 1.0
    assert json.loads(saved[0].read_text())["n-samples"]["halluc_gsm8k"]["effective"] == 5


# what a model may write after `Answer:` (BTs applied), and the number halluc's evaluation reads from it
ANSWER_TEXTS = [
    ("He has 7 apples.\n#### 7", "7"),
    ("#### 4\nno: 2 more.\n#### 6", "6"),  # the last `####` (lm_eval's gsm8k took the first: 4)
    ("#### 3/4", None), ("#### 10 - 2 = 8", None),  # not an answer of 3 or 10
    ("####5", "5"), ("#### $1,000", "1000"), ("#### -2.5.", "-2.5"), ("#### 12 apples", None),
    ("#### 5\n#### 3/4", None),  # the last `####` holds no number: no answer, not the earlier 5
    ("He has 7 apples.", None),
]


def harness_answer(text: str, pattern: str) -> str | None:
    """What the halluc_gsm8k task's filter and metric make of `text`: lm_eval's own RegexFilter with the YAML's
    settings, then exact_match's regexes_to_ignore (None: the filter's fallback)."""
    import re

    import yaml
    from lm_eval.filters.extraction import RegexFilter

    task = yaml.safe_load((ROOT / "halluc/inference/harness_tasks/halluc_gsm8k.yaml").read_text())
    regex = task["filter_list"][0]["filter"][0]
    kept = RegexFilter(regex_pattern=pattern, group_select=regex.get("group_select", 0))
    [[out]] = kept.apply([[text]], [{}])
    for ignore in task["metric_list"][0]["regexes_to_ignore"]:
        out = re.sub(ignore, "", out)
    return None if out == "[invalid]" else out


def test_the_harness_reads_the_answer_halluc_reads():
    """The lm_eval task and halluc's evaluation (gsm8k.extract_answer) read the same number from the same
    text: a model's score must not depend on which of the two counted it. Negative control: lm_eval's gsm8k
    pattern (first `####`, any digits after it) reads other numbers from these texts."""
    import yaml

    from halluc.tasks import gsm8k

    task = yaml.safe_load((ROOT / "halluc/inference/harness_tasks/halluc_gsm8k.yaml").read_text())
    pattern = task["filter_list"][0]["filter"][0]["regex_pattern"]
    for text, expected in ANSWER_TEXTS:
        assert gsm8k.extract_answer(text) == expected, text
        assert harness_answer(text, pattern) == expected, text
    lm_eval_gsm8k = r"#### (\-?[0-9\.\,]+)"
    differ = [text for text, expected in ANSWER_TEXTS if harness_answer(text, lm_eval_gsm8k) != expected]
    assert len(differ) >= 4, differ


def test_the_harness_reads_every_gsm8k_reference_answer(gsm8k_test_file):
    """Every reference solution of the real GSM8K test split reads as its `####` answer in both."""
    import yaml

    from halluc.tasks import gsm8k

    task = yaml.safe_load((ROOT / "halluc/inference/harness_tasks/halluc_gsm8k.yaml").read_text())
    pattern = task["filter_list"][0]["filter"][0]["regex_pattern"]
    rows = [json.loads(line) for line in Path(gsm8k_test_file).read_text().splitlines() if line.strip()]
    read = [(gsm8k.extract_answer(r["answer"]), harness_answer(r["answer"], pattern)) for r in rows]
    assert all(ours is not None and ours == theirs for ours, theirs in read), \
        [(r["answer"][-40:], x) for r, x in zip(rows, read) if x[0] is None or x[0] != x[1]][:5]
