"""Evaluation: generate with backtracking, verify every step, judge every backtrack.

Generation is `halluc.inference.generate` with the semantics the checkpoint was trained for (keep for
`causal`, rewind for `block_errors` + rewound positions). Exact metric definitions are in
docs/generation.md; the step judge (halluc.inference.judge) finds a text's first error and whether a BT
run (a maximal run of consecutive BTs) was justified. In short:

- BT precision = justified runs / runs.
- a problem *made an error* if the visible text at the end of some segment (just before a BT
  run, or at the end) has an error; the first such segment's error is *caught* if a BT run
  follows that segment and is justified. BT recall = caught / problems that made an error.
- erased = visible tokens deleted; wasted = generated tokens not in the output (erased + BTs).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from halluc.inference.generate import Generation, Guide, LoopGuards, Sampling, generate_text, semantics_for
from halluc.inference.judge import backtrack_runs, first_error, run_justified
from halluc.tasks import Problem, StepReport
from halluc.tasks.base import UNCHECKED
from halluc.core.tokens import BACKTRACK_TOKEN, backtrack_id, has_backtrack


@dataclass
class ProblemScore:
    answer_correct: bool
    full_solution: bool
    kinds: list[str]
    n_backtracks: int
    n_runs: int
    n_justified: int
    n_erased: int
    n_wasted: int
    made_error: bool        # an error in the first segment that had one (any run's text, or the final text)
    caught_error: bool      # ... and the run after it erased it (the old recall: rewards self-inflicted errors)
    token_forwards: int
    # detection of the model's own errors (issue 23): only the text written before its first BT run counts
    first_pass_error: bool = False   # the text before the first BT run (no run: the final text) has an error
    first_pass_caught: bool = False  # ... and the first run erases it
    first_run: bool = False          # the model backtracked at all
    first_run_justified: bool = False  # its first run erased an error (a run over right text is not)
    later_runs: int = 0              # runs after the first
    later_justified: int = 0         # ... that erased an error (mostly written after backtracking began: repairs)


def problem_id(problem: Problem) -> str:
    """A short, stable id of a test problem (its prompt's hash): reports pair arms by it."""
    import hashlib

    return hashlib.sha1(problem.prompt.encode()).hexdigest()[:12]


def score_problem(task, problem: Problem, gen: Generation, tokenizer, bt: int | None) -> ProblemScore:
    text = gen.text if gen.text is not None else tokenizer.decode(gen.visible, skip_special_tokens=True)
    report = task.verify_steps(problem, task.split_steps(text))
    runs = backtrack_runs(gen.trace, bt) if bt is not None else []
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    justified, made_error, caught, first_err = [], False, False, None
    for run in runs:
        ok, err = run_justified(task, problem, decode(run.before), decode(run.after))
        justified.append(ok)
        first_err = err if len(justified) == 1 else first_err
        if err is not None and not made_error:  # the first segment that ends with an error
            made_error, caught = True, justified[-1]
    if not made_error:
        made_error = first_error(task, problem, text, final=True) is not None
    first_pass_error = first_err is not None if runs else made_error
    return ProblemScore(
        answer_correct=report.answer_correct,
        full_solution=report.all_ok and len(report.kinds) == len(problem.steps),
        kinds=report.kinds, n_backtracks=gen.n_backtracks, n_runs=len(runs), n_justified=sum(justified),
        n_erased=gen.n_erased, n_wasted=len(gen.trace) - len(gen.visible), made_error=made_error,
        caught_error=caught, token_forwards=gen.token_forwards, first_pass_error=first_pass_error,
        first_pass_caught=first_pass_error and bool(justified) and justified[0], first_run=bool(runs),
        first_run_justified=bool(justified) and justified[0], later_runs=max(len(runs) - 1, 0),
        later_justified=sum(justified[1:]))


def evaluate_problems(model, tokenizer, problems: list[Problem], task, max_new_tokens: int = 160,
                      batch_size: int = 64, desc: str = "eval", semantics: str | None = None,
                      sampling: Sampling = Sampling(), guards: LoopGuards = LoopGuards(), verifier=None,
                      guide: Guide = Guide(), bt_banned: bool = True) -> dict:
    """Accuracy, step validity and backtrack behaviour (precision, recall, erased, wasted); with a
    `verifier` (halluc.inference.verifiers), decoding is guided by it (halluc.inference.generate).

    bt_banned (a model with a BT token, no verifier): decode again with BT banned, same weights and
    sampling seed, and report backtracking's own effect per problem (SCoRe-style): accuracy allowed vs
    banned, wrong->right and right->wrong, whatever training did to the model besides."""
    if not problems:
        raise ValueError(f"{desc}: no problems to evaluate (an empty test file?)")
    with torch.no_grad():
        gens = generate_text(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, semantics=semantics, sampling=sampling, guards=guards, desc=desc,
                             verifier=verifier, guide=guide, step_separator=getattr(task, "STEP_SEPARATOR", "\n"))
        banned = None
        if bt_banned and verifier is None and has_backtrack(tokenizer):
            plain = generate_text(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, semantics=semantics, sampling=sampling,
                                  guards=dataclasses.replace(guards, max_backtracks=0), desc=f"{desc} (BT banned)")
            banned = [task.verify_steps(p, task.split_steps(g.text)).answer_correct for p, g in zip(problems, plain)]
    return metrics_of(model, tokenizer, problems, task, gens, semantics, banned=banned)


def evaluate_best_of_n(model, tokenizer, problems: list[Problem], task, score_steps, n: int, select: str,
                       sampling: Sampling, max_new_tokens: int = 160, batch_size: int = 64,
                       desc: str = "eval") -> dict:
    """Best-of-N (select="best") or weighted majority voting ("vote") over n samples per problem,
    scored per step by `score_steps(prompt_ids, steps) -> per-step P(right)` lists and reduced by
    halluc.inference.verifiers.aggregate. The chosen sample is scored like any generation; generated tokens
    count all n samples."""
    from halluc.objectives.verifier_head import step_end_ids
    from halluc.inference.verifiers import aggregate, best_of_n, split_steps_ids, weighted_vote

    if select not in ("best", "vote"):
        raise ValueError(f"select must be best or vote, got {select!r}")
    prompts = [p.prompt for p in problems for _ in range(n)]
    with torch.no_grad():
        gens = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             sampling=sampling, desc=f"{desc} ({n} samples)")
    ends = step_end_ids(tokenizer, getattr(task, "STEP_SEPARATOR", "\n"))
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    scores = score_steps(prompt_ids, [split_steps_ids(g.visible, ends) for g in gens])
    chosen, tokens = [], []
    for i in range(len(problems)):
        group = gens[i * n:(i + 1) * n]
        value = [aggregate(s) for s in scores[i * n:(i + 1) * n]]
        pick = best_of_n(value) if select == "best" else weighted_vote([task.extract_answer(g.text) for g in group], value)
        chosen.append(group[pick])
        tokens.append(sum(len(g.trace) for g in group))
    return metrics_of(model, tokenizer, problems, task, chosen, None, tokens)


