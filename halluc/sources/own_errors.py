"""Technique 5: the model's own mistakes as training data.

One round (recipes/self_correct.py runs several):
1. `sample`: K solutions per problem from the current model (batched, temperature / top-p / seed),
   with the semantics it was trained for.
2. `locate`: the step judge (halluc.inference.judge) finds each finished sample's first wrong step; the sample's
   visible tokens are cut there: `prefix` (every step before it is right), `wrong` (the wrong
   step's tokens), `after` (what the model wrote next). Where the verifier cannot place the
   error (GSM8K: every annotation consistent but the final answer wrong) the sample is skipped
   and counted, as are samples whose step boundary falls inside a token.
3. `corrections`: a right way on from the same prefix, preferably the model's own (Step-DPO):
   continuations are resampled from prompt + prefix and the first whose whole text verifies
   (every step right, right answer) is kept: its first step is the correction, the rest finishes
   the solution. Else the reference: the task's next reference step and the rest of the
   reference solution (`reference_continuation`).
4. `build`: an SFT example and a preference pair from those token ids, never decoded and
   re-encoded. The wrong and the right step share a token prefix; only the divergent tail of
   the wrong step is the error:
       example  PROMPT prompt | KEPT prefix + shared | ERROR wrong tail | BACKTRACK x len | CORRECTION right tail | KEPT rest, EOS
       pair     prompt = prompt + prefix + wrong step (roles as above)
                chosen = BTs + right tail + rest + EOS;  rejected = the model's own `after` (+ EOS)
   Every example satisfies apply_backtrack(response) == prefix + correction + rest + EOS.

Data layout on disk (`save_round`): `sft/` is a `datasets` folder with `input_ids`, `labels`,
`roles` (the format tools/prepare_data.py writes and recipes read with data=DIR); `pairs/` has
`prompt_ids`, `prompt_roles`, `chosen_ids`, `chosen_roles`, `rejected_ids`, `rejected_roles`
and `form` (bt: the pair above; step and balanced: halluc/sources/pair_forms.py) (token ids + roles;
a bt pair's prompt ends with the error, which the chosen branch's BTs erase, so a
layout that blocks errors must move the error tail into both branches: `layout_two_branch` keeps
a PROMPT prefix unpoppable); both
with `problem` (index) and `kind` (the error kind) columns. `stats.json` counts every step.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from halluc.core.example import Example, Role, apply_backtrack, common_prefix_len
from halluc.inference.generate import Generation, LoopGuards, Sampling, batch_sampling, generate, semantics_for
from halluc.inference.judge import _canonical_steps, first_error
from halluc.sources.pair_forms import balanced_pairs, step_pair
from halluc.tasks import Problem

log = logging.getLogger(__name__)


@dataclass
class OwnError:
    """A sample's first wrong step, as the model's own token ids."""

    problem: int            # index into the round's problems
    prompt: list[int]
    prefix: list[int]       # visible tokens before the wrong step (its steps all verify)
    wrong: list[int]        # the wrong step, to its end
    after: list[int]        # what the model wrote after the wrong step
    ended: bool             # the sample stopped at EOS
    kind: str               # the verifier's error kind


@dataclass
class RoundStats:
    problems: int = 0
    samples: int = 0
    right: int = 0                  # every step right and the right answer
    wrong: int = 0
    located: int = 0
    unlocated: int = 0              # wrong, but the verifier cannot say where (GSM8K answers)
    unaligned: int = 0              # the step boundary falls inside a token
    corrected_by_model: int = 0     # the correction is the model's own resample
    corrected_by_reference: int = 0
    no_correction: int = 0
    unfinished: int = 0             # stopped by the length limit: the last step may be cut, not wrong
    not_built: int = 0              # the wrong step is a prefix of the correction: no error tokens
    too_long: int = 0               # longer than max_len, or an error run longer than the loop guard allows
    kept: int = 0                   # examples (and bt pairs) written
    balanced: int = 0               # balanced pairs (after a right step, go on): halluc/sources/pair_forms.py
    kinds: Counter = field(default_factory=Counter)       # located errors by kind
    kept_kinds: Counter = field(default_factory=Counter)  # kept examples by kind

    def as_dict(self) -> dict:
        return {**asdict(self), "kinds": dict(self.kinds), "kept_kinds": dict(self.kept_kinds)}


# --------------------------------------------------------------------------- token <-> text

def char_ends(tokenizer, ids: list[int]) -> list[int]:
    """len(decode(ids[:i + 1])) for every i: where each token's text ends."""
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
    if "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True):  # byte-level BPE: tokens decode alone
        ends, n = [], 0
        for p in pieces:
            n += len(p)
            ends.append(n)
        return ends
    return [len(tokenizer.decode(ids[:i + 1], skip_special_tokens=True)) for i in range(len(ids))]  # sentencepiece


