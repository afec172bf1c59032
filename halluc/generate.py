"""Generation with backtracking: batched, greedy or sampled, with KV-cache rewinding.

Two semantics, each the exact inference twin of a training mode (docs/generation.md):

- "keep"   (twin of `causal` attention + original positions): every token, erased or BT, stays
  in the KV cache; positions count every token. Only the visible output drops deleted tokens.
- "rewind" (twin of `block_errors` attention + rewound positions): a BT run is fed token by
  token (each BT sees the error), the next token is taken from the LAST BT's logits, then the
  erased tokens and the BTs leave the cache and the next token is written at the rewound
  position (the position of the first erased token = its depth in the edit tree).

Rewinding a batch: every row has its own edit history, so slots are not removed per row;
instead each cache slot has a per-row "alive" bit, which is the 2D attention mask the model
gets (sdpa honours zeros in the middle of a 2D mask; tests/test_generate.py checks it against
one training forward). Slots that are dead in every row at the END of the cache are cropped
(`cache.crop(-n)`), so batch 1 always crops and never carries a hole: its mask stays all ones
and attention takes the same fast path as HF `generate()`. Finished rows leave the batch and the
cache (`batch_select_indices`) once they are a quarter of it, so a long row does not drag them along.

The BT id is an argument (from `halluc.tokens.backtrack_id`, never `encode`); None means the
model has no BT and this is plain decoding.

Guided decoding (issue 12): with a `verifier` (halluc.verifiers: a PRM, the policy's verifier
head, or the task's oracle), every time a row ends a step (a token holding the step separator,
or EOS) the verifier scores the visible text so far; below `Guide.threshold`, and within
`Guide.budget`, the row emits a BT run that erases the step (whatever the model would have
written) and writes it again: greedy with a verbatim repeat of an erased version banned
(resample="ban": the token that would complete it is masked), or sampled at
`Guide.temperature` (resample="sample"). With `Guide.erase="rewind"` the erased step leaves the
KV cache whatever the semantics: every slot from its first token on dies (the model's own BT runs
inside it too) and the rewrite takes the erased step's positions, as if it had never been written;
the rewrite's first token is chosen from the logits the erased step's first token came from (the BT
run's own logits saw the erased step); the model's own BTs keep their semantics. `erase="keep"`
makes the run act as the model's own BTs: under keep the step and the BTs stay in context and
decoding continues from the last BT's logits (under rewind semantics they still rewind). A verifier's
BTs are not counted by the loop guards (those stop the model's own loops). Where the model's own BTs
erased into an earlier step after the current one began, the logits the step started from are gone:
that run then acts as the model's own BTs do under its semantics.
"""
from __future__ import annotations

import inspect
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from halluc.decoding import SEMANTICS, Guide, LoopGuards, Sampling  # noqa: F401  (re-exported)

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
    stop: str = ""                 # eos | length | forced_end | stop_token
    semantics: str = "keep"        # what it was generated with (rewind needs a BT id)
    text: str | None = None        # decoded visible text (generate_text fills it)
    logits: list[torch.Tensor] | None = None  # raw logits each emitted token was chosen from
    logprobs: list[float] | None = None  # log P(token) under those raw logits, per trace token (record_logprobs)
    n_guided: int = 0              # BT runs a verifier triggered (guided decoding)
    verifier_calls: int = 0        # step ends the verifier scored
    guided_at: list[int] = field(default_factory=list)  # trace index of each such run's first BT


