"""Which token a row emits next: the loop guards' bans, then greedy or a sample (the policies of
halluc.inference.generate that need no verifier)."""
from __future__ import annotations

import torch

from halluc.inference.decoding import LoopGuards, Sampling


def apply_guards(logits: torch.Tensor, rows: list, bt: int | None, guards: LoopGuards) -> torch.Tensor:
    """Logits with the loop guards applied (a copy only when something is banned): BT is banned for a
    row that used up its BTs or erased the visible top too often; with ban_erased_token, the token a
    BT just erased may not come straight back. A verifier's BTs do not count (they are not a loop)."""
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


def choose(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator,
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
        drop[..., 0] = False  # (top_p near 0 would drop it too, and an all -inf row samples token 0)
        sorted_logits[drop] = float("-inf")
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    probs = scaled.softmax(-1)
    # torch.multinomial(probs, 1) is argmax(probs / q), q ~ Exp(1) drawn for every entry (the same
    # numbers from the same generator state); drawn here for the whole batch, then this batch's rows
    n, rows = draws if draws is not None else (len(probs), None)
    q = torch.empty((n, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1, generator=rng)
    return (probs / (q if rows is None else q[rows])).argmax(-1)
