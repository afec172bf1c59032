"""Guided decoding (issue 12): the policy of halluc.inference.generate that lets a verifier erase a step.

With `Guided(verifier, step_ends, guide)` (halluc.inference.verifiers: a PRM, the policy's verifier head, or
the task's oracle), every time a row ends a step (a token holding the step separator, or EOS) the
verifier scores the visible text so far; below `Guide.threshold`, and within `Guide.budget`, the row
emits a BT run that erases the step (whatever the model would have written) and writes it again:
greedy with a verbatim repeat of an erased version banned (resample="ban": the token that would
complete it is masked), or sampled at `Guide.temperature` (resample="sample").

With `Guide.erase="rewind"` the erased step leaves the KV cache whatever the semantics: every slot
from its first token on dies (the model's own BT runs inside it too) and the rewrite takes the
erased step's positions, as if it had never been written; the rewrite's first token is chosen from
the logits the erased step's first token came from (the BT run's own logits saw the erased step);
the model's own BTs keep their semantics. `erase="keep"` makes the run act as the model's own BTs:
under keep the step and the BTs stay in context and decoding continues from the last BT's logits
(under rewind semantics they still rewind). A verifier's BTs are not counted by the loop guards
(those stop the model's own loops). Where the model's own BTs erased into an earlier step after the
current one began, the logits the step started from are gone: that run then acts as the model's own
BTs do under its semantics.
"""
from __future__ import annotations

import torch

from halluc.inference.decoding import Guided, Sampling
from halluc.inference.token_choice import choose


def restart_logits(logits: torch.Tensor, rows: list, bt: int) -> torch.Tensor:
    """After an erasing run's last BT, a row's rewrite starts from the logits its erased step's first
    token came from, never with a BT (that would erase the clean prefix)."""
    restart = [r for r, row in enumerate(rows) if not row.done and row.erasing and not row.forced_bts
               and row.trace and row.trace[-1] == bt]
    if not restart:
        return logits
    logits = logits.clone()
    for r in restart:
        logits[r] = rows[r].step_logits
        logits[r, bt] = float("-inf")
    return logits


def choose_with_rewrites(logits: torch.Tensor, rows: list, sampling: Sampling, guided: Guided,
                         rng: torch.Generator, draws: tuple[int, list[int]] | None = None) -> list[int]:
    """The next tokens when a verifier guides: rows rewriting an erased step are resampled
    (temperature) or have a verbatim repeat of an erased version banned; the rest as usual."""
    guide = guided.guide
    rewriting = [r for r, row in enumerate(rows) if not row.done and row.resample_from is not None]
    if rewriting and guide.resample == "ban":
        banned = [(r, t) for r in rewriting for t in _repeat_completions(rows[r], guided.step_ends)]
        if banned:
            logits = logits.clone()
            logits[[r for r, _ in banned], [t for _, t in banned]] = float("-inf")
    tokens = choose(logits, sampling, rng, draws)
    if rewriting and guide.resample == "sample":
        hot = Sampling(guide.temperature, sampling.top_p, sampling.seed)
        tokens[rewriting] = choose(logits[rewriting], hot, rng)
    return tokens.tolist()


def _repeat_completions(row, step_ends) -> list[int]:
    """Tokens that would complete a verbatim repeat of an erased version of the step being rewritten
    (its last token before the separator, or its last token)."""
    written = row.visible[row.resample_from:]
    out = []
    for erased in row.erased_steps.get(row.resample_from, []):
        content = erased[:-1] if len(erased) > 1 and erased[-1] in step_ends else erased
        if written == content[:-1]:
            out.append(content[-1])
    return out


def steer(guided: Guided, rows: list, tokens: list[int], bt: int, eos: set) -> set[int]:
    """Guided decoding's decisions for this step, written into `tokens`: continue a verifier's BT
    run; at a step end, score the visible text and start a BT run over the step if it is too low.
    Returns the rows whose token is a verifier's BT."""
    guide, step_ends = guided.guide, guided.step_ends
    ask, forced = [], set()
    for r, row in enumerate(rows):
        if row.done:
            continue
        if row.forced_bts:  # inside a verifier-triggered run
            tokens[r] = bt
            row.forced_bts -= 1
            forced.add(r)
            continue
        if row.resample_from is not None and tokens[r] in eos:  # the rewritten step ends the text
            row.resample_from = None
        ended = bool(row.trace) and row.trace[-1] != bt and (row.trace[-1] in step_ends or tokens[r] in eos)
        if (ended and row.visible and tokens[r] != bt and row.guided < guide.budget
                and row.scored_at != len(row.trace)):
            ask.append(r)
    if not ask:
        return forced
    scores = guided.verifier([(rows[r].prompt, rows[r].visible) for r in ask], ask)
    for r, score in zip(ask, scores):
        row = rows[r]
        row.scored_at = len(row.trace)
        row.verifier_calls += 1
        if score >= guide.threshold:
            continue
        start = max((i + 1 for i, t in enumerate(row.visible[:-1]) if t in step_ends), default=0)
        row.erased_steps.setdefault(start, []).append(list(row.visible[start:]))
        row.resample_from = start
        row.guided += 1
        row.guided_at.append(len(row.trace))
        # the rewrite restarts from the logits the step's first token came from; stale when the
        # model's own BTs crossed into an earlier step since: then the run acts as the model's own
        row.erasing = guide.erase == "rewind" and row.step_logits_at == start
        if row.erasing:
            row.erase_from_slot, row.rewound_pos = row.visible_slots[start], row.visible_pos[start]
        tokens[r] = bt
        forced.add(r)
        row.forced_bts = len(row.visible) - start - 1
    return forced


def note_step_start(row, logits: torch.Tensor, token: int, bt: int, step_ends) -> None:
    """Before `token` is emitted: if it starts a step, keep the logits it came from (what the step is
    rewritten from if the verifier erases it)."""
    if token != bt and (not row.visible or row.visible[-1] in step_ends):
        row.step_logits = logits.clone()
        row.step_logits_at = len(row.visible)


def note_rewrite_end(row, token: int, bt: int, step_ends) -> None:
    """After `token` is emitted: a step end closes the rewrite of an erased step."""
    if row.resample_from is not None and token != bt and token in step_ends and not row.forced_bts:
        row.resample_from = None
