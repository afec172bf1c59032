"""Bring your own model and data: each class of failure a new user hit, as a test.

Models here are tiny stand-ins saved to disk the way a user's model would be (a folder with
config.json and tokenizer files); nothing is downloaded.
"""
import copy
import json
import logging

import pytest
import torch
from conftest import load_script
from transformers import AutoModelForCausalLM

from halluc.core.model import tiny_llama
from halluc.tasks import arith, gsm8k, jsonl
from halluc.core.tokens import BACKTRACK_TOKEN, train_tokenizer

TINY = ["base.steps=20", "sft.steps=4", "base.batch_size=8", "sft.batch_size=8", "lab.train_size=200",
        "lab.sft_size=64", "lab.test_size=8", "tiny.hidden=32", "eval_max_new_tokens=24"]


def recipe():
    return load_script("recipes/masked_sft.py")


@pytest.fixture(scope="module")
def cache(lab_cache):
    return lab_cache  # lab bases trained once per test run, whichever test needs one first


@pytest.fixture
def no_pad_model(arith_problems, tmp_path):
    """A model folder whose tokenizer has no pad token (as GPT-2, Llama and Mistral ship)."""
    tok = train_tokenizer([p.prompt + p.solution for p in arith_problems])
    tok.pad_token = None
    assert tok.pad_token_id is None
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "nopad")
    tok.save_pretrained(tmp_path / "nopad")
    return tmp_path / "nopad"


