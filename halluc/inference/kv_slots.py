"""The shared KV cache of a generating batch, and which of its slots each row may attend: the
rewind policy of halluc.inference.generate.

Every row has its own edit history, so slots are not removed per row; instead each cache slot has a
per-row "alive" bit, which is the 2D attention mask the model gets (sdpa honours zeros in the middle
of a 2D mask; tests/test_generate.py checks it against one training forward). Under rewind a BT run
is fed token by token (each BT sees the error); the token after the run closes it: the erased
tokens' slots and the BTs' die, and that token is written at the rewound position (the position of
the first erased token = its depth in the edit tree). Slots dead in every row at the END of the
cache are cropped (`cache.crop(-n)`), so batch 1 always crops and never carries a hole: its mask
stays all ones and attention takes the same fast path as HF `generate()`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class KVSlots:
    model: object
    cache: DynamicCache
    alive: torch.Tensor   # alive[r, s]: row r may attend cache slot s (padding, filler, erased/BT slots are dead)
    length: int           # cache slots in use
    cache_arg: str        # the model's name for the cache argument

    @classmethod
    def prefill(cls, model, prompts: list[list[int]], pad: int, max_new_tokens: int) -> tuple[KVSlots, torch.Tensor]:
        """The prompts, left padded, through the model once: the slots and each row's next-token logits."""
        device = next(model.parameters()).device
        n, width = len(prompts), max(len(p) for p in prompts)
        alive = torch.zeros(n, width + max_new_tokens, dtype=torch.bool, device=device)
        ids = torch.full((n, width), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            alive[r, width - len(p):width] = True
        lengths = torch.tensor([len(p) for p in prompts])
        positions = (torch.arange(width)[None, :] - (width - lengths)[:, None]).clamp(min=0)
        kv = cls(model, DynamicCache(config=model.config), alive, width, _cache_kwarg(model))
        out = model(input_ids=ids.to(device), attention_mask=kv.mask(width), position_ids=positions.to(device),
                    use_cache=True, logits_to_keep=1, **{kv.cache_arg: kv.cache})
        return kv, out.logits[:, -1, :]

    def mask(self, length: int) -> torch.Tensor | None:
        """The 2D attention mask over `length` slots; None when nothing is dead (sdpa's fast path)."""
        window = self.alive[:, :length]
        return None if bool(window.all()) else window

    def keep_rows(self, keep: list[int]) -> None:
        """Only these rows stay in the batch and the cache (finished rows leave)."""
        self.cache.batch_select_indices(torch.tensor(keep, device=self.alive.device))
        self.alive = self.alive[keep]

    def close_runs(self, rows: list, tokens: list[int], bt: int | None, rewind: bool) -> None:
        """A normal token after a BT run closes the run: its slots and the erased tokens' slots die (an
        erasing verifier run: every slot of the row from the erased step on), and the new token goes to
        the rewound position. Then the slots no row attends at the end of the cache are cropped."""
        any_dead = False
        for r, row in enumerate(rows):
            if row.done:
                continue
            if tokens[r] != bt and row.dead_after_run:
                self.alive[r, row.dead_after_run] = False
                if row.erasing:  # the whole step as written leaves: the model's own BT runs inside it too
                    self.alive[r, row.erase_from_slot:self.length] = False
                row.dead_after_run.clear()
                row.next_pos = row.prompt_len + len(row.visible_slots) if rewind else row.rewound_pos
                any_dead = True
            if tokens[r] != bt:
                row.erasing = False
        if any_dead:
            self._crop_dead_tail()

    def feed(self, rows: list, tokens: list[int], bt: int | None, pad: int, track: bool, rewind: bool) -> torch.Tensor:
        """Every live row's new token into slot `length` (a finished row feeds a filler nobody attends);
        with `track`, where each visible token sits, and which slots a BT run will kill. Returns the
        next-token logits."""
        pos = [0] * len(rows)
        for r, row in enumerate(rows):
            if row.done:
                tokens[r] = pad
                continue
            if track and tokens[r] == bt:  # this BT's slot, and the slot of the token it erased
                dies = rewind or row.erasing
                if dies:
                    row.dead_after_run.append(self.length)
                if len(row.visible_slots) > len(row.visible):
                    slot, row.rewound_pos = row.visible_slots.pop(), row.visible_pos.pop()
                    if dies:
                        row.dead_after_run.append(slot)
            elif track:
                row.visible_slots.append(self.length)
                row.visible_pos.append(row.next_pos)
            self.alive[r, self.length] = True
            pos[r] = row.next_pos
            row.next_pos += 1
            row.forwards += 1
        device = self.alive.device
        out = self.model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=self.mask(self.length + 1),
                         position_ids=torch.tensor(pos, device=device)[:, None], use_cache=True,
                         **{self.cache_arg: self.cache})
        self.length += 1
        return out.logits[:, -1, :]

    def _crop_dead_tail(self) -> None:
        """Crop the trailing slots that no row attends (batch 1: all erased and BT slots)."""
        live = self.alive[:, :self.length].any(0).nonzero()
        keep = int(live[-1]) + 1 if len(live) else 0
        if keep < self.length:
            self.cache.crop(keep - self.length)  # those alive columns are already all False and get reused
        self.length = keep


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the cache argument `cache` (`past_key_values` warns); older: past_key_values.
    A PeftModel's forward takes **kwargs and hands them on: the wrapped model's signature decides."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
