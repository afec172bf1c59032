"""Realizations of one `attn_end` structure as model forwards, all giving the same targets.

A batch (from halluc.structure.packing.collate) is a dict of (B, L) tensors:
    input_ids, labels (HF style, unshifted, -100 = not trained), attn_end, position_ids,
    pred_pos (which position's logits predict each token, -1 none), is_real (bool),
    unit_id / branch_id (which packed unit and which branch of it each token belongs to).
Never call `model(**batch)`: a Llama would silently ignore `attn_end`.

The model forward is separate from the loss. `forward_targets(model, batch, backend)` returns
`Targets`: the logits that predict each trained token (labels != -100), with the token's id,
unit and branch. Losses (halluc.core.losses) and objectives (halluc.training.train) work on that. The backend
is chosen ONCE per model with `use_backend` (it switches the model's attention function);
`forward_targets` only checks that the model is set up for it.

Backends:
- "native": the model's own causal kernel over right-padded rows (a 2D padding mask). Exact
  only for causal attention, original positions and one example per row; the fastest there.
- "dense": a (B, 1, L, L) mask as `attention_mask`; bool for sdpa, additive float for eager
  (eager ADDS the mask, so a bool mask would be silently wrong there). The CPU reference.
- "flex": a flex_attention BlockMask whose mask_mod reads `attn_end` (GPU training; on CPU
  flex is forward-only and compiled, see docs/attention.md).
- "varlen": path decomposition. Every root-to-leaf path of each tree becomes its own causal
  segment (shared prefixes are duplicated), all segments laid end to end in one row and run
  through a registered attention function: flash-attn's varlen kernel, else torch's
  varlen_attn (GPU, fp16/bf16), else block-diagonal causal sdpa, one call per segment
  (CPU, or fp32 on GPU), so the decomposition itself is tested on CPU. Each original token
  takes its logits from one occurrence (the first path that holds it); every occurrence
  has the same context (its ancestors), so which one does not matter.
- "varlen_kv": the same paths, but every token runs through the model once: a path's
  queries are only its new tokens (a suffix of the path) and its keys/values are gathered
  along the whole path inside the attention function (bottom-right causal, as flash kernels
  align it). Shared prefixes are repeated in K/V only, not in the MLPs, projections or logits.
- "dense_units": the real tokens run once, in order; each packed unit (an example, or a
  prompt with its branches) gets its own dense tree mask and one sdpa call. Block-diagonal
  like varlen, so no work across examples, and no duplication at all. Fastest on CPU.

Targets are gathered, not taken from HF's internal shift (which would predict a second
branch's first token from the wrong position). Only the logits that some target needs are
computed (`logits_to_keep`).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from halluc.structure.attention import dense_mask
from halluc.core.example import IGNORE_INDEX
from halluc.core.losses import token_cross_entropy

log = logging.getLogger(__name__)

BACKENDS = ("native", "dense", "dense_units", "flex", "varlen", "varlen_kv")
UNITS_ATTENTION = "halluc_units"  # name registered with transformers.AttentionInterface
VARLEN_ATTENTION = "halluc_varlen"  # likewise, for varlen / varlen_kv
# The attention implementation each backend runs the model with (None: whatever it has).
_ATTENTION_FOR = {"native": None, "dense": ("sdpa", "eager"), "flex": ("flex_attention",),
                  "varlen": (VARLEN_ATTENTION,), "varlen_kv": (VARLEN_ATTENTION,),
                  "dense_units": (UNITS_ATTENTION,)}


@dataclass
class Targets:
    """What one forward gives the losses: one entry per trained token (label != -100 and
    predicted by some position), in (row, column) order."""

    logits: torch.Tensor       # (N, V) the logits that predict each target (model dtype)
    ids: torch.Tensor          # (N,) the target token ids
    row: torch.Tensor          # (N,) batch row of each target token
    col: torch.Tensor          # (N,) its column
    unit: torch.Tensor         # (N,) packed unit (example or pair) it belongs to, over the batch
    branch: torch.Tensor       # (N,) branch within the unit (0; 1 for a pair's rejected branch)
    all_logits: torch.Tensor | None = None  # (B, L, V) at the original layout, if asked for

    @property
    def n_units(self) -> int:
        return int(self.unit.max()) + 1 if len(self.unit) else 0


class TargetModel:
    """A model with its backend chosen, as an objective sees it: `targets(batch)` runs the forward.

    `module` is what must be *called*: when the Trainer hands over a DeepSpeedEngine or DDP
    wrapper, its hooks gather ZeRO-3 shards and sync gradients. Attributes (config, device,
    dtype) come from `inner`, the model inside (a PeftModel forwards both itself).
    """

    def __init__(self, module, backend: str, inner=None):
        self.module, self.backend, self.inner = module, backend, module if inner is None else inner

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def targets(self, batch: dict, return_logits: bool = False) -> Targets:
        return forward_targets(self, batch, self.backend, return_logits)


# --------------------------------------------------------------------------- entry points

def choose_backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The tree backend to use on this device, with the reason logged (numbers: docs/attention.md).

    CPU: dense_units (no work across examples, no duplication; flex cannot train on CPU).
    GPU: flex (reads attn_end directly: block_errors costs ~1% over causal packing and the
    least memory); varlen_kv when flex_attention is missing.
    """
    device = torch.device(device)
    if device.type != "cuda":
        choice, why = "dense_units", "CPU: per-unit dense masks, fastest measured here"
    elif _flex_available():
        choice, why = "flex", "GPU: flex_attention reads attn_end directly, no duplicated tokens"
    else:
        choice, why = "varlen_kv", "GPU without flex_attention: path decomposition, queries once"
    log.info("attention backend %s (%s, %s)", choice, why, dtype)
    return choice


