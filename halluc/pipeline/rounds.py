"""The rounds of technique 5 (recipes/self_correct.py): each round's examples from the model's own
errors (sampled and judged, or MCTS traces: technique 8), the round's training mix, and what each
round logs to TensorBoard. They read the recipe's settings by name (sampler, mcts, mcts_data, mix,
round_examples, errors, error_source, align, seed, masked, max_len, overlong, num_proc, uses_own_errors()).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

from halluc.core.config import as_dict
from halluc.sources.errors import ErrorConfig

log = logging.getLogger(__name__)


def own_examples(cfg, r: int, folder: Path, model, tokenizer, task, problems, bt_id):
    """The round's examples from the model's own errors: made here, or read back after a kill."""
    import json

    from datasets import load_from_disk

    from halluc.inference.generate import Sampling
    from halluc.sources.own_errors import make_round, save_round

    if not cfg.uses_own_errors():
        return [], {}
    if (folder / "stats.json").exists():
        log.info("round %d: reading its data back from %s", r, folder)
        stats = json.loads((folder / "stats.json").read_text())
        # datasets cannot load back an empty saved dataset
        return (list(load_from_disk(str(folder / "sft"))) if stats["kept"] else []), stats
    pick = random.Random(cfg.seed * 1_000 + r).sample(range(len(problems)), min(cfg.sampler.problems, len(problems)))
    chosen = [problems[i] for i in pick]
    s = cfg.sampler
    model.eval()
    import torch

    model.to("cuda" if torch.cuda.is_available() else "cpu")  # where training left it, also after a resume
    if cfg.error_source == "mcts":  # technique 8: traces of a search valued by the task's step verifier
        return mcts_examples(cfg, r, folder, model, tokenizer, task, chosen, pick, bt_id)
    if cfg.error_source == "aligned":  # located by alignment to the reference: no step verifier
        return aligned_examples(cfg, r, folder, model, tokenizer, task, chosen, pick, bt_id)
    rows, pairs, stats = make_round(model, tokenizer, task, chosen, k=s.k,
                                    sampling=Sampling(s.temperature, s.top_p, cfg.seed * 1_000 + r),
                                    max_new_tokens=s.max_new_tokens, correction_tries=s.correction_tries,
                                    per_problem=s.per_problem, bt_id=bt_id, masked=cfg.masked, max_len=cfg.max_len)
    for row in rows + pairs:  # problem index -> index in the SFT split
        row["problem"] = pick[row["problem"]]
    save_round(folder, rows, pairs, stats)
    log.info("round %d data: %s", r, json.dumps(stats.as_dict()))
    return rows, stats.as_dict()


def mcts_examples(cfg, r: int, folder: Path, model, tokenizer, task, chosen, pick, bt_id):
    """The round's "own" examples as MCTS traces (halluc/sources/mcts.py) of the current model on the same
    problems the sampler would take, valued by the task's step verifier (the judge technique 5 uses)."""
    import json

    from dataclasses import replace

    from halluc.sources.mcts import search, trace_rows, tree_stats
    from halluc.sources.own_errors import save_round
    from halluc.inference.verifiers import OracleVerifier

    settings = replace(cfg.mcts, seed=cfg.mcts.seed + cfg.seed * 1_000 + r)
    trees = search(model, tokenizer, task, chosen, settings, OracleVerifier(task, chosen, tokenizer))
    rows, dropped = trace_rows(trees, bt_id, tokenizer.eos_token_id, cfg.mcts_data, cfg.max_len, cfg.masked)
    for row in rows:  # problem index -> index in the SFT split
        row["problem"] = pick[row["problem"]]
    stats = {**tree_stats(trees), "kept": len(rows), "dropped_too_long": dropped}
    save_round(folder, rows, [], stats)
    log.info("round %d MCTS data: %s", r, json.dumps(stats))
    return rows, stats


