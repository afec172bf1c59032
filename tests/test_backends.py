"""The three backends on a tiny random Llama: same logits, same loss, and the mask matters."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from halluc.structure.attention import edit_tree
from halluc.structure.backends import _targets, forward_loss, path_segments, unit_bounds
from halluc.core.example import IGNORE_INDEX, Role
from halluc.structure.packing import collate, layout_example, layout_two_branch, pack, pack_examples

BT = 3
VOCAB = 50


def tiny_llama(attn="sdpa", seed=0, dtype=torch.float32, device="cpu"):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def random_example(rng, n, n_prompt=4):
    """A trace with a few BT runs; labels: everything after the prompt except ERROR tokens."""
    roles = rng.choice([Role.KEPT, Role.ERROR, Role.BACKTRACK, Role.CORRECTION], size=n, p=[.55, .15, .2, .1])
    roles[:n_prompt] = Role.PROMPT
    roles[n_prompt] = Role.KEPT
    ids = rng.integers(4, VOCAB, size=n)
    ids[roles == Role.BACKTRACK] = BT
    labels = np.where((roles == Role.PROMPT) | (roles == Role.ERROR), IGNORE_INDEX, ids)
    return {"input_ids": ids, "labels": labels, "roles": roles}


def examples(seed=0, lengths=(20, 15, 30, 9, 25, 12)):
    rng = np.random.default_rng(seed)
    return [random_example(rng, n) for n in lengths]


def n_targets(batch):
    return len(_targets(batch)[0])


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_packed_equals_unpacked(model):
    exs = examples()
    packed = collate(pack_examples(exs, 64, positions="rewound").rows)
    loss_packed, logits_packed = forward_loss(model, packed, "dense", return_logits=True)
    assert logits_packed.shape[0] < len(exs)  # really packed

    total, count = 0.0, 0
    for ex in exs:
        one = collate(pack_examples([ex], 64, positions="rewound").rows)
        loss, logits = forward_loss(model, one, "dense", return_logits=True)
        total, count = total + loss.item() * n_targets(one), count + n_targets(one)
        # find the example in the packed batch by its ids
        hit = None
        for b, row in enumerate(packed["input_ids"]):
            for s in range(row.shape[0] - len(ex["input_ids"]) + 1):
                if torch.equal(row[s:s + len(ex["input_ids"])], torch.as_tensor(ex["input_ids"])):
                    hit = (b, s)
        b, s = hit
        torch.testing.assert_close(logits_packed[b, s:s + logits.shape[1]], logits[0], atol=1e-5, rtol=0)
    assert loss_packed.item() == pytest.approx(total / count, abs=1e-5)


def test_dense_sdpa_eager_varlen_agree(model):
    batch = collate(pack_examples(examples(1), 48, positions="original").rows)
    assert (~batch["is_real"]).any()  # padding is exercised
    real = batch["is_real"]
    model.set_attn_implementation("sdpa")
    ref_loss, ref = forward_loss(model, batch, "dense", return_logits=True)
    model.set_attn_implementation("eager")
    eager_loss, eager = forward_loss(model, batch, "dense", return_logits=True)
    assert torch.isfinite(ref).all() and torch.isfinite(eager).all()
    torch.testing.assert_close(eager[real], ref[real], atol=1e-5, rtol=0)
    assert abs(eager_loss.item() - ref_loss.item()) < 1e-5
    for backend in ("varlen", "varlen_kv", "dense_units"):
        var_loss, var = forward_loss(model, batch, backend, return_logits=True)
        torch.testing.assert_close(var[real], ref[real], atol=1e-5, rtol=0)
        assert abs(var_loss.item() - ref_loss.item()) < 1e-5
        # the loss without full logits (logits_to_keep) is the same number
        assert abs(forward_loss(model, batch, backend)[0].item() - ref_loss.item()) < 1e-5
    model.set_attn_implementation("sdpa")
    assert abs(forward_loss(model, batch, "dense")[0].item() - ref_loss.item()) < 1e-6


def test_loss_equals_hf_shift_loss_when_single_branch(model):
    batch = collate(pack_examples(examples(2), 64).rows)
    loss, logits = forward_loss(model, batch, "dense", return_logits=True)
    hf = model.loss_function(logits=logits, labels=batch["labels"], vocab_size=VOCAB)
    assert abs(loss.item() - hf.item()) < 1e-5


def test_path_decomposition_counts_each_token_once():
    batch = collate(pack_examples(examples(3), 40).rows)
    seg = path_segments(batch["attn_end"], batch["is_real"])
    real = batch["is_real"].reshape(-1)
    assert (seg.owner[real] >= 0).all() and (seg.owner[~real] == -1).all()
    assert len(set(seg.owner[real].tolist())) == int(real.sum())
    # varlen_kv: query segments cover the real tokens once, each the suffix of its path
    assert seg.q_cu[-1] == int(real.sum())
    qb, kb = seg.q_cu.tolist(), seg.kv_cu.tolist()
    for qs, qe, ks, ke in zip(qb, qb[1:], kb, kb[1:]):
        assert seg.kv_index[ke - (qe - qs):ke].tolist() == list(range(qs, qe))
    # every occurrence of a token is preceded in its segment by exactly its ancestors
    ends = batch["attn_end"].reshape(-1)
    length = batch["attn_end"].shape[1]
    cu = seg.kv_cu.tolist()
    for s, e in zip(cu, cu[1:]):
        path = seg.token_index[s:e]
        for i, t in enumerate(path.tolist()):
            b, q = divmod(t, length)
            ancestors = [b * length + k for k in range(q + 1) if ends[b * length + k] > q]
            assert path[: i + 1].tolist() == ancestors


def test_unit_bounds_split_examples_not_branches():
    exs = examples(3, lengths=(9, 7, 5))
    batch = collate(pack_examples(exs, 64).rows)
    assert unit_bounds(batch["attn_end"], batch["is_real"]) == [(0, 9), (9, 16), (16, 21)]
    prompt = {"input_ids": [5, 6]}
    branch = {"input_ids": [7, BT, 8], "labels": [7, BT, 8], "roles": [Role.ERROR, Role.BACKTRACK, Role.KEPT]}
    two = collate(pack([layout_two_branch(prompt, branch, branch)], 16).rows)
    assert unit_bounds(two["attn_end"], two["is_real"]) == [(0, 8)]


def test_two_branch_unit_equals_two_separate_sequences(model):
    rng = np.random.default_rng(4)
    prompt = {"input_ids": rng.integers(4, VOCAB, size=5)}
    chosen, rejected = (random_example(rng, n, n_prompt=0) for n in (9, 7))
    for br in (chosen, rejected):
        br["roles"][0] = Role.KEPT
    unit = layout_two_branch(prompt, chosen, rejected, positions="rewound")
    batch = collate(pack([unit], 32).rows)
    loss, logits = forward_loss(model, batch, "dense", return_logits=True)
    for backend in ("varlen", "varlen_kv", "dense_units"):
        assert abs(forward_loss(model, batch, backend)[0].item() - loss.item()) < 1e-5

    n_p, (a0, a1), (b0, b1) = 5, *unit.branches
    total, count = 0.0, 0
    for br, (s, e) in ((chosen, (a0, a1)), (rejected, (b0, b1))):
        alone = {"input_ids": np.concatenate([prompt["input_ids"], br["input_ids"]]),
                 "labels": np.concatenate([np.full(n_p, IGNORE_INDEX), br["labels"]]),
                 "roles": np.concatenate([np.zeros(n_p, dtype=int), br["roles"]])}
        one = collate(pack([layout_example(alone, positions="rewound")], 32).rows)
        l1, lg1 = forward_loss(model, one, "dense", return_logits=True)
        torch.testing.assert_close(logits[0, s:e], lg1[0, n_p:], atol=1e-5, rtol=0)
        total, count = total + l1.item() * n_targets(one), count + n_targets(one)
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_negative_control_causal_differs_on_corrections(model):
    ex = {"input_ids": np.array([5, 6, 7, 8, 20, 21, 22, BT, BT, 30, 31, 32]),
          "roles": np.array([0, 0, 0, 0, 1, 2, 2, 3, 3, 4, 1, 1])}
    ex["labels"] = np.where(ex["roles"] == 0, IGNORE_INDEX, ex["input_ids"])
    logits = {}
    for mode in ("causal", "block_errors"):
        batch = collate(pack_examples([ex], 16, mode=mode).rows)
        logits[mode] = forward_loss(model, batch, "dense", return_logits=True)[1][0]
    diff = (logits["causal"] - logits["block_errors"]).abs().amax(-1)
    assert diff[:9].max() < 1e-6          # up to the last BT both see the same
    assert diff[9:].min() > 1e-3          # corrections: the error is visible only under causal


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_rewound_positions_match_kv_cache_cropping(model):
    """Decoding with the cache cropped after each BT run = one training forward."""
    rng = np.random.default_rng(5)
    ex = random_example(rng, 24)
    batch = collate(pack_examples([ex], 32, positions="rewound").rows)
    train_logits = forward_loss(model, batch, "dense", return_logits=True)[1][0]
    roles, ids = ex["roles"], torch.as_tensor(ex["input_ids"])
    end, depth = edit_tree(roles)
    from transformers import DynamicCache

    cache = DynamicCache()
    for j in range(len(ids)):
        if j > 0 and roles[j - 1] == Role.BACKTRACK and roles[j] != Role.BACKTRACK:
            # crop the run's BTs and the tokens it erased (those whose subtree closed here)
            n_crop = int((end[:j] == j).sum())
            cache.crop(-n_crop)
        out = model(input_ids=ids[j:j + 1][None], position_ids=torch.tensor([[int(depth[j])]]),
                    past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits[0, 0], train_logits[j], atol=1e-5, rtol=0)


def test_flex_forward_on_cpu_matches_dense():
    """flex on CPU: forward only, compiled; the first compiled length is exact. A second
    length in the same process recompiles with dynamic shapes, which gave wrong values or
    crashed here, so shapes are kept static."""
    torch._dynamo.reset()
    model = tiny_llama()
    batch = collate(pack_examples(examples(6), 64).rows, pad_to=64)
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        ref_loss, ref = forward_loss(model, batch, "dense", return_logits=True)
        flex_loss, flex = forward_loss(model, batch, "flex", return_logits=True)
    real = batch["is_real"]
    torch.testing.assert_close(flex[real], ref[real], atol=1e-5, rtol=0)
    assert abs(flex_loss.item() - ref_loss.item()) < 1e-5


def toy_copy_example(rng):
    """Prompt: 4 digits; response: the digits copied, one replaced by an error then fixed."""
    digits = rng.integers(10, 20, size=4)
    wrong = int(rng.integers(0, 4))
    ids, roles = list(digits), [Role.PROMPT] * 4
    for i, d in enumerate(digits):
        if i == wrong:
            ids += [int(d) + 10, BT]
            roles += [Role.ERROR, Role.BACKTRACK]
        ids.append(int(d))
        roles.append(Role.CORRECTION if i == wrong else Role.KEPT)
    roles = np.array(roles)
    labels = np.where((roles == Role.PROMPT) | (roles == Role.ERROR), IGNORE_INDEX, ids)
    return {"input_ids": np.array(ids), "labels": labels, "roles": roles}


def test_short_training_run_loss_falls():
    model = tiny_llama(seed=1).train()
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        batch = collate(pack_examples([toy_copy_example(rng) for _ in range(16)], 64, positions="rewound").rows)
        loss, _ = forward_loss(model, batch, "dense")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


# ---------------------------------------------------------------- GPU only

def _gpu_batch(seed=7, length=256):
    rng = np.random.default_rng(seed)
    exs = [random_example(rng, int(n)) for n in rng.integers(20, 120, size=12)]
    return collate(pack_examples(exs, length, positions="rewound").rows, pad_to=length)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gpu_flex_and_units_forward_backward_match_dense(dtype, atol):
    batch = _gpu_batch()
    grads = {}
    for backend in ("dense", "flex", "dense_units"):
        model = tiny_llama(device="cuda", dtype=dtype).train()
        loss, _ = forward_loss(model, batch, backend)
        loss.backward()
        grads[backend] = (loss.item(), torch.cat([p.grad.float().reshape(-1) for p in model.parameters()]))
    scale = grads["dense"][1].abs().max()
    for backend in ("flex", "dense_units"):
        assert abs(grads[backend][0] - grads["dense"][0]) < atol
        assert (grads[backend][1] - grads["dense"][1]).abs().max() < atol * max(scale.item(), 1.0) * 10


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "varlen_kv"])
@pytest.mark.parametrize("kernel,dtype,atol", [("sdpa", torch.float32, 1e-4), ("torch", torch.bfloat16, 3e-2),
                                               ("flash_attn", torch.bfloat16, 3e-2)])
def test_gpu_varlen_matches_dense(backend, kernel, dtype, atol):
    if kernel == "flash_attn":
        pytest.importorskip("flash_attn")
    if kernel == "torch":
        pytest.importorskip("torch.nn.attention.varlen")
    batch = _gpu_batch()
    model = tiny_llama(device="cuda", dtype=dtype)
    ref_loss, ref = forward_loss(model, batch, "dense", return_logits=True)
    loss, logits = forward_loss(model, batch, backend, return_logits=True, varlen_kernel=kernel)
    real = batch["is_real"].cuda()
    assert (logits[real].float() - ref[real].float()).abs().max() < atol * 10
    assert abs(loss.item() - ref_loss.item()) < atol
    model.train()
    loss, _ = forward_loss(model, batch, backend, varlen_kernel=kernel)
    loss.backward()  # the kernel trains
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
