"""Evaluate a checkpoint with backtracking generation; write eval.json + eval.md, print the table.

    python recipes/evaluate.py model=runs/masked_sft/checkpoint                 # arith, as it was trained
    python recipes/evaluate.py model=runs/masked_sft/adapter                    # a LoRA adapter folder
    python recipes/evaluate.py model=DIR task=gsm8k data=../shared/data/gsm8k/test.jsonl limit=50
    python recipes/evaluate.py model=DIR task=jsonl data=mine.jsonl prompt_field=question \
        response_field=solution answer_field=final
    python recipes/evaluate.py model=DIR semantics=rewind out=runs/eval        # override (warns on mismatch)
    python recipes/evaluate.py prm=runs/prm/prm data=steps.jsonl               # a step verifier, ProcessBench-style
    python recipes/evaluate.py prm=runs/masked_sft/checkpoint data=steps.jsonl # ... a policy's verifier head

Settings are key=value as in every recipe (`--key value` reads too, so `--model DIR` still works);
`--help` lists them with their meanings.

What a checkpoint was trained with comes from its config.halluc: the semantics (keep / rewind),
and for arith the lab settings and seed, so it is scored on the problems of its own lab (held
out from its training). task= / seed= override them; a setting that cannot apply is an error.
Metric definitions are in docs/generation.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from halluc.core.config import (Escaped, Fraction, NonNegativeFloat, NonNegativeInt, PositiveInt, TopP, as_dict,
                                load_config)
from halluc.inference.decoding import LoopGuards
from halluc.pipeline.lab import LabConfig, lab_splits
from halluc.tasks import get_task, gsm8k, jsonl
from halluc.core.inputs import check_input_file, check_model_path, check_writable_folder, run_cli

DEFAULT_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
log = logging.getLogger("evaluate")


@dataclass
class Config:
    model: str | None = None              # a checkpoint or adapter folder saved by halluc, or any local HF causal LM
    prm: str | None = None                # score a step verifier instead: a PRM folder, or a checkpoint with a head
    threshold: Fraction | None = None     # prm: a step scored below this is the first wrong one; None: calibrated on half the rows
    base: str | None = None               # an adapter's base folder, if not where it was at training
    task: Literal["arith", "gsm8k", "jsonl"] | None = None  # default: the task the checkpoint was trained on
    data: str | None = None               # gsm8k / jsonl: a jsonl file (gsm8k default: the shared test set); prm: rows
    prompt_field: str = "prompt"          # jsonl: the prompt's field
    response_field: str = "response"      # jsonl: the reference response's field
    answer_field: str | None = None       # jsonl: the final answer's field (default: the last step)
    step_separator: Escaped = "\n"        # jsonl: what ends a step (\n read as a newline)
    prompt_template: str = "{prompt}\n"  # jsonl: the text before the response ({prompt}, any field); verbatim
    limit: PositiveInt | None = None      # at most N problems per split
    semantics: Literal["keep", "rewind"] | None = None  # default: from the checkpoint
    out: str | None = None                # folder for eval.json and eval.md (default: the model folder)
    seed: int | None = None               # arith lab splits seed (default: the training seed, else 0)
    max_new_tokens: PositiveInt = 192
    batch_size: PositiveInt = 64
    temperature: NonNegativeFloat = 0.0   # 0: greedy
    top_p: TopP = 1.0
    max_backtracks: NonNegativeInt = LoopGuards.max_backtracks
    max_backtracks_per_position: NonNegativeInt = LoopGuards.max_backtracks_per_position
    ban_erased: bool = False              # ban the just-erased token right after a rewind
    bt_banned: bool = True                # also decode with BT banned (same seed): backtracking's own effect

    def check(self) -> None:
        if bool(self.model) == bool(self.prm):
            raise ValueError("give model=DIR (evaluate generation) or prm=DIR with data=FILE.jsonl (score a step verifier)")
        if self.prm and not self.data:
            raise ValueError("prm needs data=FILE.jsonl: stepwise rows (prompt, completions, labels)")
        if self.task == "gsm8k" and not self.data and not DEFAULT_GSM8K.is_file():
            raise ValueError(f"task=gsm8k needs data=FILE.jsonl (the default, {DEFAULT_GSM8K}, is not there)")
        for name in ("model", "prm", "base"):
            if getattr(self, name):
                try:
                    check_model_path(getattr(self, name), name)
                except FileNotFoundError as e:
                    raise ValueError(str(e)) from None
        if self.data and (self.model or not Path(self.data).is_dir()):  # a PRM's rows may be a datasets folder
            check_input_file(self.data, "data")
        if self.out:
            check_writable_folder(self.out, "out")


def parse_args(argv=None) -> Config:
    """The settings: key=value or --key value (the flags of earlier versions still read), checked
    before any ML library loads; --help lists them."""
    return load_config(Config, argv)


JSONL_FLAGS = {"prompt_field": "prompt", "response_field": "response", "answer_field": None, "step_separator": "\n",
               "prompt_template": "{prompt}\n"}


def load_splits(args, record: dict) -> dict:
    trained_lab = record.get("lab") or {}
    task = args.task or trained_lab.get("task") or "arith"
    if not args.task and not trained_lab.get("task"):
        log.warning("%s records no task (not a halluc checkpoint): evaluating on the embedded arith lab; "
                    "task=gsm8k data=FILE (or task=jsonl) evaluates on yours", args.model or args.prm)
    given = [f for f, default in JSONL_FLAGS.items() if getattr(args, f) != default]
    if given and task != "jsonl":
        raise SystemExit(f"{given[0]}= applies only to the jsonl task (this evaluates {task})")
    if trained_lab.get("task") and task != trained_lab["task"]:
        log.warning("the checkpoint was trained on %s; evaluating it on %s", trained_lab["task"], task)
    if task == "arith":
        if args.data:
            raise SystemExit(f"data={args.data} is read only by task=gsm8k or jsonl (this would evaluate arith)")
        lab = LabConfig(**{k: v for k, v in trained_lab.items() if k in {f.name for f in dataclasses.fields(LabConfig)}})
        seed = args.seed if args.seed is not None else record.get("seed", 0)
        if trained_lab:
            log.info("arith settings from the checkpoint: %s, seed %d", trained_lab, seed)
        splits = lab_splits(dataclasses.replace(lab, task="arith", train_file=None, test_file=None), seed)
        return {name: splits[name][:args.limit] for name in ("test_id", "test_ood")}
    own = not args.data and trained_lab.get("task") == task  # the checkpoint's own test file, as in training
    data = args.data or (trained_lab.get("test_file") if own else None)
    limit = args.limit or (trained_lab.get("test_size") if own else None)
    if task == "jsonl":
        if not data:
            raise SystemExit("task=jsonl needs data=FILE.jsonl")
        path = Path(data)
        # the flags given, else the checkpoint's own field names (a jsonl checkpoint), else the defaults
        trained = {k: trained_lab[k] for k in JSONL_FLAGS if trained_lab.get("task") == "jsonl" and k in trained_lab}
        if trained_lab.get("task") == "jsonl" and "prompt_template" not in trained_lab:
            trained["prompt_template"] = "{prompt}"  # checkpoints from before the setting: prompt and response joined
        fields = {k: getattr(args, k) if getattr(args, k) != d else trained.get(k, d) for k, d in JSONL_FLAGS.items()}
        return {path.stem: jsonl.read_jsonl(path, **fields, limit=limit)}
    path = Path(data) if data else DEFAULT_GSM8K
    if not data and not path.is_file():
        raise SystemExit(f"task=gsm8k needs data=FILE.jsonl (the default, {path}, is not there)")
    return {path.stem: gsm8k.read_jsonl(path, limit)}


def score_verifier(args) -> dict:
    """ProcessBench-style scores of a PRM or a verifier head on stepwise rows (halluc.inference.verifiers)."""
    from halluc.core.model import load_causal_lm
    from halluc.objectives.prm import load_prm, read_stepwise
    from halluc.core.tokens import load_tokenizer
    from halluc.objectives.verifier_head import has_head, load_head
    from halluc.inference.verifiers import make_verifier, process_bench

    t0 = time.perf_counter()
    rows = read_stepwise(args.data)[:args.limit]
    tokenizer = load_tokenizer(args.prm)
    if has_head(args.prm):
        kind, policy, prm = "head", load_causal_lm(args.prm), None
        load_head(args.prm, policy)
    else:
        try:
            kind, policy, prm = "prm", None, load_prm(args.prm)
        except ValueError as e:
            raise SystemExit(f"prm={args.prm}: {e}") from None
    verifier = make_verifier(kind, policy=policy, tokenizer=tokenizer, prm=prm, prm_tokenizer=tokenizer)
    scores = process_bench(verifier, rows, tokenizer, args.threshold)
    out = Path(args.out or args.prm)
    out.mkdir(parents=True, exist_ok=True)
    report = {"verifier": str(args.prm), "kind": kind, "data": str(args.data), "threshold": args.threshold,
              "process_bench": scores, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "process_bench.json").write_text(json.dumps(report, indent=2))
    table = ["| rows | n erroneous | n correct | threshold | acc erroneous | acc correct | F1 | step AUC (to the first error) |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    for name, m in scores.items():
        auc = "n/a" if m["step_auc"] is None else f"{m['step_auc']:.3f}"
        table.append(f"| {name} | {m['erroneous']} | {m['correct']} | {m['threshold']:.3f} | {pct(m['acc_erroneous'])} | "
                     f"{pct(m['acc_correct'])} | {pct(m['f1'])} | {auc} |")
    print(f"\n# {kind} {args.prm} on {args.data}\n\n" + "\n".join(table) + f"\n\nscores: {out / 'process_bench.json'}")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.prm:
        return score_verifier(args)
    # The ML libraries load here, after the arguments were checked.
    from halluc.training.checkpoint import load_trained, training_record
    from halluc.inference.evaluate import TABLE_NOTE, evaluate_problems, markdown_table
    from halluc.inference.generate import Sampling

    t0 = time.perf_counter()
    model, tokenizer = load_trained(args.model, base=args.base)
    model.eval()
    record = training_record(model)
    splits = load_splits(args, record)
    task_name = args.task or (record.get("lab") or {}).get("task") or "arith"
    task = get_task(task_name)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed or 0)
    guards = LoopGuards(args.max_backtracks, args.max_backtracks_per_position, args.ban_erased)
    results = {name: evaluate_problems(model, tokenizer, problems, task, args.max_new_tokens, args.batch_size,
                                       desc=f"eval {name}", semantics=args.semantics, sampling=sampling,
                                       guards=guards, bt_banned=args.bt_banned)
               for name, problems in splits.items()}
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "task": task_name, "args": as_dict(args),
              "halluc": getattr(model.config, "halluc", None), "results": results,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(results) + "\n\n" + TABLE_NOTE
    (out / "eval.md").write_text(f"# {args.model} ({task_name})\n\n{table}\n")
    print("\n" + table + f"\n\neval: {out / 'eval.json'}   {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    run_cli(main)