def aligned_examples(cfg, r: int, folder: Path, model, tokenizer, task, chosen, pick, bt_id):
    """The round's "own" examples from the model's samples aligned to the references
    (halluc/sources/aligned_errors.py): the sampler's problems, k, temperature and per_problem."""
    import json

    from halluc.inference.generate import Sampling
    from halluc.sources.aligned_errors import make_aligned_round
    from halluc.sources.own_errors import save_round

    s = cfg.sampler
    rows, stats = make_aligned_round(model, tokenizer, task, chosen, k=s.k,
                                     sampling=Sampling(s.temperature, s.top_p, cfg.seed * 1_000 + r),
                                     max_new_tokens=s.max_new_tokens, per_problem=s.per_problem, bt_id=bt_id,
                                     masked=cfg.masked, max_len=cfg.max_len, min_match=cfg.align.min_match,
                                     only_wrong=cfg.align.only_wrong)
    for row in rows:  # problem index -> index in the SFT split
        row["problem"] = pick[row["problem"]]
    save_round(folder, rows, [], stats.as_dict())
    log.info("round %d aligned data: %s", r, json.dumps(stats.as_dict()))
    return rows, stats.as_dict()


def round_mix(cfg, r: int, own: list, problems, tokenizer, bt_id):
    """The round's training set: `mix` fractions of `round_examples`. Own examples are not
    repeated: with fewer than their share, every part shrinks in proportion (the set is smaller,
    the shares stay what `mix` says, and the log says so). Clean and synthetic examples come from
    other problems than the own ones."""
    from datasets import concatenate_datasets

    from halluc.sources.data import build_sft_dataset

    rng = random.Random(cfg.seed * 1_000 + r + 500)
    own = list(own)
    rng.shuffle(own)
    n = cfg.round_examples
    if cfg.mix.own and not own:
        log.warning("round %d: no example from the model's own errors: it trains on the rest of the mix", r)
    elif cfg.mix.own and len(own) < round(cfg.mix.own * n):
        log.warning("round %d: %d examples from the model's own errors, fewer than mix.own asks (%d): every "
                    "part of the mix shrinks in proportion", r, len(own), round(cfg.mix.own * n))
        n = int(len(own) / cfg.mix.own)
    want = {"own": round(cfg.mix.own * n), "synthetic": round(cfg.mix.synthetic * n), "clean": round(cfg.mix.clean * n)}
    taken = {x["problem"] for x in own[:want["own"]]}
    own = [{k: x[k] for k in ("input_ids", "roles", "labels")} for x in own[:want["own"]]]
    parts, counts = [], {"own": len(own)}
    order = [i for i in rng.sample(range(len(problems)), len(problems)) if i not in taken]
    start = 0
    for name, errors in (("synthetic", ErrorConfig(**{**as_dict(cfg.errors), "example_rate": 1.0})),
                         ("clean", ErrorConfig(source="none"))):
        if want[name]:
            chosen = [problems[i] for i in order[start:start + want[name]]]
            start += want[name]
            built = build_sft_dataset(chosen, tokenizer, errors, bt_id, masked=cfg.masked, max_len=cfg.max_len,
                                      overlong=cfg.overlong, seed=cfg.seed * 1_000 + r, num_proc=cfg.num_proc)
            parts.append(built.select_columns(["input_ids", "roles", "labels"]))
            counts[name] = len(parts[-1])
    if own:
        from datasets import Dataset

        parts.append(Dataset.from_list(own).cast(parts[0].features) if parts else Dataset.from_list(own))
    data = concatenate_datasets(parts).shuffle(seed=cfg.seed * 1_000 + r) if len(parts) > 1 else parts[0]
    return data, counts


def log_round(tb_dir: Path, summary: dict) -> None:
    """Per round: what the sampler found and kept, the mix trained on, the evaluation."""
    from torch.utils.tensorboard import SummaryWriter

    stats, r = summary["stats"], summary["round"]
    with SummaryWriter(str(tb_dir)) as w:
        for key in ("samples", "right", "wrong", "located", "unlocated", "unaligned", "corrected_by_model",
                    "corrected_by_reference", "no_correction", "kept"):
            if key in stats:
                w.add_scalar(f"round/{key}", stats[key], r)
        mixes = summary["mix"] if isinstance(summary["mix"], list) else [summary["mix"]]  # a list per phase
        for i, mix in enumerate(mixes):
            for name, count in mix.items():
                w.add_scalar(f"round/mix_{name}" + (f"_phase{i + 1}" if len(mixes) > 1 else ""), float(count), r)
        for split, m in summary["eval"].items():
            for key in ("answer_acc", "bt_precision", "bt_recall"):
                if m.get(key) is not None:
                    w.add_scalar(f"round/{split}/{key}", m[key], r)