def metrics_of(model, tokenizer, problems: list[Problem], task, gens: list[Generation], semantics: str | None,
               tokens: list[int] | None = None, banned: list[bool] | None = None) -> dict:
    """The evaluation of one generation per problem (`tokens`: generated tokens per problem, if not
    the generation's own trace length; `banned`: each problem's answer correctness decoded with BT
    banned, for backtracking's own effect)."""
    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    used = gens[0].semantics if gens else semantics_for(model, semantics, has_backtrack=bt is not None)
    scores = [score_problem(task, p, g, tokenizer, bt) for p, g in zip(problems, gens)]
    tokens = tokens or [len(g.trace) for g in gens]
    first_wrong = Counter(s.kinds[i] for s in scores
                          for i in [StepReport(s.kinds, s.answer_correct).first_wrong] if i is not None)
    n = max(len(problems), 1)
    runs = sum(s.n_runs for s in scores)
    errors = sum(s.made_error for s in scores)
    own_errors = sum(s.first_pass_error for s in scores)
    first_runs = sum(s.first_run for s in scores)
    steps = sum(len(s.kinds) for s in scores)
    checked = sum(k != UNCHECKED for s in scores for k in s.kinds)
    # the first five problems, then up to five more that backtracked (what a reader wants to see)
    rows = list(zip(problems, gens, scores))
    shown = rows[:5] + [r for r in rows[5:] if r[2].n_runs][:5]
    samples = [{"prompt": p.prompt, "trace": tokenizer.decode(g.trace), "visible": g.text, "kinds": s.kinds,
                "stop": g.stop, "backtracks": g.n_backtracks, "justified_runs": s.n_justified}
               for p, g, s in shown]
    allowed = [s.answer_correct for s in scores]
    effect = {} if banned is None else {  # backtracking's own effect, same model and seed
        "answer_acc_bt_banned": sum(banned) / n,
        "wrong_to_right": sum(a and not b for a, b in zip(allowed, banned)) / n,
        "right_to_wrong": sum(b and not a for a, b in zip(allowed, banned)) / n}
    return {
        "n": len(problems), "semantics": used, **effect,
        "answer_acc": sum(s.answer_correct for s in scores) / n,
        "full_solution_acc": sum(s.full_solution for s in scores) / n,
        # over the steps the task's verifier can check: a step it cannot (UNCHECKED) is neither
        "step_validity": sum(k == "ok" for s in scores for k in s.kinds) / checked if checked else None,
        "unchecked_steps": (steps - checked) / steps if steps else 0.0,
        "bt_per_problem": sum(s.n_backtracks for s in scores) / n,
        "bt_runs_per_problem": runs / n,
        "erased_per_problem": sum(s.n_erased for s in scores) / n,
        "wasted_per_problem": sum(s.n_wasted for s in scores) / n,
        "tokens_per_problem": sum(tokens) / n,
        "guided_runs_per_problem": sum(g.n_guided for g in gens) / n,
        # detection (issue 23): of the model's own first-pass errors, and of its first runs only; errors
        # it wrote after backtracking began, and their repairs, apart (they were counted as skill before)
        "bt_precision": sum(s.first_run_justified for s in scores) / first_runs if first_runs else None,
        "bt_recall": sum(s.first_pass_caught for s in scores) / own_errors if own_errors else None,
        "problems_with_error": own_errors,
        "later_runs_per_problem": sum(s.later_runs for s in scores) / n,
        "later_repairs_per_problem": sum(s.later_justified for s in scores) / n,
        "bt_precision_all_runs": sum(s.n_justified for s in scores) / runs if runs else None,
        # BT runs that erased right text (a BT after a right step), first or later: what "backtrack after
        # everything" inflates (issue 24's balanced pairs are meant to lower it)
        "runs_over_right_per_problem": (runs - sum(s.n_justified for s in scores)) / n,
        "bt_recall_any_segment": sum(s.caught_error for s in scores) / errors if errors else None,
        "token_forwards_per_problem": sum(s.token_forwards for s in scores) / n,
        "stops": dict(Counter(g.stop for g in gens)),
        "first_error_kinds": dict(first_wrong.most_common()),
        "samples": samples,
        # one entry per problem, in order: what paired comparisons between models need
        "per_problem": {"answer_correct": [int(s.answer_correct) for s in scores],
                        "full_solution": [int(s.full_solution) for s in scores],
                        "runs": [s.n_runs for s in scores], "justified": [s.n_justified for s in scores],
                        "runs_over_right": [s.n_runs - s.n_justified for s in scores],
                        "made_error": [int(s.made_error) for s in scores],
                        "caught_error": [int(s.caught_error) for s in scores],
                        "first_pass_error": [int(s.first_pass_error) for s in scores],
                        "first_pass_caught": [int(s.first_pass_caught) for s in scores],
                        "first_run": [int(s.first_run) for s in scores],
                        "first_run_justified": [int(s.first_run_justified) for s in scores],
                        "later_justified": [s.later_justified for s in scores],
                        "id": [problem_id(p) for p in problems],
                        **({} if banned is None else {
                            "answer_correct_bt_banned": [int(b) for b in banned],
                            "wrong_to_right": [int(a and not b) for a, b in zip(allowed, banned)],
                            "right_to_wrong": [int(b and not a) for a, b in zip(allowed, banned)],
                            "bt_gain": [int(a) - int(b) for a, b in zip(allowed, banned)]}),
                        "wasted": [s.n_wasted for s in scores], "tokens": list(tokens)},
    }