# 1 -------------------------------------------------------------------------------------------
def test_a_tokenizer_without_pad_token_trains_generates_and_evaluates(no_pad_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        report = recipe().main([f"model={no_pad_model}", f"output_dir={tmp_path}/out", *TINY])
    assert any("no pad token: padding with its EOS token" in r.message for r in caplog.records)
    assert report["after"]["test_id"]["n"] == 8
    generate = load_script("recipes/generate.py")
    out = generate.main(["--model", str(tmp_path / "out" / "checkpoint"), "--prompt", "a = 3 , b = a + 1 . b ?",
                         "--max-new-tokens", "8"])
    assert out[0]["stop"] in ("eos", "length") and out[0]["semantics"] == "keep"


# 2 -------------------------------------------------------------------------------------------
def test_an_earlier_run_is_never_overwritten_silently(tmp_path, cache, caplog):
    args = [f"output_dir={tmp_path}/out", f"cache_dir={cache}", "save_steps=2", *TINY]
    recipe().main(args)
    first = json.loads((tmp_path / "out" / "eval.json").read_text())
    with pytest.raises(SystemExit, match="already holds a finished run .*resume=true.*overwrite=true"):
        recipe().main(args + ["sft.lr=0.01"])
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == first  # untouched
    with caplog.at_level(logging.WARNING):
        recipe().main(args + ["overwrite=true", "sft.lr=0.01"])
    assert any("overwrite=true: deleting the earlier run" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["config"]["sft"]["lr"] == 0.01
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        recipe().main([f"output_dir={tmp_path}/fresh", f"cache_dir={cache}", "resume=true", *TINY])
    assert any("resume=true, but" in r.message and "starting from scratch" in r.message for r in caplog.records)
    with pytest.raises(SystemExit, match="contradict"):
        recipe().main([f"output_dir={tmp_path}/x", "resume=true", "overwrite=true"])
    # resuming is for the same settings; a finished run without checkpoint-N has nothing to resume
    with pytest.raises(SystemExit, match=r"made with other settings \(sft.lr: 0.01 -> 0.02"):
        recipe().main(args + ["resume=true", "sft.lr=0.02"])
    with pytest.raises(SystemExit, match="finished run with no checkpoint-N"):
        recipe().main([f"output_dir={tmp_path}/fresh", f"cache_dir={cache}", "resume=true", *TINY])
    # overwrite never deletes what the run reads
    with pytest.raises(SystemExit, match="would delete model="):
        recipe().main([f"output_dir={tmp_path}/out", f"model={tmp_path}/out/checkpoint", "overwrite=true", *TINY])
    assert (tmp_path / "out" / "checkpoint" / "config.json").exists()
    # a run that failed before training left only config.yaml: the same command runs again
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "config.yaml").write_text("seed: 0\n")
    recipe().main([f"output_dir={tmp_path}/failed", f"cache_dir={cache}", *TINY])


# 3 -------------------------------------------------------------------------------------------
def test_a_checkpoint_is_scored_on_its_own_lab_and_settings_that_cannot_apply_fail(tmp_path, cache):
    recipe().main([f"output_dir={tmp_path}/p5", f"cache_dir={cache}", "lab.prime=5", "seed=3", *TINY])
    evaluate = load_script("recipes/evaluate.py")
    report = evaluate.main(["--model", str(tmp_path / "p5" / "checkpoint"), "--limit", "4", "--max-new-tokens", "8"])
    from halluc.pipeline.lab import LabConfig, lab_splits

    expected = lab_splits(LabConfig(prime=5, train_size=200, sft_size=64, test_size=8), 3)["test_id"][:4]
    assert [s["prompt"] for s in report["results"]["test_id"]["samples"][:4]] == [p.prompt for p in expected]
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(SystemExit, match="data=.* is read only by task=gsm8k or jsonl"):
        evaluate.main(["--model", str(tmp_path / "p5" / "checkpoint"), "--data", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit, match="lab.train_file is read only by lab.task=gsm8k or jsonl"):
        recipe().load(["lab.train_file=train.jsonl"])
    with pytest.raises(SystemExit, match="lab.prompt_field is read only by lab.task=jsonl"):
        recipe().load(["lab.prompt_field=question"])


# 4 -------------------------------------------------------------------------------------------
def test_prepare_train_evaluate_on_arith_and_on_own_jsonl_fields(tmp_path, cache, arith_problems):
    prepare = load_script("tools/prepare_data.py")
    lab = ["--lab", "train_size=200", "--lab", "test_size=8"]  # the recipe's lab (TINY): the base's tokenizer
    prepare.main(["--out", str(tmp_path / "data"), "--size", "64", "--seed", "0", *lab])
    report = recipe().main([f"data={tmp_path / 'data'}", f"output_dir={tmp_path}/out", f"cache_dir={cache}", *TINY])
    assert report["sft_train"]["steps"] == 4
    # data made with another tokenizer is refused, naming the mismatch
    other = train_tokenizer([p.prompt[::-1] for p in arith_problems], vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    prepare.main(["--out", str(tmp_path / "bad"), "--size", "16", "--tokenizer", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="another tokenizer than the model's"):
        recipe().main([f"data={tmp_path / 'bad'}", f"output_dir={tmp_path}/bad-out", f"cache_dir={cache}", *TINY])
    with pytest.raises(SystemExit, match="fixed when the data is prepared"):
        recipe().load([f"data={tmp_path / 'data'}", "masked=false"])
    # the folder knows its task: arith data with a GSM8K test file would score another task
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}) + "\n")
    with pytest.raises(SystemExit, match="trained on lab.task=arith .* would evaluate it on lab.task=gsm8k"):
        recipe().main([f"data={tmp_path / 'data'}", f"model={tmp_path}/out/checkpoint", "lab.task=gsm8k",
                       f"lab.test_file={gsm}", f"output_dir={tmp_path}/gsm-out", *TINY])
    import shutil  # a model that records no task: the prepared data's own record refuses it
    shutil.copytree(tmp_path / "out" / "checkpoint", tmp_path / "unrecorded")
    config = json.loads((tmp_path / "unrecorded" / "config.json").read_text())
    del config["halluc"]["lab"]
    (tmp_path / "unrecorded" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="prepared from arith problems, but lab.task=gsm8k"):  # at load: no base evaluated
        recipe().load([f"data={tmp_path / 'data'}", f"model={tmp_path}/unrecorded", "lab.task=gsm8k",
                       f"lab.test_file={gsm}", f"output_dir={tmp_path}/gsm-out", *TINY])

    # a user's jsonl with its own field names: train on it and evaluate the checkpoint on it
    rows = [{"question": p.prompt, "solution": p.solution.replace(" ;", " ;\n"), "final": p.answer}
            for p in arith_problems[:80]]
    for name, part in (("train", rows[:64]), ("test", rows[64:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    fields = ["lab.task=jsonl", f"lab.train_file={tmp_path / 'train.jsonl'}", f"lab.test_file={tmp_path / 'test.jsonl'}",
              "lab.prompt_field=question", "lab.response_field=solution", "lab.answer_field=final",
              "errors.source=step"]
    report = recipe().main([f"output_dir={tmp_path}/mine", f"cache_dir={cache}", *TINY, *fields])
    assert report["after"]["test_id"]["n"] == 8
    evaluate = load_script("recipes/evaluate.py")
    again = evaluate.main(["--model", str(tmp_path / "mine" / "checkpoint"), "--max-new-tokens", "24"])
    assert again["task"] == "jsonl" and again["results"]["test"]["n"] == 8


# 5 is in tests/test_lora.py (the fingerprint) ---------------------------------------------

# 6 -------------------------------------------------------------------------------------------
def test_packing_drops_are_reported_and_nothing_left_fails_clearly(bt_tokenizer, arith_problems, tmp_path, caplog):
    from halluc.core.config import Stage
    from halluc.sources.data import build_sft_dataset
    from halluc.sources.errors import ErrorConfig
    from halluc.core.config import LayoutSettings
    from halluc.pipeline.stages import RunSettings, train_stage
    from halluc.core.tokens import backtrack_id

    data = build_sft_dataset(arith_problems[:40], bt_tokenizer, ErrorConfig(example_rate=1.0), backtrack_id(bt_tokenizer))
    lengths = sorted(len(x) for x in data["input_ids"])
    model = tiny_llama(len(bt_tokenizer), hidden=32, layers=1, heads=2)
    with caplog.at_level(logging.WARNING):
        train_stage(model, data, Stage(steps=1, batch_size=4), str(tmp_path / "a"), RunSettings(layout=LayoutSettings(pack=lengths[20])))
    assert any("longer than layout.pack=" in r.message and "dropped: raise layout.pack" in r.message for r in caplog.records)
    with pytest.raises(SystemExit, match="no training example left"):
        train_stage(model, data, Stage(steps=1, batch_size=4), str(tmp_path / "b"), RunSettings(layout=LayoutSettings(pack=lengths[0] - 1)))


# 7 -------------------------------------------------------------------------------------------
def test_path_mistakes_get_errors_that_name_the_path(tmp_path, no_pad_model, monkeypatch):
    import socket

    from halluc.training.checkpoint import load_trained
    from halluc.core.model import load_causal_lm
    from halluc.core.tokens import load_tokenizer

    def no_network(*args):
        raise AssertionError(f"a local path mistake tried the network: {args}")

    with monkeypatch.context() as m:  # a missing folder is named at once, never looked up on the hub
        m.setattr(socket.socket, "connect", no_network)
        m.setattr(socket, "create_connection", no_network)
        with pytest.raises(FileNotFoundError, match="runs/nope/checkpoint: no such folder"):
            load_causal_lm("runs/nope/checkpoint")
        with pytest.raises(FileNotFoundError, match="no such folder"):
            load_trained(str(tmp_path / "missing"))
    weights_only = tmp_path / "weights"
    AutoModelForCausalLM.from_pretrained(no_pad_model).save_pretrained(weights_only)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        load_tokenizer(weights_only)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="an intermediate checkpoint"):
        load_tokenizer(tmp_path / "checkpoint-5")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "models").mkdir()  # `models/llama3` is a local typo when models/ is a local folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="models/llama3: no such folder"):
        load_trained("models/llama3")


def test_intermediate_checkpoints_and_adapters_can_be_evaluated(tmp_path, cache):
    import shutil

    recipe().main([f"output_dir={tmp_path}/full", f"cache_dir={cache}", "save_steps=2", *TINY])
    recipe().main([f"output_dir={tmp_path}/lora", f"cache_dir={cache}", "lora.enabled=true", "lora.r=2",
                   "save_steps=2", *TINY])
    evaluate = load_script("recipes/evaluate.py")
    for folder in ("full/checkpoint-4", "lora/adapter", "lora/checkpoint-4"):
        report = evaluate.main(["--model", str(tmp_path / folder), "--limit", "3", "--max-new-tokens", "8",
                                "--out", str(tmp_path / "eval" / folder)])
        assert report["results"]["test_id"]["n"] == 3
    # an adapter whose base moved: the error says so, and --base finds it
    info = json.loads((tmp_path / "lora" / "adapter" / "halluc_adapter.json").read_text())
    moved = tmp_path / "moved-base"
    shutil.move(info["base_path"], moved)
    with pytest.raises(FileNotFoundError, match="not there any more: give the base's folder"):
        evaluate.main(["--model", str(tmp_path / "lora" / "adapter"), "--limit", "2", "--out", str(tmp_path / "e2")])
    report = evaluate.main(["--model", str(tmp_path / "lora" / "adapter"), "--base", str(moved), "--limit", "2",
                            "--max-new-tokens", "8", "--out", str(tmp_path / "e3")])
    assert report["results"]["test_id"]["n"] == 2
    shutil.move(moved, info["base_path"])  # the module's cached base, for the other tests


def test_adapters_saved_with_the_old_fingerprint_still_load(tmp_path, cache):
    from halluc.training.lora import fingerprint_v1, load_adapter

    recipe().main([f"output_dir={tmp_path}/lora", f"cache_dir={cache}", "lora.enabled=true", "lora.r=2", *TINY])
    path = tmp_path / "lora" / "adapter" / "halluc_adapter.json"
    info = json.loads(path.read_text())
    base = AutoModelForCausalLM.from_pretrained(info["base_path"])
    old = {k: v for k, v in info.items() if k != "fingerprint_version"}
    path.write_text(json.dumps({**old, "fingerprint": fingerprint_v1(base)}))
    load_adapter(tmp_path / "lora" / "adapter")  # v1: checked the old way
    path.write_text(json.dumps({**old, "fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapter(tmp_path / "lora" / "adapter")


# 8 is in tests/test_config.py (bad values and combinations fail at load, in under 5 s) ---------

# 9 -------------------------------------------------------------------------------------------
def test_training_a_halluc_checkpoint_again_keeps_its_bt_row(tmp_path, cache, caplog):
    recipe().main([f"output_dir={tmp_path}/first", f"cache_dir={cache}", *TINY])
    first = tmp_path / "first" / "checkpoint"
    trained = AutoModelForCausalLM.from_pretrained(first)
    bt = trained.config.halluc["backtrack_token_id"]
    row = trained.get_input_embeddings().weight[bt].detach().clone()
    frozen = ["sft.lr=0"]  # no update: what reaches the checkpoint is the row as initialised
    with caplog.at_level(logging.WARNING):
        recipe().main([f"model={first}", f"output_dir={tmp_path}/again", *TINY, *frozen])
    assert any("keeping its trained row" in r.message for r in caplog.records)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again" / "checkpoint")
    torch.testing.assert_close(again.get_input_embeddings().weight[bt], row, rtol=0, atol=0)
    recipe().main([f"model={first}", f"output_dir={tmp_path}/reinit", "reinit_bt=true", *TINY, *frozen])
    reinit = AutoModelForCausalLM.from_pretrained(tmp_path / "reinit" / "checkpoint")
    assert not torch.equal(reinit.get_input_embeddings().weight[bt], row)


# 10 ------------------------------------------------------------------------------------------
def test_data_file_edge_cases_name_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="empty.jsonl: no problems in it"):
        recipe().main(["lab.task=gsm8k", f"lab.train_file={empty}", f"lab.test_file={empty}",
                       f"output_dir={tmp_path}/o"])
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "ok", "answer": "1\\n#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8"):
        gsm8k.read_jsonl(latin)
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"prompt": "2 + 2 =", "response": 4, "final": 4}) + "\n"
                       + json.dumps({"prompt": "x", "response": {"a": 1}}) + "\n")
    with pytest.raises(ValueError, match=r"numeric.jsonl:2: field 'response' must be a string or a list"):
        jsonl.read_jsonl(numeric, answer_field="final")
    assert jsonl.read_jsonl(numeric, answer_field="final", limit=1)[0].answer == "4"
    steps = tmp_path / "steps.jsonl"  # a list of steps; the last item holds two lines
    steps.write_text(json.dumps({"prompt": "p", "response": ["a", "b\n42"]}) + "\n"
                     + json.dumps({"prompt": "p", "response": []}) + "\n")
    assert jsonl.read_jsonl(steps, limit=1)[0].answer == "42"  # as evaluation reads the answer
    with pytest.raises(ValueError, match=r"steps.jsonl:2: field 'response' is empty"):
        jsonl.read_jsonl(steps)
    bad_answer = tmp_path / "gsm_numeric.jsonl"
    bad_answer.write_text(json.dumps({"question": "q", "answer": 18}) + "\n")
    with pytest.raises(ValueError, match="gsm_numeric.jsonl:1: field 'answer' has no '#### <number>'"):
        gsm8k.read_jsonl(bad_answer)


