"""A recipe (masked_sft.py, or PAUSE_RECIPE), unchanged, except that one stage stops at a chosen step and waits.

    PAUSE_DIR=runs/x PAUSE_AT_STEP=13 python tests/helpers/pausing_recipe.py output_dir=runs/x ...

When the Trainer whose output_dir is PAUSE_DIR ends step PAUSE_AT_STEP, this process writes
PAUSE_DIR/paused-at-<step> and sleeps, so a test can `kill -9` it at a known point mid-training
(the stage's checkpoint-N folders before that step are on disk, the steps after it are not).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

# the recipe to run: recipes/masked_sft.py unless PAUSE_RECIPE names another
RECIPE = Path(__file__).resolve().parents[2] / os.environ.get("PAUSE_RECIPE", "recipes/masked_sft.py")


class PauseAt(TrainerCallback):
    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(3600)  # until killed


def main():
    import halluc.pipeline.stages

    spec = importlib.util.spec_from_file_location(RECIPE.stem, RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[RECIPE.stem] = recipe  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(recipe)
    pause_dir = Path(os.environ["PAUSE_DIR"]).resolve()
    step = int(os.environ["PAUSE_AT_STEP"])
    original = halluc.pipeline.stages.make_trainer

    def make_trainer(model, args, *rest, **kwargs):
        trainer = original(model, args, *rest, **kwargs)
        if Path(args.output_dir).resolve() == pause_dir:
            trainer.add_callback(PauseAt(step, pause_dir / f"paused-at-{step}"))
        return trainer

    halluc.pipeline.stages.make_trainer = make_trainer  # what train_stage calls
    recipe.main(sys.argv[1:])


if __name__ == "__main__":
    main()
