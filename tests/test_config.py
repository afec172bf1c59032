"""YAML + command-line settings: overrides apply, mistakes name the key and the source."""
import subprocess
import sys
from pathlib import Path

from conftest import load_script

import pytest

from halluc.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def load_recipe_config(argv):
    recipe = load_script("recipes/masked_sft.py")
    return load_config(recipe.Config, argv, default_file=str(ROOT / "recipes/configs/masked_sft.yaml"))


def test_yaml_then_overrides():
    cfg = load_recipe_config(["sft.steps=7", "--errors.source", "random", "masked=false", "model=null"])
    assert cfg.sft.steps == 7 and cfg.errors.source == "random" and cfg.masked is False and cfg.model is None
    assert cfg.base.steps == 900  # from the YAML file


def test_unknown_key_and_bad_type_are_named(tmp_path):
    with pytest.raises(SystemExit, match="sft.stepz"):
        load_recipe_config(["sft.stepz=3"])
    with pytest.raises(SystemExit, match="masked"):
        load_recipe_config(["masked=maybe"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lab: {trian_size: 3}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml:1: unknown setting 'lab.trian_size'"):
        load_recipe_config(["--config", str(bad)])


def test_a_recipe_without_its_defaults_file_says_where_they_belong(tmp_path):
    """A recipe copied without configs/<name>.yaml: the message named --config, which was not given."""
    recipe = load_script("recipes/masked_sft.py")
    missing = tmp_path / "configs" / "foo.yaml"
    with pytest.raises(SystemExit, match=r"foo.yaml: no such file: the recipe's defaults live there") as e:
        load_config(recipe.Config, ["sft.steps=3"], default_file=str(missing))
    assert "--config " + str(missing) not in str(e.value)


# Run a script as `python SCRIPT ARGS...` runs it (sys.argv, sys.path[0], __main__), then say on stderr
# which ML libraries it imported, whether it exited or raised.
HEAVY = ("torch", "transformers", "datasets", "peft", "deepspeed", "accelerate")
PROBE = f"""
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("imported:", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""


def run_probed(script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE, script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    imported = [line for line in result.stderr.splitlines() if line.startswith("imported:")]
    assert len(imported) == 1, result.stderr[-2000:]
    return result, imported[0].split()[1:]


MASKED_SFT = [
    ("layout.attention=foo", "layout.attention='foo': choose one of causal, block_errors"),
    ("errors.source=bar", "errors.source='bar': choose one of none, random, step"),
    ("sft.steps=-5", "sft.steps=-5: must be in [1, inf]"),
    ("lab.swap_rate=1.5", "lab.swap_rate=1.5: must be in [0, 1]"),
    ("layout.backend=fast", "layout.backend='fast': choose one of auto, native, dense"),
    ("sft.steps=0", "sft.steps=0: must be in [1, inf]"),
    ("layout.attention=block_errors", "layout.attention=block_errors needs layout.positions=rewound"),
    ("layout.positions=rewound", "layout.positions=rewound changes nothing under layout.attention=causal"),
    ("seed=-1", "seed=-1: must be in [0, 4294967295]"),
    ("tiny.hidden=130", "tiny.hidden=130 must split into tiny.heads=4 heads of an even size"),
    ("deepspeed=ds_configs/nope.json", "deepspeed=ds_configs/nope.json: no such file"),
    ("lab.task=gsm8k", "lab.task=gsm8k needs lab.test_file"),
    ("attention=block_errors", "unknown setting 'attention' (did you mean layout.attention?)"),  # the old flat key
    ("sft.step=3", "unknown setting 'sft.step' (did you mean sft.steps?)"),
    ("lab.swap_rate=0.3", "lab.swap_rate=0.3 applies only to lab.listing=swapped"),
]
BAD_SETTINGS = [
    *[("recipes/masked_sft.py", [setting], message) for setting, message in MASKED_SFT],
    ("recipes/masked_sft.py", ["lora.enabled=true", "lora.targets=c_attn"],
     "lora.targets: c_attn is not a module of the lab's tiny Llama"),
    ("recipes/masked_sft.py", ["verifier_head_weight=1", "lora.enabled=true", "deepspeed=ds_configs/zero3.json"],
     "verifier_head_weight with LoRA under ZeRO-3 is not supported"),
    ("recipes/self_correct.py", ["rounds=0"], "rounds=0: must be in [1, inf]"),
    ("recipes/grpo.py", ["rollout.iterations=2", "save_steps=3"], "save_steps=3 must be a multiple of rollout.iterations=2"),
    ("recipes/self_correct.py", ["lora.enabled=true"], "lora.enabled: each round samples from the full model"),
    ("recipes/dpo.py", ["beta=-1"], "beta=-1: must be in [1e-06, inf]"),
    ("recipes/dpo.py", ["loss=tdpo2", "precompute_ref=true"], "loss=tdpo2 needs the reference's whole distribution"),
    ("recipes/prm.py", ["verifier=x"], "verifier='x': choose one of prm, head, oracle, none"),
    ("recipes/prm.py", ["lora.enabled=true", "deepspeed=ds_configs/zero3.json"],
     "the PRM merges its LoRA adapter at the end"),
    ("recipes/mcts.py", ["value=x"], "value='x': choose one of oracle, prm, head, rollouts, none"),
    ("recipes/mcts.py", ["value=prm"], "value=prm needs prm=DIR"),
    ("recipes/mcts.py", ["value=head", "model={model}"], "has no verifier head (verifier_head.safetensors)"),
    # the rules every recipe shares (halluc.core.config.check_run_rules), in each recipe
    *[(f"recipes/{name}.py", ["layout.attention=block_errors"], "layout.attention=block_errors needs layout.positions=rewound")
      for name in ("self_correct", "dpo", "prm", "mcts")],
    *[(f"recipes/{name}.py", ["resume=true", "overwrite=true"], "resume=true and overwrite=true contradict")
      for name in ("masked_sft", "self_correct", "dpo", "prm", "mcts")],
    ("recipes/masked_sft.py", ["sft.steps=[1"], "sft.steps='[1': not readable as YAML"),  # issue 22, item 10
    ("recipes/masked_sft.py", ["--config", "missing.yaml"], "--config missing.yaml: no such file"),
    ("recipes/evaluate.py", ["--model", "m", "--semantics", "x"], "semantics='x': choose one of keep, rewind"),
    ("recipes/evaluate.py", ["prm=p"], "prm needs data=FILE.jsonl"),
    ("recipes/evaluate.py", ["model=m", "limit=0"], "limit=0: must be in [1, inf]"),
    ("recipes/generate.py", ["--model", "m"], "give prompt=TEXT (one or a list) or prompts_file=FILE"),
    ("recipes/generate.py", ["model=m", "prompt=a", "top_p=0"], "top_p=0: must be in [1e-06, 1]"),
    ("recipes/grpo.py", ["rollout.top_p=0"], "rollout.top_p=0: must be in [1e-06, 1]"),  # it kept no token
    ("recipes/self_correct.py", ["sampler.top_p=0"], "sampler.top_p=0: must be in [1e-06, 1]"),
    ("recipes/generate.py", ["model=m", "prompt=a", "template=Q: {{question}}"], "template='Q: {{question}}': give auto, none"),
    ("tools/prepare_data.py", ["--out", "o", "--errors", "bad"], "argument --errors: invalid choice: 'bad'"),
    ("tools/prepare_data.py", ["--out", "o", "--lab", "prime=x"], "prime='x': expected an integer"),
    ("tools/prepare_data.py", ["--out", "o", "--limit", "5"], "--limit reads at most N problems of --input"),
    ("tools/prepare_data.py", ["--task", "jsonl", "--input", "{tmp}/d/mine.jsonl", "--out", "{tmp}/d", "--overwrite"],
     "--out {tmp}/d holds --input {tmp}/d/mine.jsonl, which this run reads"),  # --overwrite deleted it
    ("tools/prepare_data.py", ["--out", "o", "--size", "100", "--lab", "sft_size=200"],
     "--size 100 and --lab sft_size=200 disagree"),  # --lab won, silently
    ("tools/merge_adapter.py", ["--adapter", "a", "--out", "o", "--dtype", "int8"],
     "argument --dtype: invalid choice: 'int8'"),
    ("tools/sweep.py", ["{sweep}"], "default/a/seed-0: command line: layout.attention='foo': choose one of causal"),
    # issue 22, item 8: files and folders that are not what they should be, one line each (halluc.core.inputs)
    ("recipes/masked_sft.py", ["lab.task=gsm8k", "lab.test_file={tmp}/no.jsonl", "lab.train_file={tmp}/no.jsonl"],
     "lab.train_file={tmp}/no.jsonl: no such file"),
    ("recipes/masked_sft.py", ["lab.task=gsm8k", "lab.test_file={tmp}", "lab.train_file={sweep}"],
     "lab.test_file={tmp}: a folder, not a file (give the .jsonl file inside it)"),
    ("recipes/masked_sft.py", ["model={model}/config.json"], "is a file: give the folder that holds it ({model})"),
    ("recipes/masked_sft.py", ["output_dir={model}/config.json/run"], "config.json is a file, not a folder"),
    ("recipes/masked_sft.py", ["output_dir=/proc/halluc-run"], "output_dir=/proc/halluc-run: cannot write in /proc"),
    ("recipes/dpo.py", ["model={model}", "data={tmp}/pairs.jsonl"], "data={tmp}/pairs.jsonl: no such file"),
    ("recipes/prm.py", ["model={model}", "test_data={tmp}/rows.jsonl"], "test_data={tmp}/rows.jsonl: no such file"),
    ("recipes/evaluate.py", ["model={tmp}/nope"], "model {tmp}/nope: no such folder"),
    ("recipes/evaluate.py", ["model={model}", "task=gsm8k", "data={tmp}"], "data={tmp}: a folder, not a file"),
    ("tools/sweep.py", ["{tmp}/missing.yaml"], "sweep file={tmp}/missing.yaml: no such file"),
    ("tools/prepare_data.py", ["--out", "{model}/config.json"], "--out {model}/config.json: a file, not a folder"),
    ("tools/merge_adapter.py", ["--adapter", "{tmp}/nope", "--out", "{tmp}/o"], "--adapter {tmp}/nope: no such folder"),
    ("tools/merge_adapter.py", ["--adapter", "{tmp}", "--base", "{tmp}/nope", "--out", "{tmp}/o"],
     "--base {tmp}/nope: no such folder"),  # it asked the hub for a minute first
    ("tools/prepare_data.py", ["--task", "gsm8k", "--input", "{tmp}/no.jsonl", "--out", "{tmp}/o"],
     "--input={tmp}/no.jsonl: no such file"),
]
SCRIPTS = sorted({script for script, _, _ in BAD_SETTINGS})


@pytest.mark.parametrize("script, args, message", BAD_SETTINGS)
def test_a_bad_setting_fails_fast_naming_the_key_and_the_allowed_values(script, args, message, tmp_path):
    """Fast: every setting is checked before torch, transformers and the rest load (no wall clock here)."""
    sweep, model = tmp_path / "sweep.yaml", tmp_path / "model"
    sweep.write_text("name: bad\nrecipe: recipes/masked_sft.py\nbaseline: a\narms: {a: [layout.attention=foo]}\n"
                     "seeds: [0]\n")
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model folder without a verifier head
    fill = dict(sweep=sweep, model=model, tmp=tmp_path)
    result, imported = run_probed(script, *[a.format(**fill) for a in args])
    # one line and exit code 2 (halluc.core.inputs.run_cli; argparse's errors are 2 as well), no traceback
    assert result.returncode == 2 and message.format(**fill) in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert imported == [], f"{script} {' '.join(args)} imported {imported} before failing"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_no_ml_library(script):
    result, imported = run_probed(script, "--help")
    assert result.returncode == 0 and ("usage:" in result.stdout or "settings (key=value" in result.stdout), \
        result.stdout[-2000:] + result.stderr[-2000:]
    assert imported == [], f"{script} --help imported {imported}"


def test_the_probe_sees_the_ml_libraries_load(tmp_path):
    """The negative control: arguments that pass the checks, so the tool loads torch and then fails."""
    result, imported = run_probed("tools/merge_adapter.py", "--adapter", str(tmp_path), "--out", "o")
    assert result.returncode != 0 and f"merge_adapter: refused: {tmp_path} has no" in result.stderr, \
        result.stderr[-2000:]
    assert {"torch", "transformers"} <= set(imported), imported


def test_yaml_values_are_checked_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("errors: {example_rate: 2}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml:1: errors.example_rate=2: must be in \[0, 1\]"):
        load_recipe_config(["--config", str(bad)])
    bad.write_text("sft:\n  lr: 1e-3\n\n  steps: abc   # the file's line 4\n")  # the line of the key, nested
    with pytest.raises(SystemExit, match=r"bad.yaml:4: sft.steps='abc': expected an integer"):
        load_recipe_config(["--config", str(bad)])


def test_evaluate_and_generate_read_settings_like_every_recipe(tmp_path):
    """key=value and --key value alike; a string setting takes the text as written (YAML would read
    'Question: 2 + 2 ?' as a mapping); a bare --flag switches a boolean on; null empties a path."""
    evaluate, generate = load_script("recipes/evaluate.py"), load_script("recipes/generate.py")
    (tmp_path / "config.json").write_text("{}")  # both check their model folder at load
    cfg = generate.parse_args(["--model", str(tmp_path), "prompt=Question: 2 + 2 ?", "--max-new-tokens", "7"])
    assert cfg.prompt == ["Question: 2 + 2 ?"] and cfg.max_new_tokens == 7
    assert generate.parse_args([f"model={tmp_path}", "prompt=[a, b]"]).prompt == ["a", "b"]
    cfg = evaluate.parse_args([f"model={tmp_path}", "--ban-erased", "--prompt-field", "123", "base=null"])
    assert cfg.ban_erased is True and cfg.prompt_field == "123" and cfg.base is None


def test_a_list_of_names_reads_comma_separated_and_a_prompt_keeps_its_commas(tmp_path):
    """Issue 22, item 7: lora.targets=c_attn,c_proj is two module names (it was one, 'c_attn,c_proj'),
    while a prompt, free text, keeps its commas."""
    recipe = load_script("recipes/masked_sft.py")
    assert recipe.load(["lora.targets=c_attn,c_proj"]).lora.targets == ("c_attn", "c_proj")
    assert recipe.load(["lora.targets=[q_proj, v_proj]"]).lora.targets == ("q_proj", "v_proj")
    prompt = "a = 4 , b = a + 2 . b ?"
    (tmp_path / "config.json").write_text("{}")
    assert load_script("recipes/generate.py").parse_args([f"model={tmp_path}", f"prompt={prompt}"]).prompt == [prompt]


def test_a_bad_row_in_a_data_file_is_one_line_naming_file_and_line(tmp_path):
    """Issue 22, item 9: a non-UTF-8 byte or a missing field gave a good message inside a traceback."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    args = ["lab.task=jsonl", f"lab.train_file={rows}", f"lab.test_file={rows}", f"output_dir={tmp_path}/out"]
    result = subprocess.run([sys.executable, "recipes/masked_sft.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and f"{rows}:2: not UTF-8 text" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