def test_a_prompt_longer_than_the_model_positions_does_not_kill_the_evaluation(bt_tokenizer):
    from halluc.inference.evaluate import evaluate_problems

    tok = copy.deepcopy(bt_tokenizer)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, max_positions=48)
    problems = arith.make_split(6, (2, 2), seed=1) + arith.make_split(2, (12, 12), seed=2)
    assert max(len(tok(p.prompt)["input_ids"]) for p in problems) >= 48
    result = evaluate_problems(model, tok, problems, arith, max_new_tokens=16)
    assert result["n"] == 8 and result["stops"].get("prompt_too_long") == 2
    with pytest.raises(ValueError, match="no problems to evaluate"):
        evaluate_problems(model, tok, [], arith)
    assert BACKTRACK_TOKEN in tok.get_vocab()


def test_lengths_beyond_the_models_positions_fail_before_any_work(tmp_path, lab_tokenizer):
    """Issue 22, item 6: max_len (or pack) longer than a model's positions crashed with an IndexError
    after the base evaluation and the data were built; now one line, before the model loads. Data
    prepared with a longer --max-len than the model has positions is refused the same way."""
    tok = copy.deepcopy(lab_tokenizer)
    folder = tmp_path / "short"
    tiny_llama(len(tok), hidden=32, layers=1, heads=2, max_positions=48, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    for setting, value in (("max_len", 4096), ("layout.pack", 64)):
        with pytest.raises(SystemExit, match=f"{setting}={value} is longer than the 48 positions of model="):
            recipe().main([f"output_dir={tmp_path}/{setting}", f"model={folder}", "max_len=48", f"{setting}={value}",
                           *TINY])
    data = tmp_path / "data"
    load_script("tools/prepare_data.py").main(["--size", "20", "--tokenizer", str(folder), "--max-len", "512",
                                               "--out", str(data)])
    with pytest.raises(SystemExit, match="more than the 48\\s+positions of the model: prepare it again with --max-len 48"):
        recipe().main([f"output_dir={tmp_path}/prepared", f"model={folder}", f"data={data}", "max_len=48", *TINY])


def test_lora_on_a_gpt2_model_names_its_layers_before_work_then_trains_with_them(tmp_path, lab_tokenizer):
    """Issue 22, item 7: lora.enabled=true on a GPT-2 failed with PEFT's NoMatchingPeftModuleError after
    the base evaluation (the default targets are Llama names). Now it fails before anything is
    written, naming GPT-2's layers; with them (lora.targets=c_attn,c_proj) it trains and saves an adapter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = copy.deepcopy(lab_tokenizer)
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=256,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "default_targets"
    with pytest.raises(ValueError, match="q_proj, k_proj.* not a module of .*gpt2 \\(gpt2\\); its linear layers: "
                                         "c_attn, c_fc, c_proj"):
        recipe().main([f"output_dir={out}", f"model={folder}", "lora.enabled=true", *TINY])
    assert not out.exists()  # nothing ran: no evaluation, no output folder
    out = tmp_path / "gpt2_targets"
    report = recipe().main([f"output_dir={out}", f"model={folder}", "lora.enabled=true", "lora.targets=c_attn,c_proj",
                            *TINY])
    assert (out / "adapter" / "adapter_config.json").exists() and report["sft_train"]["steps"] == 4


def legacy_sentencepiece_tokenizer(texts):
    """A Llama-2 / Mistral-v0.1 style tokenizer: BPE over "▁"-words with a "▁" put before every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True)


