"""Technique 8: MCTS with a backtrack action, and the training data it leaves.

    python recipes/mcts.py                                     # the lab: search 200 SFT problems with the policy
    python recipes/mcts.py search.nodes=96 search.rule=uct value=rollouts search.rollouts=2
    python recipes/mcts.py value=prm prm=runs/cache/prm-XXXX   # a trained PRM (recipes/prm.py) as the value
    python recipes/mcts.py model=DIR lab.task=gsm8k lab.train_file=../shared/data/gsm8k/train.jsonl \\
        lab.test_file=../shared/data/gsm8k/test.jsonl
    python recipes/mcts.py resume=true ...                     # after a kill: the trees already saved are kept
    python recipes/masked_sft.py data=runs/mcts/data/sft       # SFT on the traces (roles as in technique 1)
    python recipes/dpo.py data=runs/mcts/data/pairs ;  python recipes/prm.py data=runs/mcts/data/steps.jsonl

Steps (halluc/sources/mcts.py, docs/mcts.md): (1) the policy: model=DIR or the lab's masked SFT model
(trained once, cached); (2) its greedy solutions of the searched problems, to count what search
solves that greedy does not; (3) step-level MCTS, one tree per problem, batched across problems,
`chunk` problems at a time, each chunk's trees appended to trees.jsonl (what resume keeps); value
of an open step: the task's step verifier (`oracle`), a PRM, the policy's verifier head, or
rollouts; (4) the data: Stream-of-Search traces (data/sft, the format masked_sft reads with data=),
step preference pairs (data/pairs, the DPO format) and step values (data/steps.jsonl, TRL's
stepwise PRM format); (5) search.json: throughput, solved fractions by node budget, counts.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

from halluc.core.config import HEAD_WEIGHTS, PositiveInt, as_dict, check_run_rules, has_head, recipe_entry
from halluc.pipeline.run_config import RunConfig
from halluc.sources.mcts import SearchConfig, TraceData
from halluc.core.inputs import run_cli

log = logging.getLogger("mcts")


@dataclass
class Config(RunConfig):  # the shared settings (output, model, lab chain, layout, launcher): halluc.pipeline.run_config
    run_artefacts: ClassVar[tuple[str, ...]] = ("trees.jsonl", "search.json", "data")  # what claiming output_dir sees
    output_dir: str = "runs/mcts"         # trees.jsonl, data/, search.json, config.yaml
    model: str | None = None              # the policy; None = the lab's masked SFT model
    deepspeed: str | None = None          # only for training the lab's SFT model; the search runs on one process
    value: Literal["oracle", "prm", "head", "rollouts", "none"] = "oracle"  # what values an open step
    prm: str | None = None                # value=prm: a trained PRM folder (recipes/prm.py)
    problems: PositiveInt = 200           # SFT-split problems searched
    chunk: PositiveInt = 50               # problems searched together (and saved together)
    search: SearchConfig = field(default_factory=SearchConfig)
    data: TraceData = field(default_factory=TraceData)
    greedy_baseline: bool = True          # decode the searched problems greedily too (what search adds)
    max_len: PositiveInt = 256            # traces longer than this are dropped

    def check(self) -> None:
        check_run_rules(self, ("model", "prm"))
        if self.lora.enabled or self.save_steps or self.layout.pack:
            raise ValueError("recipes/mcts.py searches and writes traces; it trains no model of its own (the lab's "
                             "SFT model is trained unpacked, in full): drop lora.enabled, save_steps and layout.pack")
        if self.value == "prm" and not self.prm:
            raise ValueError("value=prm needs prm=DIR (a PRM trained by recipes/prm.py)")
        if self.value == "rollouts" and not self.search.rollouts:
            raise ValueError("value=rollouts needs search.rollouts > 0")
        if self.lab.task != "arith" and not self.lab.train_file:
            raise ValueError(f"lab.task={self.lab.task} needs lab.train_file (the problems to search)")
        if self.value == "head" and self.model and not has_head(self.model):
            raise ValueError(f"value=head: model={self.model} has no verifier head ({HEAD_WEIGHTS})")
        if self.value == "head" and not self.model:
            raise ValueError("value=head needs model=DIR with a head (recipes/masked_sft.py verifier_head_weight=1)")


def train(cfg: Config) -> dict | None:
    import torch

    from halluc.core.distributed import is_main, local_device
    from halluc.inference.generate import generate_text
    from halluc.sources.mcts import load_trees, save_trees, search, terminal_reward
    from halluc.core.model import load_causal_lm
    from halluc.pipeline.sft import lab_sft_model
    from halluc.pipeline.stages import open_run
    from halluc.core.tokens import load_tokenizer

    out, task, splits, _, t0 = open_run(cfg)
    policy_dir = cfg.model or lab_sft_model(cfg)
    if not is_main():
        return None  # the search runs on one process
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir).eval().to(local_device())
    pool = splits["sft"]
    pick = random.Random(cfg.seed).sample(range(len(pool)), min(cfg.problems, len(pool)))
    problems = [pool[i] for i in pick]
    verifier = make_value(cfg, policy, tokenizer, task, problems)

    greedy = None
    if cfg.greedy_baseline:  # (answer right, every step right too): the latter is what search calls solved
        with torch.no_grad():
            gens = generate_text(policy, tokenizer, [p.prompt for p in problems],
                                 max_new_tokens=cfg.eval_max_new_tokens, desc="greedy")
        greedy = [terminal_reward(task, p, g.text) for g, p in zip(gens, problems)]
        greedy = ([reward > 0 for reward, _ in greedy], [full for _, full in greedy])

    path = out / "trees.jsonl"
    trees = load_trees(path) if cfg.resume and path.exists() else []  # without resume the claim emptied the folder
    if any(t.problem >= len(problems) or t.prompt != tokenizer(problems[t.problem].prompt)["input_ids"] for t in trees):
        raise SystemExit(f"resume=true: {path} holds trees of other problems than these settings draw: "
                         "overwrite=true starts again")
    if trees:
        log.info("resuming: %d of %d problems searched already (%s)", len(trees), len(problems), path)
    t_search = time.perf_counter()
    s = cfg.search
    for start in range(len(trees), len(problems), cfg.chunk):
        chunk = problems[start:start + cfg.chunk]
        # rollouts value open steps only with value=rollouts; each chunk samples with its own seed
        settings = replace(s, rollouts=s.rollouts if cfg.value == "rollouts" else 0, seed=s.seed + cfg.seed * 7_919 + start)
        grown = search(policy, tokenizer, task, chunk, settings, verifier)
        for t in grown:
            t.problem += start
        trees += grown
        save_trees(path, trees)
        log.info("searched %d / %d problems", len(trees), len(problems))
    search_s = time.perf_counter() - t_search

    counts = write_data(cfg, out / "data", trees, problems, tokenizer)
    report = {"config": as_dict(cfg), "policy": policy_dir, "data": counts,
              "search": search_stats(trees, cfg.search.nodes, greedy, search_s),
              "seconds": {"search": round(search_s, 1), "total": round(time.perf_counter() - t0, 1)}}
    (out / "search.json").write_text(json.dumps(report, indent=1))
    sr = report["search"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    greedy = "" if sr["greedy_solved"] is None else (
        f" (greedy solves {pct(sr['greedy_solved'])} the same way and answers {pct(sr['greedy_answer_right'])} right; "
        f"of greedy's {sr['greedy_failed']} wrong answers search solves {pct(sr['greedy_failed_solved'])})")
    print(f"\nsearched {len(trees)} problems: {sr['nodes_per_s']:.1f} nodes/s, solved {100 * sr['solved']:.1f}% "
          f"(every step and the answer right)"
          f"{greedy}, {counts['traces']} traces, {counts['pairs']} pairs, {counts['value_rows']} value rows "
          f"-> {out / 'data'}")
    return report


def make_value(cfg: Config, policy, tokenizer, task, problems):
    """The verifier that values an open step (halluc.inference.verifiers.make_verifier), or None (rollouts, none)."""
    from halluc.core.distributed import local_device
    from halluc.inference.verifiers import make_verifier

    prm = prm_tokenizer = None
    if cfg.value == "prm":
        from halluc.objectives.prm import load_prm
        from halluc.core.tokens import load_tokenizer

        prm, prm_tokenizer = load_prm(cfg.prm).eval().to(local_device()), load_tokenizer(cfg.prm)
    if cfg.value == "head":
        from halluc.objectives.verifier_head import load_head

        load_head(cfg.model, policy)
    # the head reads each text in a forward of its own: the generator's head scores are gone by valuing time
    return make_verifier(cfg.value if cfg.value in ("oracle", "prm", "head") else None, policy=policy,
                         tokenizer=tokenizer, task=task, problems=problems, prm=prm, prm_tokenizer=prm_tokenizer,
                         head_reads="text")


def search_stats(trees, budget: int, greedy: tuple[list[bool], list[bool]] | None, seconds: float) -> dict:
    """Throughput and what search solves: a problem is solved within b nodes when one of its first b
    nodes is a verified solution (the nodes are numbered in the order the search made them).
    `greedy`: per problem, (greedy's answer right, greedy's whole solution right): `greedy_solved` is
    the latter, search's own criterion; greedy's failures are the problems whose answer is wrong."""
    first = [min((i + 1 for i, n in enumerate(t.nodes) if n.verified), default=None) for t in trees]
    from halluc.sources.mcts import tree_stats

    made = tree_stats(trees)
    verified = made["verified_solutions"]
    budgets = sorted({b for b in (4, 8, 16, 32, 64, 128, 256, budget) if b <= budget})
    out = {**made, "nodes_per_s": made["nodes"] / max(seconds, 1e-9),
           "tokens_per_verified_solution": made["generated_tokens"] / verified if verified else None,
           "solved": made["solved"] / len(trees),
           "solved_within": {b: sum(f is not None and f <= b for f in first) / len(trees) for b in budgets},
           "greedy_solved": None, "greedy_answer_right": None, "greedy_failed_solved": None}
    if greedy is not None:
        greedy_right, greedy_full = greedy
        failed = [f for f, right in zip(first, greedy_right) if not right]
        out["greedy_solved"] = sum(greedy_full) / len(trees)
        out["greedy_answer_right"] = sum(greedy_right) / len(trees)
        out["greedy_failed"] = len(failed)
        out["greedy_failed_solved"] = sum(f is not None for f in failed) / len(failed) if failed else None
        out["greedy_failed_solved_within"] = {b: sum(f is not None and f <= b for f in failed) / len(failed)
                                              for b in budgets} if failed else None
    return out


def write_data(cfg: Config, folder: Path, trees, problems, tokenizer) -> dict:
    """data/sft (traces), data/pairs (step pairs), data/steps.jsonl (step values), data/stats.json."""
    from halluc.sources.mcts import step_pairs, step_values, trace_rows
    from halluc.sources.own_errors import save_round
    from halluc.objectives.prm import write_stepwise
    from halluc.core.tokens import backtrack_id

    d, eos = cfg.data, tokenizer.eos_token_id
    rows, dropped = trace_rows(trees, backtrack_id(tokenizer), eos, d, cfg.max_len)
    pairs = [p for t in trees for p in step_pairs(t, eos, d.pair_margin)]
    values = [r for t in trees for r in step_values(t, problems[t.problem], tokenizer)]
    counts = {"traces": len(rows), "traces_dropped_too_long": dropped, "pairs": len(pairs), "value_rows": len(values),
              "problems_with_a_trace": len({r["problem"] for r in rows})}
    for what, n in (("traces", len(rows)), ("step pairs", len(pairs))):
        if not n:  # an empty dataset is written all the same; masked_sft data= / dpo data= would refuse it
            log.warning("no %s from %d trees: raise search.nodes, or the data.* settings that select them", what,
                        len(trees))
    save_round(folder, rows, pairs, counts)
    write_stepwise(folder / "steps.jsonl", values)
    return counts


load, main = recipe_entry(Config, train, __file__)  # configs/mcts.yaml, --config FILE, key=value

if __name__ == "__main__":
    run_cli(main)