def backtrack_samples(results: dict[str, dict], n: int = 3) -> str:
    """A few samples that backtracked, as text for the console (trace with BTs, then what is left)."""
    lines = []
    for split, m in results.items():
        for sample in [x for x in m["samples"] if x.get("backtracks")][:n]:
            lines.append(f"[{split}] {sample['prompt']}\n  trace:   {sample['trace'].replace(BACKTRACK_TOKEN, '⌫')}"
                         f"\n  visible: {sample['visible']}   ({sample['justified_runs']} justified BT run(s))")
    return "\n".join(lines)


def evaluation_version() -> str:
    """A hash of the code that scores a model (generation, judge, evaluation, tasks), so a cached
    evaluation is redone when any of it changes."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).parent.parent  # halluc/
    files = [f"inference/{name}.py" for name in ("evaluate", "judge", "generate", "decoding", "token_choice",
                                                  "guided_decoding", "kv_slots")]
    files += [f"tasks/{p.name}" for p in sorted((root / "tasks").glob("*.py"))]
    return hashlib.sha1(b"".join((root / f).read_bytes() for f in files)).hexdigest()[:8]


TABLE_NOTE = ("BT banned: the same model decoded with BT banned (same seed): its accuracy, then the problems "
              "its BTs turned wrong->right and right->wrong. erased, wasted: tokens per problem. BT precision: "
              "first BT runs that erase an error; recall: the model's first errors caught (docs/generation.md). "
              "n/a: not measured (no BT token) or undefined (no BT run, no error made).")


def markdown_table(results: dict[str, dict], first: str = "split") -> str:
    """One row per split (or per "model / split" key, `first` names the column); TABLE_NOTE says
    what the columns mean."""
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    rows = [f"| {first} | n | semantics | answer acc | BT banned: acc, wrong->right, right->wrong | full solution | "
            "step validity | BT / problem | erased / problem | wasted / problem | BT precision | BT recall |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        effect = (f"{pct(m['answer_acc_bt_banned'])}, +{pct(m['wrong_to_right'])}, -{pct(m['right_to_wrong'])}"
                  if "answer_acc_bt_banned" in m else "n/a")
        rows.append(f"| {name} | {m['n']} | {m['semantics']} | {pct(m['answer_acc'])} | {effect} | "
                    f"{pct(m['full_solution_acc'])} | {pct(m.get('step_validity'))} | {m['bt_per_problem']:.2f} | "
                    f"{m['erased_per_problem']:.2f} | {m['wasted_per_problem']:.2f} | {pct(m['bt_precision'])} | "
                    f"{pct(m['bt_recall'])} |")
    return "\n".join(rows)


def log_to_tensorboard(tb_dir, results: dict[str, dict], label: str, step: int, hparams: dict | None = None) -> None:
    """Scalars `eval/<label>/<split>/<metric>` at `step`, and (with hparams) the run's settings
    next to its final metrics in TensorBoard's HPARAMS tab."""
    from torch.utils.tensorboard import SummaryWriter

    names = ("answer_acc", "full_solution_acc", "step_validity", "bt_per_problem", "wasted_per_problem",
             "bt_precision", "bt_recall")
    flat = {f"eval/{label}/{split}/{name}": m[name] for split, m in results.items() for name in names
            if m.get(name) is not None}
    with SummaryWriter(str(tb_dir)) as writer:
        for tag, value in flat.items():
            writer.add_scalar(tag, value, step)
        if hparams:
            writer.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()},
                               {f"hparam/{k}": v for k, v in flat.items()}, run_name=".")