def test_steps_gain_no_space_under_a_tokenizer_that_starts_every_text_at_a_word_boundary(arith_problems, lab_tokenizer):
    """Llama-2 / Mistral-v0.1 tokenizers put "▁" before every encoded text: steps encoded on their own
    read "...;\\n x = ..." once joined. The pieces are encoded after a newline instead, whose ids are
    dropped: the example decodes to the problem's own text. Negative control: each piece alone adds a
    space, and a byte-level BPE (the lab's) is left as it was."""
    from halluc.core.tokens import continuation_ids
    from halluc.sources.data import tokenize_problems

    tok = legacy_sentencepiece_tokenizer([p.prompt + p.solution for p in arith_problems[:250]])
    problems = arith_problems[250:270]
    encoded = tokenize_problems(problems, tok)
    assert len(encoded) == len(problems) == 20
    for p, (prompt, steps) in zip(problems, encoded):
        text = tok.decode(prompt + [t for s in steps for t in s], skip_special_tokens=True)
        assert text == p.prompt + "".join(p.steps)
    alone = [tok(s, add_special_tokens=False)["input_ids"] for s in problems[0].steps]
    prompt = tok(problems[0].prompt)["input_ids"]
    assert tok.decode(prompt + [t for s in alone for t in s], skip_special_tokens=True) != problems[0].prompt + "".join(problems[0].steps)
    steps = problems[0].steps
    assert continuation_ids(lab_tokenizer, steps) == [lab_tokenizer(s, add_special_tokens=False)["input_ids"] for s in steps]


