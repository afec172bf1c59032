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
