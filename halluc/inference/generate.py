"""Generation with backtracking: batched, greedy or sampled, with KV-cache rewinding.

Two semantics, each the exact inference twin of a training mode (docs/generation.md):

- "keep"   (twin of `causal` attention + original positions): every token, erased or BT, stays
  in the KV cache; positions count every token. Only the visible output drops deleted tokens.
- "rewind" (twin of `block_errors` attention + rewound positions): a BT run is fed token by
  token (each BT sees the error), the next token is taken from the LAST BT's logits, then the
  erased tokens and the BTs leave the cache and the next token is written at the rewound
  position (the position of the first erased token = its depth in the edit tree).

`generate` is one loop; each step reads top to bottom: the next-token logits -> the policies
choose a token per row (halluc.inference.token_choice: loop guards, then greedy or a sample; with a
verifier, halluc.inference.guided_decoding: restart, rewrite and steer) -> forcing (tests, benchmarks) ->
`emit` records it in the row -> finished rows leave the batch once they are a quarter of it ->
halluc.inference.kv_slots closes BT runs (rewind) and feeds the new tokens through the model.

The BT id is an argument (from `halluc.core.tokens.backtrack_id`, never `encode`); None means the
model has no BT and this is plain decoding.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from halluc.inference.decoding import SEMANTICS, Forcing, Guide, Guided, LoopGuards, Sampling  # noqa: F401  (re-exported)
from halluc.inference.guided_decoding import choose_with_rewrites, note_rewrite_end, note_step_start, restart_logits, steer
from halluc.inference.kv_slots import KVSlots
from halluc.inference.token_choice import apply_guards, choose

log = logging.getLogger(__name__)
LEAVE_AT = 0.25  # finished rows leave the batch once they are this share of it (a copy of the cache)


@dataclass
class Generation:
    """One generated sequence. `trace` has the BTs (stop token excluded); `visible` is
    apply_backtrack(trace). token_forwards counts tokens pushed through the model for this
    sequence, prompt included (a cache generator feeds every emitted token but the last once)."""

    trace: list[int]
    visible: list[int]
    prompt_len: int
    n_backtracks: int = 0
    n_erased: int = 0
    token_forwards: int = 0
    stop: str = ""                 # eos | length | forced_end | stop_token | prompt_too_long
    semantics: str = "keep"        # what it was generated with (rewind needs a BT id)
    text: str | None = None        # decoded visible text (generate_text fills it)
    logits: list[torch.Tensor] | None = None  # raw logits each emitted token was chosen from
    logprobs: list[float] | None = None  # log P(token) under those raw logits, per trace token (record_logprobs)
    n_guided: int = 0              # BT runs a verifier triggered (guided decoding)
    verifier_calls: int = 0        # step ends the verifier scored
    guided_at: list[int] = field(default_factory=list)  # trace index of each such run's first BT


@dataclass
class Row:
    """One row's state in the loop (cache slots are per row, the cache is shared)."""

    prompt: list[int]
    next_pos: int
    forced: list[int] | None = None   # Forcing.tokens of this row
    trace: list[int] = field(default_factory=list)
    visible: list[int] = field(default_factory=list)
    visible_slots: list[int] = field(default_factory=list)  # cache slot of each fed visible token
    visible_pos: list[int] = field(default_factory=list)    # and its position
    dead_after_run: list[int] = field(default_factory=list)  # slots of the open BT run and what it erased
    erasures: Counter = field(default_factory=Counter)       # visible index -> times erased
    n_backtracks: int = 0             # every BT, a verifier's included
    n_erased: int = 0
    forwards: int = 0
    banned_token: int | None = None  # the token the last BT erased, banned for the next token
    done: bool = False
    stop: str = ""
    logits: list[torch.Tensor] | None = None
    logprobs: list[float] | None = None
    # guided decoding (halluc.inference.guided_decoding)
    guided: int = 0                   # verifier-triggered BT runs so far
    guided_at: list[int] = field(default_factory=list)
    verifier_calls: int = 0
    forced_bts: int = 0               # BTs still to emit in the current verifier-triggered run
    guided_bts: int = 0               # BTs a verifier forced (the loop guards count only the model's own)
    scored_at: int = -1               # trace length at the last scoring (a step end is scored once)
    resample_from: int | None = None  # visible index where the erased step started, while rewriting it
    erased_steps: dict = field(default_factory=dict)  # visible index -> erased versions of the step there
    erasing: bool = False             # inside a verifier-triggered run that leaves the cache (Guide.erase)
    rewound_pos: int = 0              # position of the first token such a run erased
    erase_from_slot: int = 0          # ... and its cache slot: every slot of the row from there dies
    step_logits: torch.Tensor | None = None  # the logits the current step's first token came from
    step_logits_at: int = -1          # ... the visible index that token took (stale once a BT crosses it)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def generation(self, semantics: str) -> Generation:
        return Generation(trace=self.trace, visible=self.visible, prompt_len=self.prompt_len,
                          n_backtracks=self.n_backtracks, n_erased=self.n_erased, token_forwards=self.forwards,
                          stop=self.stop or "length", semantics=semantics, logits=self.logits,
                          logprobs=self.logprobs, n_guided=self.guided, verifier_calls=self.verifier_calls,
                          guided_at=self.guided_at)