def token_cut(ends: list[int], char: int) -> int | None:
    """The number of tokens whose text ends exactly at `char` (None: `char` falls inside a token)."""
    if char == 0:
        return 0
    for i, e in enumerate(ends):
        if e == char:
            return i + 1
        if e > char:
            return None
    return None


# --------------------------------------------------------------------------- 1 + 2: sample, locate

def sample(model, tokenizer, problems: list[Problem], k: int, sampling: Sampling, max_new_tokens: int,
           batch_size: int = 64, guards: LoopGuards = LoopGuards(), desc: str = "sampling") -> list[tuple[int, list[int], Generation]]:
    """[(problem index, prompt ids, generation)] for k samples of every problem (progress bar)."""
    jobs = [(i, tokenizer(p.prompt)["input_ids"]) for i, p in enumerate(problems) for _ in range(k)]
    gens = sample_from_ids(model, tokenizer, [ids for _, ids in jobs], sampling, max_new_tokens, batch_size,
                           guards, desc)
    return [(i, ids, g) for (i, ids), g in zip(jobs, gens)]


def sample_from_ids(model, tokenizer, prompts: list[list[int]], sampling: Sampling, max_new_tokens: int,
                    batch_size: int = 64, guards: LoopGuards = LoopGuards(), desc: str = "sampling") -> list[Generation]:
    """One sampled continuation of every prompt (token ids), batched, with the semantics the model
    was trained for and a seed per batch (reproducible; copies of a prompt in a batch differ)."""
    from tqdm.auto import tqdm

    from halluc.core.tokens import backtrack_id, has_backtrack

    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    semantics = semantics_for(model, None, has_backtrack=bt is not None)
    out = []
    bar = tqdm(total=len(prompts), desc=desc, unit="sample", leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out += generate(model, chunk, max_new_tokens=max_new_tokens, backtrack_id=bt,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        semantics=semantics, guards=guards,
                        sampling=batch_sampling(sampling, start))
        bar.update(len(chunk))
    bar.close()
    return out


def locate(task, problem: Problem, tokenizer, index: int, prompt: list[int], gen: Generation,
           stats: RoundStats) -> OwnError | None:
    """The sample's first wrong step as token ids (None if right, or skipped: counted in stats)."""
    stats.samples += 1
    visible = gen.visible
    text = tokenizer.decode(visible, skip_special_tokens=True)
    report = task.verify_steps(problem, task.split_steps(text))
    err = first_error(task, problem, text, final=True)
    if err is None and report.answer_correct:
        stats.right += 1
        return None
    stats.wrong += 1
    if gen.stop != "eos":  # cut off by the length limit: its last step may be unfinished, not wrong
        stats.unfinished += 1
        return None
    if err is None or (err[2] == "wrong_answer" and not _canonical_steps(problem)):
        stats.unlocated += 1  # e.g. GSM8K: all annotations consistent, the answer wrong
        return None
    start, end, kind = err
    ends = char_ends(tokenizer, visible)
    cut = token_cut(ends, start)
    if cut is None:
        stats.unaligned += 1
        return None
    stop = next((i + 1 for i, e in enumerate(ends) if e >= end), len(visible))
    stats.located += 1
    stats.kinds[kind] += 1
    return OwnError(index, prompt, visible[:cut], visible[cut:stop], visible[stop:], gen.stop == "eos", kind)


# --------------------------------------------------------------------------- 3: corrections

def reference_continuation(task, problem: Problem, done: list[str]) -> list[str] | None:
    """Reference steps that finish a solution whose (right) steps so far are `done`, or None.

    arith (canonical steps, any dependency order): the reference steps whose quantity is not
    computed yet, in reference order, then the answer. Other tasks: the reference steps after
    `done` if `done` is the reference's own beginning (whitespace aside).
    """
    if _canonical_steps(problem):
        computed = {s.split("=")[0].strip() for s in done}
        *ops, answer = problem.steps
        rest = [s for s in ops if s.split("=")[0].strip() not in computed] + [answer]
    else:
        if [s.strip() for s in done] != [s.strip() for s in problem.steps[:len(done)]]:
            return None
        rest = problem.steps[len(done):]
    report = task.verify_steps(problem, done + rest)
    return rest if report.all_ok and len(report.kinds) == len(done) + len(rest) else None


@dataclass
class Correction:
    step: list[int]     # token ids of the right step written where the wrong one stood
    rest: list[int]     # token ids finishing the solution (EOS not included)
    source: str         # "model" | "reference"


def corrections(model, tokenizer, task, problems: list[Problem], errors: list[OwnError], tries: int,
                sampling: Sampling, max_new_tokens: int, stats: RoundStats, batch_size: int = 64,
                guards: LoopGuards = LoopGuards()) -> list[Correction | None]:
    """For every error a right way on: the model's own resample if one of `tries` verifies,
    else the reference continuation, else None (counted)."""
    from halluc.core.tokens import backtrack_id, has_backtrack

    found: list[Correction | None] = [None] * len(errors)
    if tries and errors:
        bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
        semantics = semantics_for(model, None, has_backtrack=bt is not None)
    for t in range(tries):  # try after try, only for the errors still without a correction
        pending = [e for e in range(len(errors)) if found[e] is None]
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            gens = generate(model, [errors[e].prompt + errors[e].prefix for e in chunk], max_new_tokens=max_new_tokens,
                            backtrack_id=bt, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            semantics=semantics, guards=guards,
                            sampling=Sampling(sampling.temperature, sampling.top_p,
                                              sampling.seed * 100_003 + 7 + t * 1_000_003 + start))
            for e, g in zip(chunk, gens):
                if g.stop == "eos":
                    found[e] = _verified_continuation(task, problems[errors[e].problem], tokenizer, errors[e], g.visible)
    for e, err in enumerate(errors):
        if found[e] is not None:
            stats.corrected_by_model += 1
            continue
        problem = problems[err.problem]
        done = task.split_steps(tokenizer.decode(err.prefix, skip_special_tokens=True))
        rest = reference_continuation(task, problem, done)
        if rest is None:
            stats.no_correction += 1
            continue
        from halluc.core.tokens import continuation_ids

        ids = continuation_ids(tokenizer, rest)
        found[e] = Correction(ids[0], [t for s in ids[1:] for t in s], "reference")
        stats.corrected_by_reference += 1
    return found


def _verified_continuation(task, problem: Problem, tokenizer, err: OwnError, new: list[int]) -> Correction | None:
    """`new` as step + rest if prefix + new verifies whole (every step right, right answer) and
    its first step differs from the wrong one and ends on a token boundary."""
    prefix_text = tokenizer.decode(err.prefix, skip_special_tokens=True)
    text = tokenizer.decode(err.prefix + new, skip_special_tokens=True)
    steps = task.split_steps(text)
    report = task.verify_steps(problem, steps)
    if not (report.all_ok and report.answer_correct):
        return None
    done = len(task.split_steps(prefix_text)) if prefix_text.strip() else 0
    first_end = len("".join(steps[:done + 1]))
    ends = char_ends(tokenizer, err.prefix + new)
    cut = token_cut(ends, first_end)
    if cut is None or cut <= len(err.prefix):
        return None
    step = (err.prefix + new)[len(err.prefix):cut]
    if step == err.wrong:
        return None
    return Correction(step, (err.prefix + new)[cut:], "model")


# --------------------------------------------------------------------------- 4: examples and pairs

def build(err: OwnError, fix: Correction, bt_id: int, eos_id: int | None) -> tuple[Example, dict] | None:
    """The SFT example and the preference pair of one error (None if the wrong step is no error
    in tokens: it is a prefix of the correction)."""
    shared = common_prefix_len(err.wrong, fix.step)
    error = err.wrong[shared:]
    if not error:
        return None
    eos = [eos_id] if eos_id is not None else []
    ex = (Example().add(err.prompt, Role.PROMPT).add(err.prefix + err.wrong[:shared], Role.KEPT)
          .add(error, Role.ERROR).add([bt_id] * len(error), Role.BACKTRACK)
          .add(fix.step[shared:], Role.CORRECTION).add(fix.rest + eos, Role.KEPT))
    ex.check(err.prefix + fix.step + fix.rest + eos, bt_id)
    prompt_roles = [Role.PROMPT] * len(err.prompt) + [Role.KEPT] * (len(err.prefix) + shared) + [Role.ERROR] * len(error)
    chosen = [bt_id] * len(error) + fix.step[shared:] + fix.rest + eos
    chosen_roles = [Role.BACKTRACK] * len(error) + [Role.CORRECTION] * (len(fix.step) - shared) + \
        [Role.KEPT] * (len(fix.rest) + len(eos))
    rejected = err.after + (eos if err.ended else [])
    pair = {"prompt_ids": err.prompt + err.prefix + err.wrong, "prompt_roles": [int(r) for r in prompt_roles],
            "chosen_ids": chosen, "chosen_roles": [int(r) for r in chosen_roles],
            "rejected_ids": rejected, "rejected_roles": [int(Role.KEPT)] * len(rejected)}
    # the pair's chosen branch, read as one trace after its prompt, is the example's response
    assert apply_backtrack(pair["prompt_ids"][len(err.prompt):] + chosen, bt_id) == \
        apply_backtrack(ex.response, bt_id)
    return ex, pair


def make_round(model, tokenizer, task, problems: list[Problem], *, k: int, sampling: Sampling,
               max_new_tokens: int, correction_tries: int, per_problem: int, bt_id: int, masked: bool = True,
               max_len: int = 256, batch_size: int = 256) -> tuple[list[dict], list[dict], RoundStats]:
    """Sample, judge, correct and build one round: (SFT rows, pair rows in the three forms of
    halluc/sources/pair_forms.py, with a `form` column, statistics). Batch 256
    samples 1.4x faster than 64 on 2 CPU cores (benchmarks/own_errors.py)."""
    from tqdm.auto import tqdm

    from halluc.sources.data import labels_from_roles

    stats = RoundStats(problems=len(problems))
    samples = sample(model, tokenizer, problems, k, sampling, max_new_tokens, batch_size)
    errors, taken = [], Counter()
    for i, prompt, gen in tqdm(samples, desc="judging", unit="sample", leave=False):
        err = locate(task, problems[i], tokenizer, i, prompt, gen, stats)
        if err is not None and taken[i] < per_problem:
            taken[i] += 1
            errors.append(err)
    fixes = corrections(model, tokenizer, task, problems, errors, correction_tries, sampling, max_new_tokens,
                        stats, batch_size)
    rows, pairs = [], []
    longest_run = LoopGuards().max_backtracks  # generation never writes a longer BT run: nor may training
    for err, fix in zip(errors, fixes):
        if fix is None:
            continue
        built = build(err, fix, bt_id, tokenizer.eos_token_id)
        if built is None:
            stats.not_built += 1
            continue
        ex, pair = built
        if len(ex.ids) > max_len or ex.roles.count(Role.BACKTRACK) > longest_run:
            stats.too_long += 1
            continue
        rows.append({"input_ids": ex.ids, "roles": ex.roles, "labels": labels_from_roles(ex.ids, ex.roles, masked),
                     "problem": err.problem, "kind": err.kind, "correction": fix.source})
        about = {"problem": err.problem, "kind": err.kind, "correction": fix.source}
        pairs.append({**pair, **about, "form": "bt"})
        step = step_pair(err.prompt, err.prefix, err.wrong, fix.step)
        if step is not None:
            pairs.append({**step, **about, "form": "step"})
        stats.kept += 1
        stats.kept_kinds[err.kind] += 1
    balanced, why = balanced_pairs(task, problems, tokenizer, samples, bt_id, per_problem, sampling.seed)
    pairs += [{**p, "form": "balanced"} for p in balanced]
    stats.balanced = why["kept"]
    return rows, pairs, stats


def save_round(folder, rows: list[dict], pairs: list[dict], stats: RoundStats | dict) -> None:
    """sft/ and pairs/ as `datasets` folders, and stats.json (module docstring); MCTS data too. Under
    several processes rank 0 writes (every rank made the same rows from the same model and seed)."""
    from datasets import ClassLabel, Dataset, Sequence

    from halluc.core.distributed import is_main
    from halluc.core.example import ROLE_NAMES

    if not is_main():
        return

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sft = Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "roles": [], "labels": [],
                                                                   "problem": [], "kind": [], "correction": []})
    if rows:
        sft = sft.cast_column("roles", Sequence(ClassLabel(names=ROLE_NAMES)))
    sft.save_to_disk(str(folder / "sft"))
    Dataset.from_list(pairs).save_to_disk(str(folder / "pairs")) if pairs else None
    (folder / "stats.json").write_text(json.dumps(stats if isinstance(stats, dict) else stats.as_dict(), indent=1))


