"""Benchmark of the attn_end structure and its backends; prints one table of ratios.

    python benchmarks/attention.py                    # CPU: L = 512, 2048 (~1-2 min, 2 cores)
    python benchmarks/attention.py --long             # adds L = 8192
    python benchmarks/attention.py --device cuda      # GPU: bf16, bigger model, L up to 8192

Everything compared is measured side by side in this process, repeated, median taken
(the machines are noisy). Rows:
- build: edit_tree for one L-token trace vs a naive per-element Python double loop that
  decides every (q, k) from the roles (the seed's style), and each backend's own
  materialization (dense mask, flex BlockMask, varlen path segments) of a packed batch.
- step: forward+backward of a small Llama on a packed batch, block_errors vs plain causal
  packing (same examples, same layout, same backend), plus peak memory on CUDA.
- packing: real-token fraction of best-fit-decreasing packing on synthetic lengths.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


from halluc.structure.attention import dense_mask, edit_tree
from halluc.structure.backends import flex_block_mask, forward_loss, path_segments
from halluc.core.example import IGNORE_INDEX, Role
from halluc.structure.packing import collate, layout_example, pack, pack_examples

BT = 3


def naive_mask(roles) -> torch.Tensor:
    """The seed's style: simulate the edits, then decide every (q, k) in a Python loop."""
    n = len(roles)
    floor = 0
    while floor < n and roles[floor] == Role.PROMPT:
        floor += 1
    hidden_from = [n] * n  # first normal token after the BT run that erased k (or k's run)
    stack, pending = [], []
    for j, r in enumerate(roles):
        if r == Role.BACKTRACK:
            if len(stack) > floor:
                pending.append(stack.pop())
            pending.append(j)
        else:
            for k in pending:
                hidden_from[k] = j
            pending = []
            stack.append(j)
    rows = [[k <= q < hidden_from[k] for k in range(n)] for q in range(n)]
    return torch.tensor(rows)