def use_backend(model, backend: str = "auto", device=None) -> str:
    """Set `model` up for `backend` once: resolve "auto" for `device` (default: where the model
    is), register our attention functions and switch the model's attention implementation
    (logged). Returns the backend's name."""
    if backend == "auto":
        backend = choose_backend(device or model.device, model.dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or auto, got {backend!r}")
    from transformers import AttentionInterface

    AttentionInterface.register(UNITS_ATTENTION, units_attention_forward)
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    wanted = _ATTENTION_FOR[backend]
    if wanted is not None and model.config._attn_implementation not in wanted:
        log.info("setting attn_implementation=%s (was %s) for backend %s", wanted[0],
                 model.config._attn_implementation, backend)
        model.set_attn_implementation(wanted[0])
    return backend


def forward_targets(model, batch: dict, backend: str, return_logits: bool = False,
                    varlen_kernel: str = "auto") -> Targets:
    """The logits that predict every trained token of `batch`, computed with `backend`.

    `model` must have been set up with `use_backend(model, backend)`. `varlen_kernel`
    ("auto", "flash_attn", "torch", "sdpa") forces the varlen kernel. With return_logits the
    (B, L, V) logits at the original positions come too (padding gets 0).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    wanted = _ATTENTION_FOR[backend]
    if wanted is not None and model.config._attn_implementation not in wanted:
        raise RuntimeError(f"backend {backend!r} needs attn_implementation in {wanted}, the model has "
                           f"{model.config._attn_implementation!r}: call halluc.structure.backends.use_backend(model, "
                           f"{backend!r}) once first")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    rows, cols, pos, ids = _targets(batch)
    if backend == "native":
        _check_plain_causal(batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["is_real"].long()}
        picked, logits = _logits_at(model, inputs, rows, pos, return_logits)
    elif backend == "dense":
        # eager adds the mask to the scores: it needs the additive float form.
        dtype = torch.bool if model.config._attn_implementation == "sdpa" else model.dtype
        inputs = {"input_ids": batch["input_ids"], "attention_mask": dense_mask(batch["attn_end"], dtype=dtype),
                  "position_ids": batch["position_ids"]}
        picked, logits = _logits_at(model, inputs, rows, pos, return_logits)
    elif backend == "flex":
        inputs = {"input_ids": batch["input_ids"], "attention_mask": flex_block_mask(batch["attn_end"]),
                  "position_ids": batch["position_ids"]}
        picked, logits = _logits_at(model, inputs, rows, pos, return_logits)
    elif backend in ("varlen", "varlen_kv"):
        picked, logits = _varlen_forward(model, batch, rows, pos, return_logits, varlen_kernel,
                                         queries_once=backend == "varlen_kv")
    else:  # dense_units
        picked, logits = _units_forward(model, batch, rows, pos, return_logits)
    unit = batch["unit_id"][rows, cols] if "unit_id" in batch else rows
    branch = batch["branch_id"][rows, cols].clamp(min=0) if "branch_id" in batch else torch.zeros_like(rows)
    return Targets(picked, ids, rows, cols, unit, branch, logits)


def forward_loss(model, batch: dict, backend: str = "auto", return_logits: bool = False,
                 varlen_kernel: str = "auto"):
    """(token cross-entropy, logits or None) of one batch: `use_backend` + `forward_targets` +
    `halluc.core.losses.token_cross_entropy`. For tests and benchmarks that switch backends on one
    model; training sets the backend up once (halluc.training.train)."""
    backend = use_backend(model, backend)
    t = forward_targets(model, batch, backend, return_logits, varlen_kernel)
    return token_cross_entropy(t.logits, t.ids), t.all_logits


def _check_plain_causal(batch: dict) -> None:
    """The native backend ignores attn_end, position_ids and pred_pos: refuse a batch where they
    say anything but one causal example per row (a second branch, packed units, a blocked error)."""
    real = batch["is_real"]
    n_rows, length = real.shape
    cols = torch.arange(length, device=real.device).expand(n_rows, length)
    lengths = real.sum(1, keepdim=True).expand(n_rows, length)
    plain = ((batch["attn_end"] == lengths) & (batch["position_ids"] == cols) & (batch["pred_pos"] == cols - 1))
    if not bool(plain[real].all()):
        raise ValueError("backend=native runs the model's own causal kernel, but this batch is not one causal "
                         "example per row (packed units, two branches, blocked errors or rewound positions): "
                         "use an edit-tree backend (backend=auto picks one)")


def _targets(batch: dict):
    """(row, column, predicting position, target id) of every trained token."""
    labels, pred = batch["labels"], batch["pred_pos"]
    rows, cols = torch.nonzero((labels != IGNORE_INDEX) & (pred >= 0), as_tuple=True)
    return rows, cols, pred[rows, cols], labels[rows, cols]


def _logits_at(model, inputs: dict, rows, flat_pos, return_logits: bool):
    """Run the model keeping only the logits at (rows, flat_pos) (positions along dim 1)."""
    if len(flat_pos) == 0:
        raise ValueError("batch has no trained token (all labels -100 or unpredictable)")
    if return_logits:
        logits = model(**inputs, use_cache=False).logits
        return logits[rows, flat_pos], logits
    keep = torch.unique(flat_pos)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return logits[rows, torch.searchsorted(keep, flat_pos)], None


# --------------------------------------------------------------------------- flex

def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(attn_end: torch.Tensor):
    """BlockMask of `attn_end` (B, L): query q attends key kv iff kv <= q < end[b, kv]."""
    from torch.nn.attention.flex_attention import create_block_mask

    n_rows, length = attn_end.shape

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q < attn_end[b, kv])

    return create_block_mask(mask_mod, n_rows, None, length, length, device=attn_end.device)


# --------------------------------------------------------------------------- varlen

@dataclass
class PathSegments:
    """The root-to-leaf paths of a batch. Segment i is the path to the i-th leaf.

    Two layouts share it. "varlen": every path is a causal segment of whole tokens, laid end
    to end (T tokens, prefixes repeated). "varlen_kv": the N real tokens run once, in order;
    segment i's queries are its path's new tokens (those after the previous leaf, always a
    suffix of the path) and its keys/values are gathered along the whole path.
    """

    real_index: torch.Tensor   # (N,) flat (B * L) index of every real token, in order
    q_cu: torch.Tensor         # (S + 1,) int32 query-segment bounds over the N real tokens
    kv_index: torch.Tensor     # (T,) index into the N real tokens of every path entry
    kv_cu: torch.Tensor        # (S + 1,) int32 path bounds over T
    max_q: int
    max_kv: int
    owner: torch.Tensor        # (B * L,) the path entry in T whose logits a token uses; -1 pad

    @property
    def token_index(self) -> torch.Tensor:
        """(T,) flat (B * L) index of every path entry (the "varlen" layout)."""
        return self.real_index[self.kv_index]


def path_segments(attn_end: torch.Tensor, is_real: torch.Tensor) -> PathSegments:
    """Decompose each tree into its root-to-leaf paths.

    A real token j is a leaf iff end[j] == j + 1; its path is its ancestors, {k <= j :
    end[k] > j}, in order. With no BT a packed example is one path (no duplication); each
    BT run adds a path that repeats the prefix before it.
    """
    ends = attn_end.cpu().numpy()
    real = is_real.cpu().numpy()
    n_rows, length = ends.shape
    real_flat = real.reshape(-1)
    rank = np.cumsum(real_flat) - 1          # flat index -> index among real tokens
    paths, q_lens = [], []
    owner = np.full(n_rows * length, -1, dtype=np.int64)
    total = 0
    idx = np.arange(length)
    for b in range(n_rows):
        end, prev_leaf = ends[b], -1
        for leaf in np.flatnonzero(real[b] & (end == idx + 1)):
            path = b * length + np.flatnonzero(end[: leaf + 1] > leaf)
            new = owner[path] < 0
            owner[path[new]] = total + np.flatnonzero(new)
            paths.append(rank[path])
            q_lens.append(leaf - prev_leaf)
            total += len(path)
            prev_leaf = leaf
    kv_lens = [len(p) for p in paths]
    device = attn_end.device

    def cu(lens):
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device)

    return PathSegments(
        real_index=torch.from_numpy(np.flatnonzero(real_flat)).to(device),
        q_cu=cu(q_lens), kv_index=torch.from_numpy(np.concatenate(paths)).to(device), kv_cu=cu(kv_lens),
        max_q=int(max(q_lens)), max_kv=int(max(kv_lens)), owner=torch.from_numpy(owner).to(device),
    )


def _varlen_forward(model, batch, rows, pos, return_logits, kernel="auto", queries_once=False):
    seg = path_segments(batch["attn_end"], batch["is_real"])
    if queries_once:  # each real token once; keys/values gathered along the paths
        tokens, where = _flat_real(batch)
        extra = {"cu_seq_lens_q": seg.q_cu, "cu_seq_lens_k": seg.kv_cu, "max_length_q": seg.max_q,
                 "max_length_k": seg.max_kv, "path_kv_index": seg.kv_index}
    else:  # every path as whole tokens, prefixes repeated
        tokens, where = seg.token_index, seg.owner
        extra = {"cu_seq_lens_q": seg.kv_cu, "cu_seq_lens_k": seg.kv_cu, "max_length_q": seg.max_kv,
                 "max_length_k": seg.max_kv}
    return _run_flat(model, batch, rows, pos, tokens, where, {**extra, "varlen_kernel_name": kernel}, return_logits)


def unit_bounds(attn_end: torch.Tensor, is_real: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of every packed unit, over the real tokens of the batch laid end to end.

    A unit starts at j when no earlier token of the row reaches past j (running max of end
    <= j): j has no ancestor, so it is the root of a new example.
    """
    ends, real = attn_end.cpu().numpy(), is_real.cpu().numpy()
    bounds, offset = [], 0
    for b in range(len(ends)):
        n = int(real[b].sum())
        reach = np.maximum.accumulate(ends[b, :n])
        starts = [0] + (np.flatnonzero(reach[:-1] <= np.arange(1, n)) + 1).tolist() + [n]
        bounds += [(offset + s, offset + e) for s, e in zip(starts, starts[1:])]
        offset += n
    return bounds


def _flat_real(batch):
    """The real tokens of the batch laid end to end, and where each (b, j) landed (-1 pad)."""
    n_rows, length = batch["input_ids"].shape
    tokens = torch.nonzero(batch["is_real"].reshape(-1), as_tuple=True)[0]
    where = torch.full((n_rows * length,), -1, dtype=torch.long, device=tokens.device)
    where[tokens] = torch.arange(len(tokens), device=tokens.device)
    return tokens, where


def _run_flat(model, batch, rows, pos, tokens, where, extra: dict, return_logits):
    """Forward the tokens `tokens` as one row; target logits and logits mapped back via `where`."""
    n_rows, length = batch["input_ids"].shape
    inputs = {
        "input_ids": batch["input_ids"].reshape(-1)[tokens][None],
        # Along a path "original" positions jump over erased tokens: the segment bounds
        # travel explicitly, HF's position-reset packing detection is never used.
        "position_ids": batch["position_ids"].reshape(-1)[tokens][None],
        **extra,
    }
    flat_pos = where[rows * length + pos]
    picked, logits = _logits_at(model, inputs, torch.zeros_like(rows), flat_pos, return_logits)
    if logits is not None:  # back to the original (B, L) layout; padded positions get 0
        logits = logits[0, where.clamp(min=0)].reshape(n_rows, length, -1) * (where >= 0).reshape(n_rows, length, 1)
    return picked, logits


def _units_forward(model, batch, rows, pos, return_logits):
    tokens, where = _flat_real(batch)
    bounds = unit_bounds(batch["attn_end"], batch["is_real"])
    flat_end = batch["attn_end"].reshape(-1)[tokens]
    # attn_end counts from the row start; a unit's mask wants it from the unit's first token
    length = batch["input_ids"].shape[1]
    first = (tokens[[s for s, _ in bounds]] % length).tolist()
    # A unit without BTs is plain causal: None lets sdpa take its is_causal fast path.
    masks = [None if bool((flat_end[s:e] - f == e - s).all()) else dense_mask(flat_end[s:e] - f)
             for (s, e), f in zip(bounds, first)]
    return _run_flat(model, batch, rows, pos, tokens, where, {"unit_bounds": bounds, "unit_masks": masks},
                     return_logits)


def units_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            unit_bounds=None, unit_masks=None, **kwargs):
    """Attention function: one sdpa call per unit with that unit's dense tree mask.

    query/key/value: (1, heads, N, head_dim). Returns (1, N, heads, head_dim), None.
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    drop = dropout if module.training else 0.0
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                    attn_mask=m, dropout_p=drop, is_causal=m is None,
                                                    scale=scaling)
                     for (s, e), m in zip(unit_bounds, unit_masks)], dim=2)
    return out.transpose(1, 2).contiguous(), None


_varlen_kernel_logged: set[str] = set()


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the flash kernels should run in. Under the Trainer's bf16/fp16 autocast the
    weights stay fp32 and rotary embeddings promote q/k back to fp32, so cast to the autocast
    dtype (as transformers' own flash-attention integration does) instead of falling back."""
    if query.is_cuda and query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return query.dtype