def own_pairs(cfg, start: str, model, tokenizer, task, problems, bt_id) -> str:
    """A folder of pairs from the starting model's own errors (technique 5's sampler and judge),
    made once per (model weights, sampler settings, seed) under cache_dir (an artifact). Reads the DPO
    recipe's settings by name: sampler, seed, max_len, lab, cache_dir."""
    import hashlib
    import random

    from halluc.core.artifacts import artifact_path, build_once
    from halluc.core.config import as_dict
    from halluc.core.distributed import local_device
    from halluc.training.lora import fingerprint

    s = cfg.sampler
    # everything the pairs depend on: the weights, the sampler, the seed, the problems, the task
    key = json.dumps(["forms", fingerprint(model), as_dict(s), cfg.seed, cfg.max_len, as_dict(cfg.lab),
                      hashlib.sha1("\n".join(p.prompt for p in problems).encode()).hexdigest()])
    folder = artifact_path(cfg.cache_dir, "pairs", key)
    with build_once(folder, "stats.json", ranks="main", what="the pairs from the model's own errors") as build:
        if build:
            pick = random.Random(cfg.seed).sample(range(len(problems)), min(s.problems, len(problems)))
            model.eval().to(local_device())
            rows, pairs, stats = make_round(model, tokenizer, task, [problems[i] for i in pick], k=s.k,
                                            sampling=Sampling(s.temperature, s.top_p, cfg.seed),
                                            max_new_tokens=s.max_new_tokens, correction_tries=s.correction_tries,
                                            per_problem=s.per_problem, bt_id=bt_id, max_len=cfg.max_len)
            for row in rows + pairs:  # problem index -> index in the SFT split (as a self_correct round writes)
                row["problem"] = pick[row["problem"]]
            if not pairs:
                raise SystemExit(f"{start} made no pair from {len(pick)} problems x {s.k} samples ({json.dumps(stats.as_dict())}): "
                                 "give data=pairs")
            save_round(folder, rows, pairs, stats)
            log.info("pairs from the model's own errors: %s", json.dumps(stats.as_dict()))
    return str(folder / "pairs")