def semantics_for(model, override: str | None = None, has_backtrack: bool = True) -> str:
    """The semantics matching how the checkpoint was trained (config.halluc), or `override`."""
    halluc = getattr(model.config, "halluc", None) or {}
    attention, positions = halluc.get("attention"), halluc.get("positions")
    trained = "rewind" if (attention, positions) == ("block_errors", "rewound") else "keep"
    if attention == "block_errors" and positions != "rewound" and override is None:
        log.warning("block_errors training with %s positions has no exact inference twin here; using keep",
                    positions)
    if override is None:
        return trained if has_backtrack else "keep"
    if override not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {override!r}")
    if halluc and override != trained:
        log.warning("generating with %r semantics, but the checkpoint was trained with attention=%s "
                    "positions=%s (its twin is %r)", override, attention, positions, trained)
    return override


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, backtrack_id: int | None,
             eos_token_id: int | list[int] | None, pad_token_id: int | None = None, semantics: str = "keep",
             sampling: Sampling = Sampling(), guards: LoopGuards = LoopGuards(), guided: Guided | None = None,
             forcing: Forcing | None = None, stop_after: set[int] | frozenset = frozenset(),
             record_logits: bool = False, record_logprobs: bool = False) -> list[Generation]:
    """Generate from a batch of prompt token ids (left padded here); see the module docstring.

    guided: a verifier erases steps it scores low (halluc.inference.guided_decoding).
    forcing: tokens emitted whatever the model says (halluc.inference.decoding.Forcing); with record_logits the
      model's logits at every step are kept.
    stop_after: a row stops once it emits one of these tokens, which stays in its trace
      (stop="stop_token"; MCTS writes one step at a time with the step-end ids).
    record_logprobs: keep log P(token) of every trace token under the model's raw logits.
    """
    if guided is not None and backtrack_id is None:
        raise ValueError("guided decoding erases steps with BTs: the model needs a BT id")
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else 0
    bt = backtrack_id
    rewind = semantics == "rewind" and bt is not None
    track = rewind or guided is not None  # slots and positions of the visible tokens
    forcing = forcing or Forcing()
    force_rng = random.Random(forcing.seed)
    rows = [Row(prompt=p, next_pos=len(p), forwards=len(p), forced=None if forcing.tokens is None else forcing.tokens[r],
                logits=[] if record_logits else None, logprobs=[] if record_logprobs else None)
            for r, p in enumerate(prompts)]
    kv, logits = KVSlots.prefill(model, prompts, pad, max_new_tokens)
    sample_rng = torch.Generator(device=logits.device).manual_seed(sampling.seed)

    batch, batch_at = list(rows), list(range(len(rows)))  # the rows still generating, in cache order
    for step in range(max_new_tokens):
        # Choose: the loop guards' bans, then greedy or a sample; a verifier restarts, rewrites, steers.
        if guided is not None:
            logits = restart_logits(logits, batch, bt)
        guarded = apply_guards(logits, batch, bt, guards)
        draws = (len(rows), batch_at)  # a row's random numbers do not depend on who is left
        by_verifier = set()
        if guided is not None:
            tokens = choose_with_rewrites(guarded, batch, sampling, guided, sample_rng, draws)
            by_verifier = steer(guided, batch, tokens, bt, eos)
        else:
            tokens = choose(guarded, sampling, sample_rng, draws).tolist()

        # Emit: forcing, then each row's bookkeeping.
        logprobs = torch.log_softmax(logits.float(), dim=-1) if record_logprobs else None
        for r, row in enumerate(batch):
            if row.done:
                continue
            if row.forced is not None:
                if step >= len(row.forced):
                    row.done, row.stop = True, "forced_end"
                    continue
                tokens[r] = row.forced[step]
            elif bt is not None and forcing.backtrack_rate > 0 and row.trace and row.trace[-1] != bt \
                    and force_rng.random() < forcing.backtrack_rate:
                tokens[r] = bt
            if record_logits:
                row.logits.append(logits[r].float().cpu().clone())
            if guided is not None:
                note_step_start(row, logits[r], tokens[r], bt, guided.step_ends)
            emitted = len(row.trace)
            emit(row, tokens[r], bt, eos, max_new_tokens, guided=r in by_verifier)
            if len(row.trace) > emitted:
                if record_logprobs:
                    row.logprobs.append(float(logprobs[r, tokens[r]]))
                if tokens[r] in stop_after and row.stop in ("", "length"):  # a stop token ends a step even as the last allowed token
                    row.done, row.stop = True, "stop_token"
            if guided is not None:
                note_rewrite_end(row, tokens[r], bt, guided.step_ends)
            if row.forced is not None and not row.done and len(row.trace) >= len(row.forced):
                row.done, row.stop = True, "forced_end"
        if all(row.done for row in batch):
            break

        # Leave: finished rows leave the batch and the cache once they are LEAVE_AT of it.
        finished = sum(row.done for row in batch)
        if finished and finished >= LEAVE_AT * len(batch):
            keep = [r for r, row in enumerate(batch) if not row.done]
            kv.keep_rows(keep)
            batch, tokens, batch_at = [batch[r] for r in keep], [tokens[r] for r in keep], [batch_at[r] for r in keep]

        # Feed: close BT runs (rewind), then the new tokens through the model.
        kv.close_runs(batch, tokens, bt, rewind)
        logits = kv.feed(batch, tokens, bt, pad, track, rewind)

    return [row.generation("rewind" if rewind else "keep") for row in rows]


