"""YAML + command-line settings: overrides apply, mistakes name the key and the source."""
from pathlib import Path

from conftest import load_script

import pytest

from halluc.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def load_recipe_config(argv):
    recipe = load_script("recipes/masked_sft.py")
    return load_config(recipe.Config, argv, default_file=str(ROOT / "recipes/configs/masked_sft.yaml"))


def test_yaml_then_overrides():
    cfg = load_recipe_config(["sft.steps=7", "--errors.source", "random", "masked=false", "model=null"])
    assert cfg.sft.steps == 7 and cfg.errors.source == "random" and cfg.masked is False and cfg.model is None
    assert cfg.base.steps == 1800  # from the YAML file


def test_unknown_key_and_bad_type_are_named(tmp_path):
    with pytest.raises(SystemExit, match="sft.stepz"):
        load_recipe_config(["sft.stepz=3"])
    with pytest.raises(SystemExit, match="masked"):
        load_recipe_config(["masked=maybe"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lab: {trian_size: 3}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml.*lab.trian_size"):
        load_recipe_config(["--config", str(bad)])


@pytest.mark.parametrize("setting, message", [
    ("attention=foo", "attention='foo': choose one of causal, block_errors"),
    ("errors.source=bar", "errors.source='bar': choose one of none, random, step"),
    ("sft.steps=-5", "sft.steps=-5: must be in [1, inf]"),
    ("lab.swap_rate=1.5", "lab.swap_rate=1.5: must be in [0, 1]"),
    ("backend=fast", "backend='fast': choose one of auto, native, dense"),
    ("sft.steps=0", "sft.steps=0: must be in [1, inf]"),
    ("attention=block_errors", "attention=block_errors needs positions=rewound"),
    ("lab.task=gsm8k", "lab.task=gsm8k needs lab.test_file"),
    ("lab.swap_rate=0.3", "lab.swap_rate=0.3 applies only to lab.listing=swapped"),
])
def test_a_bad_setting_fails_fast_naming_the_key_and_the_allowed_values(setting, message):
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "recipes/masked_sft.py", setting], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    took = time.monotonic() - t0
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert took < 5, f"{setting} took {took:.1f} s to fail"


def test_yaml_values_are_checked_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("errors: {example_rate: 2}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: errors.example_rate=2: must be in \[0, 1\]"):
        load_recipe_config(["--config", str(bad)])
