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