@dataclass
class _Row:
    """Per-row bookkeeping of the loop (cache slots are per row, the cache is shared)."""

    prompt_len: int
    next_pos: int
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
    # guided decoding
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
             eos_token_id: int | list[int] | None, pad_token_id: int | None = None,
             semantics: str = "keep", sampling: Sampling = Sampling(), guards: LoopGuards = LoopGuards(),
             forced_tokens: list[list[int]] | None = None, force_backtrack_rate: float = 0.0,
             force_seed: int = 0, record_logits: bool = False, verifier=None, guide: Guide = Guide(),
             step_ends: set[int] | frozenset = frozenset(), stop_after: set[int] | frozenset = frozenset(),
             record_logprobs: bool = False) -> list[Generation]:
    """Generate from a batch of prompt token ids (left padded here); see the module docstring.

    forced_tokens: teacher forcing, row r emits forced_tokens[r] (whatever the model says) and
      stops when they run out; with record_logits the model's logits at every step are kept.
    force_backtrack_rate: after each emitted normal token, with this probability the next
      token is a BT (benchmarks; seeded by force_seed, overrides the loop guards).
    verifier, guide, step_ends: guided decoding (module docstring); `step_ends` are the ids of the
      tokens that end a step (halluc.verifier_head.step_end_ids), EOS ends the last one.
    stop_after: a row stops once it emits one of these tokens, which stays in its trace
      (stop="stop_token"; MCTS writes one step at a time with the step-end ids).
    record_logprobs: keep log P(token) of every trace token under the model's raw logits.
    """
    if verifier is not None and backtrack_id is None:
        raise ValueError("guided decoding erases steps with BTs: the model needs a BT id")
    if verifier is not None and not step_ends:
        raise ValueError("guided decoding needs step_ends, the ids of the tokens that end a step")
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else 0
    bt = backtrack_id
    rewind = semantics == "rewind" and bt is not None
    track = rewind or verifier is not None  # slots and positions of the visible tokens
    n, width = len(prompts), max(len(p) for p in prompts)
    force_rng = random.Random(force_seed)
    sample_rng = torch.Generator(device=device).manual_seed(sampling.seed)

    # alive[r, s]: row r may attend cache slot s (padding, finished rows' filler and, when
    # rewinding, erased/BT slots are dead). It is the 2D attention mask.
    alive = torch.zeros(n, width + max_new_tokens, dtype=torch.bool, device=device)
    ids = torch.full((n, width), pad, dtype=torch.long)
    rows = []
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        alive[r, width - len(p):width] = True
        rows.append(_Row(prompt_len=len(p), next_pos=len(p), forwards=len(p),
                         logits=[] if record_logits else None, logprobs=[] if record_logprobs else None))
    positions = (torch.arange(width)[None, :] - (width - torch.tensor([len(p) for p in prompts]))[:, None]).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_arg = {_cache_kwarg(model): cache}
    out = model(input_ids=ids.to(device), attention_mask=_mask(alive, width), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=1, **cache_arg)
    slots = width  # cache length

    # the rows still generating, in cache order: a finished row leaves (batch_select_indices)
    batch, batch_prompts, batch_forced, batch_at = list(rows), prompts, forced_tokens, list(range(n))
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]
        if verifier is not None:  # after an erasing run, the rewrite starts from the clean prefix's logits
            restart = [r for r, row in enumerate(batch) if not row.done and row.erasing and not row.forced_bts
                       and row.trace and row.trace[-1] == bt]
            if restart:
                logits = logits.clone()
                for r in restart:  # never a BT first: that would erase the clean prefix
                    logits[r] = batch[r].step_logits
                    logits[r, bt] = float("-inf")
        guarded = _guarded(logits, batch, bt, guards)
        forced = set()
        if verifier is not None:
            tokens = _choose_guided(guarded, batch, sampling, guide, step_ends, sample_rng, (n, batch_at))
            forced = _steer(verifier, guide, batch, tokens, batch_prompts, bt, eos, step_ends)
        else:
            tokens = _choose(guarded, sampling, sample_rng, (n, batch_at)).tolist()

        # Emit: forced tokens, forced BTs, then the visible bookkeeping of each row.
        logprobs = torch.log_softmax(logits.float(), dim=-1) if record_logprobs else None
        for r, row in enumerate(batch):
            if row.done:
                continue
            if forced_tokens is not None:
                if step >= len(batch_forced[r]):
                    row.done, row.stop = True, "forced_end"
                    continue
                tokens[r] = batch_forced[r][step]
            elif bt is not None and force_backtrack_rate > 0 and row.trace and row.trace[-1] != bt \
                    and force_rng.random() < force_backtrack_rate:
                tokens[r] = bt
            if record_logits:
                row.logits.append(logits[r].float().cpu().clone())
            if verifier is not None and tokens[r] != bt and (not row.visible or row.visible[-1] in step_ends):
                row.step_logits = logits[r].clone()  # what a step erased later is rewritten from
                row.step_logits_at = len(row.visible)
            emitted = len(row.trace)
            _emit(row, tokens[r], bt, eos, max_new_tokens, guided=r in forced)
            if len(row.trace) > emitted:
                if record_logprobs:
                    row.logprobs.append(float(logprobs[r, tokens[r]]))
                if tokens[r] in stop_after and not row.done:
                    row.done, row.stop = True, "stop_token"
            if row.resample_from is not None and tokens[r] != bt and tokens[r] in step_ends and not row.forced_bts:
                row.resample_from = None
            if forced_tokens is not None and not row.done and len(row.trace) >= len(batch_forced[r]):
                row.done, row.stop = True, "forced_end"
        if all(row.done for row in batch):
            break
        finished = sum(row.done for row in batch)
        if finished and finished >= LEAVE_AT * len(batch):  # finished rows leave the batch and the cache
            keep = [r for r, row in enumerate(batch) if not row.done]
            cache.batch_select_indices(torch.tensor(keep, device=device))
            alive = alive[keep]
            batch, tokens, batch_at = [batch[r] for r in keep], [tokens[r] for r in keep], [batch_at[r] for r in keep]
            batch_prompts = [batch_prompts[r] for r in keep]
            batch_forced = None if forced_tokens is None else [batch_forced[r] for r in keep]

        # Rewind: a normal token after a BT run closes the run; its slots and the erased
        # tokens' slots die, and the new token goes to the rewound position.
        any_dead = False
        for r, row in enumerate(batch):
            if row.done:
                continue
            if tokens[r] != bt and row.dead_after_run:
                alive[r, row.dead_after_run] = False
                if row.erasing:  # the whole step as written leaves: the model's own BT runs inside it too
                    alive[r, row.erase_from_slot:slots] = False
                row.dead_after_run.clear()
                row.next_pos = row.prompt_len + len(row.visible_slots) if rewind else row.rewound_pos
                any_dead = True
            if tokens[r] != bt:
                row.erasing = False
        if any_dead:
            slots = _crop_dead_tail(cache, alive, slots)

        # Feed: every live row's new token takes slot `slots`.
        pos = [0] * len(batch)
        for r, row in enumerate(batch):
            if row.done:
                tokens[r] = pad  # a filler query nobody attends to
                continue
            if track and tokens[r] == bt:  # this BT's slot, and the slot of the token it erased
                dies = rewind or row.erasing
                if dies:
                    row.dead_after_run.append(slots)
                if len(row.visible_slots) > len(row.visible):
                    slot, row.rewound_pos = row.visible_slots.pop(), row.visible_pos.pop()
                    if dies:
                        row.dead_after_run.append(slot)
            elif track:
                row.visible_slots.append(slots)
                row.visible_pos.append(row.next_pos)
            alive[r, slots] = True
            pos[r] = row.next_pos
            row.next_pos += 1
            row.forwards += 1
        out = model(input_ids=torch.tensor(tokens, device=device)[:, None],
                    attention_mask=_mask(alive, slots + 1),
                    position_ids=torch.tensor(pos, device=device)[:, None], use_cache=True, **cache_arg)
        slots += 1

    return [Generation(trace=row.trace, visible=row.visible, prompt_len=row.prompt_len,
                       n_backtracks=row.n_backtracks, n_erased=row.n_erased, token_forwards=row.forwards,
                       stop=row.stop or "length", semantics="rewind" if rewind else "keep", logits=row.logits,
                       logprobs=row.logprobs, n_guided=row.guided, verifier_calls=row.verifier_calls, guided_at=row.guided_at)
            for row in rows]