def synthetic_example(rng, n: int, n_prompt: int = 32, bt_every: int = 100) -> dict:
    """A trace with a BT run (1-3 errors, as many BTs) about every `bt_every` tokens."""
    roles = [Role.PROMPT] * n_prompt
    while len(roles) < n:
        roles += [Role.KEPT] * int(rng.integers(bt_every // 2, bt_every * 3 // 2))
        k = int(rng.integers(1, 4))
        roles += [Role.ERROR] * k + [Role.BACKTRACK] * k + [Role.CORRECTION] * k
    roles = np.array(roles[:n])
    ids = rng.integers(4, 1000, size=n)
    ids[roles == Role.BACKTRACK] = BT
    labels = np.where((roles == Role.PROMPT) | (roles == Role.ERROR), IGNORE_INDEX, ids)
    return {"input_ids": ids, "labels": labels, "roles": roles}


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def packed_batch(rng, length: int, n_rows: int, mode: str) -> dict:
    exs, total = [], 0
    while total < length * n_rows * 1.2:
        # examples of 64..1024 tokens whatever the row length: longer rows pack more of them
        exs.append(synthetic_example(rng, int(rng.integers(min(64, length // 8), min(1024, length // 2)))))
        total += len(exs[-1]["input_ids"])
    rows = pack_examples(exs, length, mode=mode, positions="original").rows[:n_rows]
    return collate(rows, pad_to=length)


def build_rows(length: int, device: str, long_naive: bool) -> list[tuple]:
    rng = np.random.default_rng(0)
    trace = synthetic_example(rng, length)["roles"]
    ours = median_time(lambda: edit_tree(trace), 20)
    if length <= 2048 or long_naive:
        t = time.perf_counter()
        naive = naive_mask(trace)
        naive_s, note = time.perf_counter() - t, ""
        end, _ = edit_tree(trace)
        assert torch.equal(naive, dense_mask(end)), "naive baseline disagrees with edit_tree"
    else:  # quadratic: extrapolate from 2048 instead of spending a minute
        t = time.perf_counter()
        naive_mask(trace[:2048])
        naive_s, note = (time.perf_counter() - t) * (length / 2048) ** 2, " (est.)"
    out = [(f"build L={length}", "edit_tree (1 trace)", f"{ours * 1e3:.3f} ms",
            f"naive {naive_s * 1e3:.0f} ms{note}", f"{naive_s / ours:.0f}x faster")]
    batch = packed_batch(rng, length, 1, "block_errors")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    end = batch["attn_end"].to(device)
    mats = {
        "dense_mask": lambda: dense_mask(end),
        "path_segments": lambda: path_segments(end, batch["is_real"]),
    }
    if device == "cuda":
        mats["flex BlockMask"] = lambda: flex_block_mask(end)
    for name, fn in mats.items():
        out.append((f"build L={length}", f"{name} (1 row)", f"{median_time(fn, 5, sync) * 1e3:.2f} ms", "", ""))
    return out


def step_rows(length: int, n_rows: int, device: str, backends: list[str], repeats: int) -> list[tuple]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if device == "cuda":
        dims = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000)
        dtype = torch.bfloat16
    else:
        dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=1000)
        dtype = torch.float32
    cfg = LlamaConfig(max_position_embeddings=max(length, 4096), attn_implementation="sdpa", **dims)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()
    batches = {mode: packed_batch(np.random.default_rng(1), length, n_rows, mode) for mode in ("causal", "block_errors")}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(backend, mode):
        model.zero_grad(set_to_none=True)
        if backend.startswith("dense-"):
            model.set_attn_implementation(backend.split("-")[1])
            loss, _ = forward_loss(model, batches[mode], "dense")
        elif backend == "plain-causal":  # no mask at all: HF's is_causal fast path
            b = {k: v.to(device) for k, v in batches[mode].items()}
            model.set_attn_implementation("sdpa")
            loss = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss
        else:
            loss, _ = forward_loss(model, batches[mode], backend)
        loss.backward()

    def timed(backend, mode):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        step(backend, mode)
        sync()
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)

    out = []
    for backend in backends:
        modes = ("causal",) if backend == "plain-causal" else ("causal", "block_errors")
        for mode in modes:  # warm-up (and compile, for flex)
            step(backend, mode)
        sync()
        t = {m: [] for m in modes}
        mem = {}
        for _ in range(repeats):  # alternate the modes so noise hits both alike
            for mode in modes:
                dt, mem[mode] = timed(backend, mode)
                t[mode].append(dt)
        t = {m: statistics.median(v) for m, v in t.items()}
        what = f"step L={length} B={n_rows}"
        if backend == "plain-causal":
            out.append((what, "plain causal, no mask", f"{t['causal'] * 1e3:.1f} ms",
                        f"mem {mem['causal']:.2f} GiB" if mem["causal"] else "", "attends across examples"))
            continue
        mem_txt = f"mem {mem['block_errors']:.2f}/{mem['causal']:.2f} GiB" if device == "cuda" else "mem n/a (CPU)"
        extra = ""
        if backend.startswith("varlen"):
            b = batches["block_errors"]
            dup = len(path_segments(b["attn_end"], b["is_real"]).kv_index) / int(b["is_real"].sum())
            extra = f" (paths: {dup:.2f}x the tokens{' in K/V' if backend == 'varlen_kv' else ''})"
        out.append((what, backend, f"causal {t['causal'] * 1e3:.1f} ms, block {t['block_errors'] * 1e3:.1f} ms",
                    mem_txt, f"block/causal {t['block_errors'] / t['causal']:.3f}{extra}"))
    return out


def packing_rows() -> list[tuple]:
    rng = np.random.default_rng(2)
    exs = [synthetic_example(rng, int(n)) for n in np.clip(rng.lognormal(5.5, 0.7, size=2000), 40, 2048)]
    layouts = [layout_example(e) for e in exs]
    t = time.perf_counter()
    res = pack(layouts, 2048)
    dt = time.perf_counter() - t
    return [("packing L=2048", f"{res.n_units} examples -> {len(res.rows)} rows",
             f"{res.real_fraction * 100:.1f}% real tokens", f"dropped {res.n_dropped}", f"pack {dt * 1e3:.0f} ms")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--long", action="store_true", help="add L=8192 (always on for cuda)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 by default: on 2 shared cores, 2 threads thrash (10x slower steps)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    lengths = ([2048, 8192] if cuda else [512, 2048] + ([8192] if args.long else []))
    repeats = args.repeats or (10 if cuda else 5)
    backends = (["dense-sdpa", "dense_units", "flex", "varlen", "varlen_kv", "plain-causal"] if cuda
                else ["dense-sdpa", "dense-eager", "dense_units", "varlen", "varlen_kv"])
    rows_per = {512: 2, 2048: 8 if cuda else 1, 8192: 2 if cuda else 1}
    table = [("what", "backend / item", "time", "baseline / memory", "ratio")]

    def add(rows):  # print as we go, so a run cut short still shows what it measured
        for r in rows:
            print(" | ".join(r), flush=True)
        table.extend(rows)

    for length in lengths:
        add(build_rows(length, args.device, long_naive=False))
    for length in lengths:
        bk = ["dense-sdpa", "dense_units", "varlen_kv"] if not cuda and length > 2048 else backends
        add(step_rows(length, rows_per[length], args.device, bk, repeats))
    add(packing_rows())
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n# benchmarks/attention.py on {dev}, torch {torch.__version__}")
    for r in table:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