# --------------------------------------------------------------------------------------------
def test_generate_puts_prompts_as_the_checkpoint_was_trained(bt_tokenizer, tmp_path):
    """A GSM8K checkpoint is asked "Question: ...\\nAnswer:" as in training, a jsonl one its prompt_template;
    a prompts_file .jsonl keeps a two-line question whole (a .txt splits lines); a prompt already in the
    template's form, or template=none, goes as given. (It used to send the bare text: a GSM8K model never
    saw its question form, and a two-line question became two prompts.)"""
    generate = load_script("recipes/generate.py")
    tok = copy.deepcopy(bt_tokenizer)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    model.config.halluc = {"attention": "causal", "positions": "original", "lab": {"task": "gsm8k"}}
    model.save_pretrained(tmp_path / "gsm8k")
    tok.save_pretrained(tmp_path / "gsm8k")
    question = "Tom has 3 apples.\nHe buys 4 more. How many?"
    rows = tmp_path / "questions.jsonl"
    rows.write_text(json.dumps({"question": question, "answer": "#### 7"}) + "\n"
                    + json.dumps({"question": "Question: 1 + 1 ?\nAnswer:"}) + "\n")
    out = generate.main([f"model={tmp_path}/gsm8k", f"prompts_file={rows}", "max_new_tokens=4"])
    assert [r["input"] for r in out] == [gsm8k.PROMPT_TEMPLATE.format(question=question), "Question: 1 + 1 ?\nAnswer:"]
    assert [r["prompt"] for r in out] == [question, "Question: 1 + 1 ?\nAnswer:"]
    assert all(r["stop"] in ("eos", "length") for r in out)
    lines = tmp_path / "questions.txt"
    lines.write_text(question + "\n")
    out = generate.main([f"model={tmp_path}/gsm8k", f"prompts_file={lines}", "template=none", "max_new_tokens=4"])
    assert [r["input"] for r in out] == question.split("\n")

    assert generate.prompt_template("auto", {"lab": {"task": "jsonl", "prompt_template": "Solve {{x}}: {prompt}\n"}}) \
        == "Solve {{x}}: {prompt}\n"
    assert generate.put_in_template("a = 1", "Solve {{x}}: {prompt}\n") == "Solve {x}: a = 1\n"  # str.format, as jsonl
    assert generate.prompt_template("auto", {"lab": {"task": "jsonl", "prompt_template": "{title}: {prompt}"}}) \
        == "{prompt}"  # a field of the rows a bare prompt does not have: as given (warned)
    assert generate.prompt_template("auto", {"lab": {"task": "arith"}}) == generate.prompt_template("auto", {}) \
        == "{prompt}"
    assert generate.prompt_template("Q: {prompt} A:", {"lab": {"task": "gsm8k"}}) == "Q: {prompt} A:"
    # the form is the text before AND after {prompt}; templates are read as str.format reads them
    assert generate.put_in_template("x\nAnswer:", "{prompt}\nAnswer:") == "x\nAnswer:"  # not wrapped twice
    assert generate.put_in_template("Question: x", gsm8k.PROMPT_TEMPLATE.replace("{question}", "{prompt}")) \
        == "Question: Question: x\nAnswer:"  # not the whole form: wrapped
    assert generate.put_in_template("hi", "Say {{prompt}}: {prompt}") == "Say {prompt}: hi"
    assert [generate.template_parts(t) for t in ("Q: {prompt!s}", "Q: {prompt:>5}", "{prompt}{prompt}", "{", "{}")] \
        == [None] * 5
    nulls = tmp_path / "nulls.jsonl"  # `datasets` writes a missing key as null
    nulls.write_text(json.dumps({"prompt": None, "question": "q?"}) + "\n" + json.dumps({"prompt": "p", "question": None}))
    assert generate.read_prompts(str(nulls)) == ["q?", "p"]