def _choose_guided(logits: torch.Tensor, rows: list[_Row], sampling: Sampling, guide: Guide, step_ends,
                   rng: torch.Generator, draws: tuple[int, list[int]] | None = None) -> list[int]:
    """The next tokens when a verifier guides: rows rewriting an erased step are resampled
    (temperature) or have a verbatim repeat of an erased version banned; the rest as usual."""
    rewriting = [r for r, row in enumerate(rows) if not row.done and row.resample_from is not None]
    if rewriting and guide.resample == "ban":
        banned = [(r, t) for r in rewriting for t in _repeat_completions(rows[r], step_ends)]
        if banned:
            logits = logits.clone()
            logits[[r for r, _ in banned], [t for _, t in banned]] = float("-inf")
    tokens = _choose(logits, sampling, rng, draws)
    if rewriting and guide.resample == "sample":
        hot = Sampling(guide.temperature, sampling.top_p, sampling.seed)
        tokens[rewriting] = _choose(logits[rewriting], hot, rng)
    return tokens.tolist()


def _repeat_completions(row: _Row, step_ends) -> list[int]:
    """Tokens that would complete a verbatim repeat of an erased version of the step being rewritten
    (its last token before the separator, or its last token)."""
    written = row.visible[row.resample_from:]
    out = []
    for erased in row.erased_steps.get(row.resample_from, []):
        content = erased[:-1] if len(erased) > 1 and erased[-1] in step_ends else erased
        if written == content[:-1]:
            out.append(content[-1])
    return out


