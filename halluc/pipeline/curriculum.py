"""Technique 3: a curriculum over the backtracking data, from easy to hard.

A curriculum is a list of phases, trained one after the other on the same model, each its own
stage (`OUT/phase-N/`). A phase sets what its examples look like:
- `error_rate`: the fraction of its examples that carry an error (the rest are clean);
- `max_error_tokens` / `tokens_per_site`: error length (step errors are cut to the first
  `max_error_tokens` wrong tokens; random errors have `tokens_per_site` tokens);
- `sites`: error sites per example;
- `ops_min` / `ops_max`: problem difficulty (arith: the number of quantities);
- `source`: `synthetic` (halluc.sources.errors) or `own` (the model's own errors, recipes/self_correct.py).
`order=shuffled` is the control: the same phases' examples pooled and dealt out again at random,
so every phase trains as many steps on a random share of the same data.
A phase with `until_recall` is competence-based: every `probe_every` steps the model generates
on a held-out probe (`probe_size` problems) and the phase ends once its BT recall reaches the
threshold (or after `steps`). Phase boundaries, each phase's data mix and the probe's recall go
to TensorBoard (`curriculum/*`, x axis = steps over all phases).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from halluc.core.config import Fraction, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)


@dataclass
class Phase:
    steps: PositiveInt = 200                    # training steps (its own stage)
    source: Literal["synthetic", "own"] = "synthetic"  # own: the model's errors (recipes/self_correct.py)
    error_rate: Fraction = 0.5                  # examples with an error; the rest clean
    sites: PositiveInt = 1                      # error sites per example (synthetic)
    max_error_tokens: NonNegativeInt = 0        # step errors cut to this many wrong tokens (0: whole tail)
    tokens_per_site: PositiveInt = 1            # random errors: tokens per site
    ops_min: PositiveInt | None = None          # difficulty: arith problems with at least this many quantities
    ops_max: PositiveInt | None = None          # ... and at most this many
    until_recall: Fraction | None = None        # competence: end early once probe BT recall reaches this


@dataclass
class Curriculum:
    phases: list[Phase] = field(default_factory=list)   # empty: no curriculum, one SFT stage
    order: Literal["ordered", "shuffled"] = "ordered"    # shuffled: the control (same data, random order)
    probe_size: PositiveInt = 200               # held-out SFT problems the competence probe generates on
    probe_every: PositiveInt = 50               # steps between probes (phases with until_recall)

    def check(self) -> None:
        for i, p in enumerate(self.phases):
            if p.ops_min and p.ops_max and p.ops_min > p.ops_max:
                raise ValueError(f"curriculum.phases[{i}]: ops_min {p.ops_min} > ops_max {p.ops_max}")
        if self.order == "shuffled" and any(p.until_recall for p in self.phases):
            raise ValueError("curriculum.order=shuffled is the control of an ordered curriculum with fixed "
                             "steps: drop until_recall")


def phase_datasets(cur: Curriculum, problems: list, tokenizer, bt_id: int, errors, *, examples: int, masked: bool,
                   max_len: int, overlong: str, seed: int, num_proc=None, own_rows: list[dict] | None = None):
    """One `datasets.Dataset` per phase (`examples` in all, split by the phases' steps), and the
    counts of each phase's mix. `errors` is the recipe's ErrorConfig (its source and kinds)."""
    import dataclasses

    from datasets import Dataset, concatenate_datasets

    from halluc.sources.data import build_sft_dataset
    from halluc.sources.errors import ErrorConfig

    rng = random.Random(seed)
    total_steps = sum(p.steps for p in cur.phases)
    order = rng.sample(range(len(problems)), len(problems))
    taken: set[int] = set()  # problems are not reused across phases
    parts, counts = [], []
    own_rows = list(own_rows or [])
    rng.shuffle(own_rows)
    taken |= {r["problem"] for r in own_rows}  # nor are the problems the own examples come from
    used_own: set[int] = set()
    for i, phase in enumerate(cur.phases):
        n = max(1, round(examples * phase.steps / total_steps))
        fits = [j for j in order if j not in taken and _difficulty_fits(problems[j], phase)]
        n_err = round(n * phase.error_rate)
        picked = fits[:n - (n_err if phase.source == "own" else 0)]
        taken |= set(picked)
        chosen = [problems[j] for j in picked]
        if phase.source == "own":
            picked_own = [k for k, r in enumerate(own_rows)
                          if k not in used_own and _difficulty_fits(problems[r["problem"]], phase)][:n_err]
            used_own |= set(picked_own)
            own = [own_rows[k] for k in picked_own]
            clean = build_sft_dataset(chosen, tokenizer, ErrorConfig(source="none"), bt_id, masked=masked,
                                      max_len=max_len, overlong=overlong, seed=seed + i, num_proc=num_proc)
            clean = clean.select_columns(["input_ids", "roles", "labels"])
            mine = Dataset.from_list([{k: r[k] for k in ("input_ids", "roles", "labels")} for r in own],
                                     features=clean.features) if own else None
            data = concatenate_datasets([clean, mine]) if own else clean
            counts.append({"examples": len(data), "own_errors": len(own), "clean": len(clean)})
            if len(own) < n_err:
                log.warning("curriculum phase %d: %d own-error examples, fewer than its share (%d)", i + 1, len(own), n_err)
        else:
            cfg = dataclasses.replace(errors, example_rate=phase.error_rate, sites=phase.sites,
                                      max_error_tokens=phase.max_error_tokens, tokens_per_site=phase.tokens_per_site)
            data = build_sft_dataset(chosen, tokenizer, cfg, bt_id, masked=masked, max_len=max_len,
                                     overlong=overlong, seed=seed + i, num_proc=num_proc)
            data = data.select_columns(["input_ids", "roles", "labels"])
            with_error = sum(any(r == 2 for r in roles) for roles in data["roles"])
            counts.append({"examples": len(data), "synthetic_errors": with_error, "clean": len(data) - with_error})
        if not len(data):
            raise SystemExit(f"curriculum phase {i + 1}: no examples (ops_min/ops_max leave no problem?)")
        parts.append(data.shuffle(seed=seed + i))
    if cur.order == "shuffled":  # the control: the same examples, dealt out to the phases at random
        pooled = concatenate_datasets(parts).shuffle(seed=seed + 99)
        sizes, start, dealt = [len(p) for p in parts], 0, []
        for size in sizes:
            dealt.append(pooled.select(range(start, start + size)))
            start += size
        parts = dealt
        counts = [{"examples": len(p), "with_errors": sum(2 in roles for roles in p["roles"]),
                   "shuffled": True} for p in parts]
    return parts, counts


def _difficulty_fits(problem, phase: Phase) -> bool:
    n = problem.meta.get("n_ops")
    if n is None:  # tasks without a difficulty: every problem fits
        return True
    return (phase.ops_min is None or n >= phase.ops_min) and (phase.ops_max is None or n <= phase.ops_max)


def train_phases(model, datasets: list, cur: Curriculum, counts: list[dict], out: Path, run, stage, tokenizer,
                 probe=None):
    """Train the phases in order, each its own stage `OUT/phase-N/` with the batch size and lr of
    the recipe's SFT `stage`; returns the last trainer. `probe`: (problems, task, max_new_tokens)
    for the competence test of phases with until_recall."""
    from torch.utils.tensorboard import SummaryWriter

    from halluc.core.config import Stage
    from halluc.core.distributed import is_main
    from halluc.pipeline.stages import train_stage

    offset, trainer = 0, None
    writer = SummaryWriter(str(out / "tb")) if is_main() else None
    for i, (phase, data, mix) in enumerate(zip(cur.phases, datasets, counts)):
        if writer:  # phase boundaries and each phase's data mix, on one step axis over all phases
            writer.add_scalar("curriculum/phase", i + 1, offset)
            for key, value in {**mix, **{k: getattr(phase, k) for k in
                                         ("error_rate", "max_error_tokens", "sites", "ops_min", "ops_max")}}.items():
                if value is not None:
                    writer.add_scalar(f"curriculum/{key}", float(value), offset)
        log.info("curriculum phase %d/%d (%s): %d steps on %s", i + 1, len(cur.phases), cur.order, phase.steps, mix)
        callbacks = []
        if phase.until_recall is not None and probe is not None:
            callbacks.append(recall_probe(tokenizer, probe, phase.until_recall, cur.probe_every, writer, offset))
        trainer = train_stage(model, data, Stage(phase.steps, stage.batch_size, stage.lr), str(out / f"phase-{i + 1}"),
                              run, tokenizer=tokenizer, callbacks=callbacks)
        offset += trainer.state.global_step
        if writer:
            writer.add_scalar("curriculum/phase_end", i + 1, offset)
    if writer:
        writer.close()
    return trainer


def recall_probe(tokenizer, probe, threshold: float, every: int, writer, offset: int):
    """A TrainerCallback: every `every` steps generate on the probe, and stop the phase once its
    BT recall reaches `threshold`. (Made here so that importing the settings loads no ML library.)"""
    from transformers import TrainerCallback

    from halluc.inference.evaluate import evaluate_problems

    problems, task, max_new = probe

    class RecallProbe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every or model is None:
                return control
            model.eval()
            m = evaluate_problems(model, tokenizer, problems, task, max_new, desc="probe", bt_banned=False)
            model.train()
            # no error made on the probe: nothing left to catch, the phase has done its work
            recall = 1.0 if m["bt_recall"] is None else m["bt_recall"]
            if writer:
                writer.add_scalar("curriculum/probe_bt_recall", recall, offset + state.global_step)
            log.info("probe at step %d: BT recall %.3f (the phase ends at %.3f)", state.global_step, recall, threshold)
            if recall >= threshold:
                control.should_training_stop = True
            return control

    return RecallProbe()