def varlen_kernel(query: torch.Tensor, requested: str = "auto") -> str:
    """Which kernel runs the segments: "flash_attn", "torch" or "sdpa" (per-segment loop)."""
    if requested != "auto":
        return requested
    if query.is_cuda and flash_dtype(query) in (torch.float16, torch.bfloat16):
        if _flash_attn_varlen() is not None:
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch"
    return "sdpa"  # CPU, or fp32 (the flash kernels take only fp16/bf16)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                             max_length_k=None, path_kv_index=None, varlen_kernel_name="auto", **kwargs):
    """Attention function for transformers.AttentionInterface: causal within each segment.

    query/key/value: (1, heads, N, head_dim). With `path_kv_index` (T,), keys/values are
    first gathered along the paths (T entries) and each query segment is the suffix of its
    key segment: causal masking is aligned bottom-right, as flash kernels do when
    seqlen_q < seqlen_k. Returns (1, N, heads, head_dim), None.
    """
    if cu_seq_lens_q is None:
        raise ValueError(f"{VARLEN_ATTENTION} needs cu_seq_lens_q/k and max_length_q/k")
    kernel = varlen_kernel(query, varlen_kernel_name)
    if kernel not in _varlen_kernel_logged:
        _varlen_kernel_logged.add(kernel)
        log.info("varlen attention kernel: %s (%s, %s)", kernel, query.device.type, flash_dtype(query))
    if path_kv_index is not None:
        key, value = key[:, :, path_kv_index], value[:, :, path_kv_index]
    n_rep = query.shape[1] // key.shape[1]
    drop = dropout if module.training else 0.0
    if kernel == "sdpa":
        # One sdpa call per segment (block-diagonal causal; no T x T mask over all segments).
        if n_rep > 1:
            key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
        qb, kb = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
        outs = []
        for qs, qe, ks, ke in zip(qb, qb[1:], kb, kb[1:]):
            nq, nk = qe - qs, ke - ks
            mask = None if nq == nk else torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril(nk - nq)
            outs.append(F.scaled_dot_product_attention(query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke],
                                                       attn_mask=mask, dropout_p=drop, is_causal=mask is None,
                                                       scale=scaling))
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None
    dtype = flash_dtype(query)
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # (tokens, heads, dim)
    if kernel == "flash_attn":
        out = _flash_attn_varlen()(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                                   dropout_p=drop, softmax_scale=scaling, causal=True)
    else:  # torch's varlen_attn: FlashAttention inside torch (>= 2.10)
        varlen_attn = _torch_varlen()
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        params = inspect.signature(varlen_attn).parameters
        # The causal flag changed between torch releases: is_causal (2.10/2.11), window_size (later).
        # Either way flash aligns it bottom-right when a query segment is shorter than its keys.
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                          scale=scaling, **causal)
    return out[None], None