def _steer(verifier, guide: Guide, rows: list[_Row], tokens: list[int], prompts, bt: int, eos: set,
           step_ends) -> set[int]:
    """Guided decoding's decisions for this step, written into `tokens`: continue a verifier's BT
    run; at a step end, score the visible text and start a BT run over the step if it is too low.
    Returns the rows whose token is a verifier's BT."""
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
    scores = verifier([(prompts[r], rows[r].visible) for r in ask], ask)
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


def _emit(row: _Row, token: int, bt: int | None, eos: set, max_new_tokens: int, guided: bool = False) -> None:
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


def _guarded(logits: torch.Tensor, rows: list[_Row], bt: int | None, guards: LoopGuards) -> torch.Tensor:
    """Logits with the loop guards applied (a copy only when something is banned)."""
    if bt is None:
        return logits
    bt_rows, erased_rows, erased_tokens = [], [], []
    for r, row in enumerate(rows):
        if row.done:
            continue
        top = len(row.visible) - 1  # the visible index the next BT would erase (-1: none)
        if (row.n_backtracks - row.guided_bts >= guards.max_backtracks
                or row.erasures[top] >= guards.max_backtracks_per_position):
            bt_rows.append(r)
        if guards.ban_erased_token and row.banned_token is not None:
            erased_rows.append(r)
            erased_tokens.append(row.banned_token)
    if not bt_rows and not erased_rows:
        return logits
    logits = logits.clone()
    if bt_rows:
        logits[bt_rows, bt] = float("-inf")
    if erased_rows:
        logits[erased_rows, erased_tokens] = float("-inf")
    return logits


def _choose(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator,
            draws: tuple[int, list[int]] | None = None) -> torch.Tensor:
    """Greedy, or a sample of softmax(logits / T) (top-p). `draws` = (rows of the whole batch, the rows
    these logits are): the random numbers are drawn for the whole batch and these rows take theirs,
    so a row samples the same whether finished rows have left the batch or not."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        sorted_logits[drop] = float("-inf")
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    probs = scaled.softmax(-1)
    # torch.multinomial(probs, 1) is argmax(probs / q), q ~ Exp(1) drawn for every entry (the same
    # numbers from the same generator state); drawn here for the whole batch, then this batch's rows
    n, rows = draws if draws is not None else (len(probs), None)
    q = torch.empty((n, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1, generator=rng)
    return (probs / (q if rows is None else q[rows])).argmax(-1)


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the cache argument `cache` (`past_key_values` warns); older: past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _mask(alive: torch.Tensor, length: int) -> torch.Tensor | None:
    """The 2D attention mask over `length` slots; None when nothing is dead (sdpa's fast path)."""
    window = alive[:, :length]
    return None if bool(window.all()) else window


def _crop_dead_tail(cache: DynamicCache, alive: torch.Tensor, slots: int) -> int:
    """Crop the trailing slots that no row attends (batch 1: all erased and BT slots)."""
    live = alive[:, :slots].any(0).nonzero()
    keep = int(live[-1]) + 1 if len(live) else 0
    if keep < slots:
        cache.crop(keep - slots)  # those alive columns are already all False and get reused
    return keep


def generate_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 160, batch_size: int = 64,
                  semantics: str | None = None, sampling: Sampling = Sampling(), guards: LoopGuards = LoopGuards(),
                  desc: str = "generating", verifier=None, guide: Guide = Guide(),
                  step_separator: str = "\n") -> list[Generation]:
    """Tokenize text prompts, generate in batches (progress bar), decode the visible text.

    The BT id comes from the tokenizer by name; semantics from the checkpoint unless given. With a
    `verifier`, decoding is guided (steps end at tokens holding `step_separator`).
    """
    from tqdm.auto import tqdm

    from halluc.tokens import backtrack_id, has_backtrack

    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    semantics = semantics_for(model, semantics, has_backtrack=bt is not None)
    model.eval()
    step_ends = frozenset()
    if verifier is not None:
        from halluc.verifier_head import step_end_ids

        step_ends = frozenset(step_end_ids(tokenizer, step_separator))
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
                             pad_token_id=tokenizer.pad_token_id, semantics=semantics, sampling=sampling,
                             guards=guards, verifier=verifier, guide=guide, step_ends=step_ends) if kept else [])
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
