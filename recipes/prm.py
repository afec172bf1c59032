"""Techniques 7 and 10: a process reward model (or the policy's verifier head) that decides when to backtrack.

    python recipes/prm.py                                   # the lab: step labels, a PRM, PRM-guided decoding
    python recipes/prm.py verifier=head                     # the policy's own head (masked SFT + head, cached)
    python recipes/prm.py decode=best_of_n n=4              # the baselines: best-of-N, weighted voting (vote)
    python recipes/prm.py verifier=oracle                   # the task's verifier guides: the skyline
    python recipes/prm.py model=DIR data=train.jsonl test_data=test.jsonl lab.task=gsm8k lab.test_file=...
    torchrun --nproc_per_node 2 recipes/prm.py deepspeed=ds_configs/zero3.json ;  sbatch slurm/prm.sh
(docs/verifiers.md: labels, the two verifiers, guided decoding, scores.)

Steps: (1) the policy: model=DIR, or the lab's masked SFT model (with a verifier head when
verifier=head), trained once and cached; its plain greedy evaluation is `before`; (2) step labels
(halluc.step_labels): data=FILE.jsonl|DIR in TRL's stepwise format, or made here from the lab:
references, references with one synthetic wrong step, and the policy's own samples, labelled by the
task verifier (labels=rollouts: by Math-Shepherd rollouts instead), with a held-out set from the test
problems (cached); (3) the PRM (verifier=prm): prm=DIR, or a token-classification model started
from prm_base (default: the policy) and trained with the shared trainer, saved as a plain HF folder
(cached); (4) ProcessBench scores of the verifier on the held-out rows; (5) the policy decodes the
test problems: greedy, guided by the verifier, best-of-N or weighted voting; eval.json, eval.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from halluc.config import (Fraction, HEAD_WEIGHTS, LoraSettings, NonNegativeFloat, NonNegativeInt, PositiveInt,
                           Stage, as_dict, check_run_rules, has_head, recipe_entry)
from halluc.distributed import zero_stage
from halluc.errors import ErrorConfig
from halluc.lab import LabConfig, ModelConfig

log = logging.getLogger("prm")


@dataclass
class StepData:
    """The labelled solutions made from the lab when no data= is given."""

    problems: PositiveInt = 2000          # SFT-split problems: reference + wrong-step copies + own samples
    wrong_steps: NonNegativeInt = 2       # reference copies with one synthetic wrong step, per problem
    samples: NonNegativeInt = 2           # the policy's own solutions per problem
    temperature: NonNegativeFloat = 0.8   # ... sampled at this temperature
    labels: Literal["verifier", "rollouts"] = "verifier"  # rollouts: Math-Shepherd hard labels
    rollouts: PositiveInt = 4             # continuations per step prefix (labels=rollouts, agreement)
    agreement: NonNegativeInt = 100       # solutions whose verifier and rollout labels are compared
    test_problems: PositiveInt = 500      # held-out problems (test_id) for the ProcessBench scores


@dataclass
class Config:
    output_dir: str = "runs/prm"          # prm/ (the PRM), data/, eval.json, eval.md, config.yaml
    cache_dir: str = "runs/cache"         # lab models, labelled data, trained PRMs
    model: str | None = None              # the policy; None = the lab's masked SFT model
    verifier: Literal["prm", "head", "oracle", "none"] = "prm"  # what judges steps; head: the policy's own
    decode: Literal["greedy", "guided", "best_of_n", "vote"] = "guided"
    prm: str | None = None                # a trained PRM folder (skips training)
    prm_base: str | None = None           # the checkpoint a new PRM starts from; None = the policy
    data: str | None = None               # stepwise training rows (.jsonl or datasets folder); None = made here
    test_data: str | None = None          # held-out stepwise rows (ProcessBench scores); None = made here
    seed: int = 0
    steps: NonNegativeInt = 400           # PRM training steps
    batch_size: PositiveInt = 32          # labelled solutions per process and step
    lr: NonNegativeFloat = 1e-3
    head_weight: NonNegativeFloat = 1.0   # verifier=head with the lab model: the head's loss weight in SFT
    threshold: Fraction = 0.5             # guided: a step scored below this is erased and rewritten
    budget: NonNegativeInt = 4            # guided: verifier-triggered BT runs per solution
    resample: Literal["ban", "sample"] = "ban"   # guided: how the erased step is rewritten
    resample_temperature: NonNegativeFloat = 1.0  # guided, resample=sample
    # guided: rewind (the erased step leaves the KV cache; the policy rewrites it from the clean prefix)
    # or keep (the policy sees its erased step and the BTs, as in causal SFT data); the policy's own
    # BTs keep the semantics it was trained for
    erase: Literal["rewind", "keep"] = "rewind"
    n: PositiveInt = 4                    # best_of_n / vote: samples per problem
    temperature: NonNegativeFloat = 0.8   # best_of_n / vote: their temperature
    step_data: StepData = field(default_factory=StepData)
    lab: LabConfig = field(default_factory=LabConfig)
    tiny: ModelConfig = field(default_factory=ModelConfig)
    base: Stage = field(default_factory=lambda: Stage(steps=900, batch_size=32, lr=3e-3))
    sft: Stage = field(default_factory=lambda: Stage(steps=600, batch_size=32, lr=1e-3))
    errors: ErrorConfig = field(default_factory=ErrorConfig)
    attention: Literal["causal", "block_errors"] = "causal"
    positions: Literal["original", "rewound"] = "original"
    backend: Literal["auto", "dense", "dense_units", "flex", "varlen", "varlen_kv"] = "auto"
    max_len: PositiveInt = 256            # labelled solutions longer than this are dropped
    num_proc: PositiveInt | None = None
    deepspeed: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)  # the PRM: adapters + its new head, merged at the end
    save_steps: NonNegativeInt = 0
    save_total_limit: PositiveInt = 2
    resume: bool = False
    overwrite: bool = False
    eval_max_new_tokens: PositiveInt = 192

    def check(self) -> None:
        check_run_rules(self, ("model", "prm", "prm_base"))
        if self.verifier == "none" and self.decode != "greedy":
            raise ValueError(f"decode={self.decode} needs a verifier (prm, head or oracle)")
        if self.lab.task != "arith" and not self.lab.train_file and not self.model:
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (or model=DIR)")
        if self.lab.task != "arith" and not self.lab.test_file:
            raise ValueError(f"lab.task={self.lab.task} needs lab.test_file: the problems decoded and scored")
        if self.lora.enabled and zero_stage(self.deepspeed) == 3:
            raise ValueError("the PRM merges its LoRA adapter at the end: use ZeRO-2 or no DeepSpeed with lora.enabled")
        if self.verifier == "head" and self.model and not has_head(self.model):
            raise ValueError(f"verifier=head: model={self.model} has no verifier head ({HEAD_WEIGHTS}); train one "
                             "with recipes/masked_sft.py verifier_head_weight=0.5, or drop model= to use the lab's")
        if self.verifier == "head" and not self.model and not self.head_weight:
            raise ValueError("verifier=head with the lab model needs head_weight > 0 (the head's loss weight in SFT)")
        if self.decode == "guided" and self.resample == "sample" and not self.resample_temperature:
            raise ValueError("resample=sample needs resample_temperature > 0 (0 is greedy: use resample=ban)")
        for name in ("data", "test_data"):
            if getattr(self, name) and not Path(getattr(self, name)).exists():
                raise ValueError(f"{name}={getattr(self, name)}: no such file or folder")


def train(cfg: Config) -> dict | None:
    from halluc.distributed import is_main, local_device, world_size
    from halluc.evaluate import evaluate_best_of_n, evaluate_problems
    from halluc.generate import Guide, Sampling
    from halluc.model import load_causal_lm
    from halluc.sft import lab_sft_model
    from halluc.stages import evaluate_on_main, finish_run, open_run
    from halluc.tokens import load_tokenizer
    from halluc.verifier_head import load_head
    from halluc.verifiers import HeadVerifier, OracleVerifier, PRMVerifier, process_bench, solution_scores

    out, task, splits, tests, t0 = open_run(cfg)

    # (1) the policy, and the plain greedy decoding every arm is compared with
    if cfg.model:
        policy_dir, before = cfg.model, None
        labeller_dir = policy_dir
    else:
        policy_dir, before = lab_sft_model(cfg)  # the plain masked SFT model: the shared baseline
        labeller_dir = policy_dir  # its samples are the labelled data of every arm (one PRM, one held-out set)
        if cfg.verifier == "head":
            policy_dir, _ = lab_sft_model(cfg, {"verifier_head_weight": cfg.head_weight})
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir)
    if cfg.verifier == "head":
        load_head(policy_dir, policy)
    if before is None:
        before = evaluate_on_main(policy, tokenizer, tests, task, cfg.eval_max_new_tokens, "policy")

    # (2) step labels, (3) the PRM: made on rank 0 (the PRM trains on every rank)
    train_rows, test_rows, data_stats = [], [], {}
    if cfg.verifier in ("prm", "head"):
        labeller = policy if labeller_dir == policy_dir else load_causal_lm(labeller_dir)
        train_rows, test_rows, data_stats = step_rows(cfg, labeller, tokenizer, task, splits)
    prm_dir, prm_train = cfg.prm, None
    if cfg.prm:
        check_same_vocab("prm", cfg.prm, tokenizer)
    if cfg.verifier == "prm" and not cfg.prm:
        prm_dir, prm_train = train_prm(cfg, policy, policy_dir, tokenizer, train_rows)
    if not is_main():
        return None

    # (4) ProcessBench scores of the verifier on the held-out rows
    from halluc.prm import load_prm

    policy.to(local_device())
    prm = load_prm(prm_dir).eval().to(local_device()) if prm_dir else None
    kind, scorer = {"prm": ("prm", prm), "head": ("head", policy)}.get(cfg.verifier, (None, None))
    bench = process_bench(kind, scorer, test_rows, tokenizer, cfg.threshold) if kind else None
    if bench:
        log.info("ProcessBench-style scores of the %s on %d held-out solutions: %s", cfg.verifier, len(test_rows),
                 json.dumps(bench["all"]))

    # (5) decode the test problems
    t1 = time.perf_counter()
    guide = Guide(cfg.threshold, cfg.budget, cfg.resample, cfg.resample_temperature, cfg.erase)
    after = {}
    for name, problems in tests.items():
        desc = f"eval {cfg.decode} {cfg.verifier} {name}"
        if cfg.decode in ("best_of_n", "vote"):
            def score_steps(prompt_ids, step_ids):
                if kind:
                    return solution_scores(kind, scorer, prompt_ids, step_ids, pad_id=tokenizer.pad_token_id or 0)
                oracle = OracleVerifier(task, problems, tokenizer)
                return [[oracle([(p, [t for s in steps[:i + 1] for t in s])])[0] for i in range(len(steps))]
                        for p, steps in zip(prompt_ids, step_ids)]
            after[name] = evaluate_best_of_n(policy, tokenizer, problems, task, score_steps, cfg.n,
                                             "best" if cfg.decode == "best_of_n" else "vote",
                                             Sampling(cfg.temperature, 1.0, cfg.seed), cfg.eval_max_new_tokens,
                                             desc=desc)
        else:
            verifier = None
            if cfg.decode == "guided":
                verifier = {"prm": lambda: PRMVerifier(prm, load_tokenizer(prm_dir), tokenizer),
                            "head": lambda: HeadVerifier(policy),
                            "oracle": lambda: OracleVerifier(task, problems, tokenizer)}[cfg.verifier]()
            after[name] = evaluate_problems(policy, tokenizer, problems, task, cfg.eval_max_new_tokens, desc=desc,
                                            verifier=verifier, guide=guide)
    t_decode = time.perf_counter() - t1

    report = {"config": as_dict(cfg), "policy": str(policy_dir), "prm": prm_dir, "step_data": data_stats,
              "process_bench": bench, "prm_train": prm_train, "before": before or {}, "after": after,
              "world_size": world_size(),
              "seconds": {"decode": round(t_decode, 1), "total": round(time.perf_counter() - t0, 1)}}
    label = f"{cfg.decode} ({cfg.verifier})" if cfg.verifier != "none" else "greedy"
    finish_run(out, cfg, report, cfg.steps, label)
    print(f"\n{'PRM: ' + str(prm_dir) if prm_dir else ''}   eval: {out / 'eval.json'}   "
          f"total {report['seconds']['total']:.0f} s")
    return report


def step_rows(cfg: Config, policy, tokenizer, task, splits) -> tuple[list, list, dict]:
    """(train rows, held-out rows, their statistics): data= / test_data=, or labelled here from the
    lab and cached under cache_dir by (policy weights, settings, problems)."""
    from halluc.artifacts import artifact_path, build_once
    from halluc.distributed import local_device
    from halluc.generate import Sampling
    from halluc.lora import fingerprint
    from halluc.prm import read_stepwise, write_stepwise
    from halluc.step_labels import agreement, labelled_solutions, rollout_labels

    s = cfg.step_data
    if cfg.data and (cfg.test_data or cfg.verifier == "oracle"):
        return read_stepwise(cfg.data), read_stepwise(cfg.test_data) if cfg.test_data else [], {"data": cfg.data}
    key = json.dumps([fingerprint(policy), as_dict(s), cfg.seed, as_dict(cfg.lab), cfg.eval_max_new_tokens])
    folder = artifact_path(cfg.cache_dir, "steps", key)
    with build_once(folder, "stats.json", ranks="main", what="the labelled solutions") as build:
        if build:
            sampling = Sampling(s.temperature, 1.0, cfg.seed)
            policy.eval().to(local_device())
            stats = {}
            made = {}
            for name, problems in (("train", splits["sft"][:s.problems]), ("test", splits["test_id"][:s.test_problems])):
                rows, stats[name] = labelled_solutions(policy, tokenizer, task, problems, wrong_steps=s.wrong_steps,
                                                       samples=s.samples, sampling=sampling,
                                                       max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed + len(name))
                made[name] = rows
            by_prompt = {p.prompt: p for p in splits["sft"][:s.problems]}
            own = [r for r in made["train"] if r["source"] == "sample"]
            check = own[:s.agreement] if s.labels == "verifier" else made["train"]
            if check:  # Math-Shepherd labels where asked, and their agreement with the verifier's
                items = [(by_prompt[r["prompt"]], r["completions"]) for r in check]
                rolled = rollout_labels(policy, tokenizer, task, items, s.rollouts, sampling, cfg.eval_max_new_tokens)
                stats["agreement"] = agreement([r["labels"] for r in check], [x.hard for x in rolled])
                if s.labels == "rollouts":
                    for r, x in zip(check, rolled):
                        r["verifier_labels"], r["labels"], r["soft_labels"] = r["labels"], x.hard, x.soft
            write_stepwise(folder / "train.jsonl", made["train"])
            write_stepwise(folder / "test.jsonl", made["test"])
            (folder / "stats.json").write_text(json.dumps(stats, indent=1))
            log.info("labelled solutions in %s: %s", folder, json.dumps(stats))
    stats = json.loads((folder / "stats.json").read_text())
    train_rows = read_stepwise(cfg.data) if cfg.data else read_stepwise(folder / "train.jsonl")
    test_rows = read_stepwise(cfg.test_data) if cfg.test_data else read_stepwise(folder / "test.jsonl")
    return train_rows, test_rows, {**stats, "folder": str(folder)}


def check_same_vocab(name: str, folder: str, tokenizer) -> None:
    """The PRM scores the policy's token ids as they are: its tokenizer must be the policy's."""
    from halluc.tokens import load_tokenizer

    if load_tokenizer(folder).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{name}={folder} has another tokenizer than the policy: the PRM reads the policy's "
                         "token ids (use a PRM started from a checkpoint with the policy's tokenizer)")


def train_prm(cfg: Config, policy, policy_dir: str, tokenizer, rows: list[dict]) -> tuple[str, dict]:
    """(folder, training log) of a PRM trained on `rows`, cached under cache_dir by its data and settings."""
    from halluc.checkpoint import record_training, save_full
    from halluc.distributed import barrier, is_main
    from halluc.prm import StepClassification, StepCollator, load_prm, prm_example
    from halluc.distributed import world_size
    from halluc.lora import fingerprint
    from halluc.artifacts import artifact_path, build_once
    from halluc.stages import RunSettings, train_history, train_stage

    base = cfg.prm_base or policy_dir
    if cfg.prm_base:
        check_same_vocab("prm_base", cfg.prm_base, tokenizer)
    examples = [prm_example(r, tokenizer) for r in rows]
    kept = [e for e in examples if len(e["input_ids"]) <= cfg.max_len]
    if len(kept) < len(examples):
        log.warning("%d of %d labelled solutions are longer than max_len=%d and were dropped",
                    len(examples) - len(kept), len(examples), cfg.max_len)
    if not kept:
        raise SystemExit("no labelled solution left to train the PRM on")
    data_key = hashlib.sha1(json.dumps([[e["input_ids"], e["labels"]] for e in kept]).encode()).hexdigest()
    # the base by its weights (a retrained policy in the same folder is another base); batch sizes are per process
    base_key = fingerprint(policy) if base == policy_dir else [str(base), _weights_stamp(base)]
    settings = [data_key, base_key, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, as_dict(cfg.lora), cfg.deepspeed,
                world_size()]
    folder = artifact_path(cfg.cache_dir, "prm", json.dumps(settings))
    # the PRM runs its own plain causal forward (StepClassification): the native backend, rows unpacked
    run = RunSettings(seed=cfg.seed, backend="native", pack=0, deepspeed=cfg.deepspeed, save_steps=cfg.save_steps,
                      save_total_limit=cfg.save_total_limit, resume=cfg.resume)
    with build_once(folder, "train.json", what="the trained PRM") as build:  # train.json: written last
        if build:
            model = load_prm(base, new_head=True)
            record_training(model, recipe="prm", labels=cfg.step_data.labels, seed=cfg.seed)
            if cfg.lora.enabled:
                from halluc.lora import apply_lora

                model = apply_lora(model, dataclasses.replace(cfg.lora, train_bt_rows=False), None,
                                   task_type="TOKEN_CLS")
            trainer = train_stage(model, kept, Stage(cfg.steps, cfg.batch_size, cfg.lr), str(folder) + ".run", run,
                                  objective=StepClassification(), tokenizer=tokenizer,
                                  collator=StepCollator(tokenizer.pad_token_id or 0))
            if cfg.lora.enabled:  # a plain HF folder: the adapter merged into the PRM
                merged = trainer.model.merge_and_unload()
                if is_main():
                    merged.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                barrier()
            else:
                save_full(trainer, tokenizer, folder)
            if is_main():
                (folder / "train.json").write_text(json.dumps(train_history(trainer)))
                (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    barrier()
    return str(folder), json.loads((folder / "train.json").read_text())


def _weights_stamp(folder: str) -> list:
    """(name, size, mtime) of a checkpoint's weight files: a cheap identity of weights not loaded here."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]


load, main = recipe_entry(Config, train, __file__)  # configs/prm.yaml, --config FILE, key=value

if __name__ == "__main__":
    main()
