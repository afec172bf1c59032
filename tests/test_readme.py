"""The README's worked example ("Adding a technique") is real code: written out as a recipe beside a
copy of the main job's YAML, it loads its settings, trains with its own objective and records it."""
import importlib.util
import json
import re
import shutil
import sys

from conftest import ROOT

TINY = ["base.steps=20", "sft.steps=6", "base.batch_size=8", "sft.batch_size=8", "lab.train_size=200",
        "lab.sft_size=100", "lab.test_size=8", "tiny.hidden=32", "eval_max_new_tokens=24"]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Adding a technique", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one worked example"
    return blocks[0]


def test_the_readme_worked_example_is_a_recipe_that_trains_with_its_objective(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipes = tmp_path / "recipes"
    (recipes / "configs").mkdir(parents=True)
    (recipes / "example_mean_sft.py").write_text(readme_example())
    shutil.copy(ROOT / "recipes" / "configs" / "masked_sft.yaml", recipes / "configs" / "example_mean_sft.yaml")
    spec = importlib.util.spec_from_file_location("example_mean_sft", recipes / "example_mean_sft.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["example_mean_sft"] = recipe  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(recipe)

    assert recipe.load(["sft.steps=3"]).sft.steps == 3  # its YAML, then key=value
    out = tmp_path / "out"
    report = recipe.main([f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", *TINY])
    assert report["sft_train"]["steps"] == 6 and set(report["after"]) == {"test_id", "test_ood"}
    assert json.loads((out / "checkpoint" / "config.json").read_text())["halluc"]["recipe"] == "example_mean_sft"
    tags = set()
    for events in (out / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/nll/longest_example" in tags  # its objective trained the stage (the default logs no such metric)