def emit(row: Row, token: int, bt: int | None, eos: set, max_new_tokens: int, guided: bool = False) -> None:
    """Record one emitted token: EOS stops; a BT pops the visible top (nothing if empty).
    `guided`: a verifier's BT, not counted by the loop guards."""
    if token in eos:
        row.done, row.stop = True, "eos"
        return
    row.trace.append(token)
    if token == bt:
        row.n_backtracks += 1
        row.guided_bts += guided
        row.banned_token = None
        erased_index = -1  # a BT with nothing visible erases nothing ("index -1")
        if row.visible:
            row.banned_token = row.visible.pop()
            row.n_erased += 1
            erased_index = len(row.visible)
        if not guided:
            row.erasures[erased_index] += 1
    else:
        row.visible.append(token)
        row.banned_token = None
    if len(row.trace) >= max_new_tokens:
        row.done, row.stop = True, "length"


def batch_sampling(sampling: Sampling, start: int) -> Sampling:
    """The sampling of the batch that starts at prompt `start`: a seed of its own, so that row r of one
    batch does not draw the same numbers as row r of the next (the n copies of a prompt that best-of-N
    lays out side by side gave only batch_size distinct samples)."""
    return dataclasses.replace(sampling, seed=sampling.seed * 100_003 + start)


def generate_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 160, batch_size: int = 64,
                  semantics: str | None = None, sampling: Sampling = Sampling(), guards: LoopGuards = LoopGuards(),
                  desc: str = "generating", verifier=None, guide: Guide = Guide(),
                  step_separator: str = "\n") -> list[Generation]:
    """Tokenize text prompts, generate in batches (progress bar), decode the visible text.

    The BT id comes from the tokenizer by name; semantics from the checkpoint unless given. With a
    `verifier`, decoding is guided (steps end at tokens holding `step_separator`).
    """
    from tqdm.auto import tqdm

    from halluc.core.tokens import backtrack_id, has_backtrack

    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    semantics = semantics_for(model, semantics, has_backtrack=bt is not None)
    model.eval()
    guided = None
    if verifier is not None:
        from halluc.objectives.verifier_head import step_end_ids

        guided = Guided(verifier, frozenset(step_end_ids(tokenizer, step_separator)), guide)
    # A prompt the model has no positions for is not generated from (stop "prompt_too_long",
    # empty output, scored wrong) instead of failing the whole evaluation; others in its batch
    # get at most the positions left.
    limit = getattr(model.config, "max_position_embeddings", None) or float("inf")
    out: list[Generation] = []
    too_long = 0
    bar = tqdm(total=len(prompts), desc=desc, leave=False)
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"] for p in prompts[i:i + batch_size]]
        fits = [len(x) < limit for x in ids]
        kept = [x for x, ok in zip(ids, fits) if ok]
        made = iter(generate(model, kept, max_new_tokens=int(min(max_new_tokens, limit - max(map(len, kept)))),
                             backtrack_id=bt, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, semantics=semantics, guards=guards, guided=guided,
                             sampling=batch_sampling(sampling, i)) if kept else [])
        batch = [next(made) if ok else Generation(trace=[], visible=[], prompt_len=len(x), stop="prompt_too_long",
                                                 semantics=semantics) for x, ok in zip(ids, fits)]
        too_long += fits.count(False)
        for g in batch:
            g.text = tokenizer.decode(g.visible, skip_special_tokens=True)
        out.extend(batch)
        bar.update(len(batch))
        bar.set_postfix(semantics=semantics, bt=sum(g.n_backtracks for g in out),
                        **({"guided": sum(g.n_guided for g in out)} if verifier is not None else {}))
    bar.close()
    if too_long:
        log.warning("%d of %d prompts are as long as the model's %d positions or longer: not generated "
                    "(stop=prompt_too_long, scored wrong)", too_long, len(prompts), limit)
    return out
