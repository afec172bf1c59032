"""Technique 2: a mean/semantic BT row barely moves the next-token distribution; a random one does."""
import copy

import torch

from halluc.sources.data import tokenize_problem
from halluc.core.model import init_backtrack_embedding, tiny_llama
from halluc.core.tokens import add_backtrack_token


def kl_after_adding_bt(lab_tokenizer, problems, method, tie=False):
    torch.manual_seed(0)
    tok = copy.deepcopy(lab_tokenizer)
    model = tiny_llama(len(tok), hidden=64, layers=2, heads=4)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    texts = [tokenize_problem(p, tok) for p in problems[:8]]
    ids = torch.tensor([(prompt + sum(steps, []))[:40] for prompt, steps in texts])
    with torch.no_grad():
        before = model(ids).logits.log_softmax(-1)
    bt = add_backtrack_token(tok, model)
    init_backtrack_embedding(model, tok, bt, method)
    with torch.no_grad():
        after = model(ids).logits.log_softmax(-1)
    # KL(p_before || p_after) over the old vocabulary (p_before puts no mass on BT)
    kl = (before.exp() * (before - after[..., :-1])).sum(-1).mean().item()
    return kl, after[..., bt].exp().mean().item()


def test_semantic_init_barely_moves_the_distribution(lab_tokenizer, arith_problems):
    kl_sem, p_sem = kl_after_adding_bt(lab_tokenizer, arith_problems, "semantic")
    kl_rand, p_rand = kl_after_adding_bt(lab_tokenizer, arith_problems, "random")
    vocab = len(lab_tokenizer) + 1
    assert kl_sem < 0.02 and p_sem < 5 / vocab, (kl_sem, p_sem)
    assert kl_rand > 0.2 and kl_rand > 20 * kl_sem, (kl_rand, kl_sem)  # the negative control


def test_tied_embeddings_get_one_row(lab_tokenizer, arith_problems):
    """A tied model stays tied when BT is added (one row serves as input and output) and that row is
    the init's mean. The KL alone could not tell: an untied head, or no init at all, passed it."""
    kl_sem, _ = kl_after_adding_bt(lab_tokenizer, arith_problems, "semantic", tie=True)
    assert kl_sem < 0.02
    tok = copy.deepcopy(lab_tokenizer)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    bt = add_backtrack_token(tok, model)
    used = init_backtrack_embedding(model, tok, bt, "semantic")
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() == out.data_ptr()
    want = emb[[tok.convert_tokens_to_ids(w) for w in used]].mean(0) if used else emb[:bt].mean(0)
    torch.testing.assert_close(emb[bt], want)
    assert emb[bt].abs().sum() > 0


def test_semantic_words_are_used_when_single_tokens(lab_tokenizer):
    tok = copy.deepcopy(lab_tokenizer)
    tok.add_tokens(["undo", "erase"])
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2)
    bt = add_backtrack_token(tok, model)
    used = init_backtrack_embedding(model, tok, bt, "semantic", words=("undo", "erase", "absent-word"))
    assert used == ["undo", "erase"]
    rows = [tok.convert_tokens_to_ids(w) for w in used]
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        torch.testing.assert_close(w[bt], w[rows].mean(0))
    assert not torch.allclose(model.get_input_embeddings().weight[bt],
                              model.get_input_embeddings().weight[:-1].mean(0))


def test_the_mean_leaves_out_the_padding_rows_of_a_padded_vocabulary(lab_tokenizer):
    """Models like Qwen have more embedding rows than tokens; those rows are never trained. The mean
    fallback averages the tokenizer's rows only. Negative control: the mean over every row differs."""
    tok = copy.deepcopy(lab_tokenizer)
    torch.manual_seed(0)
    model = tiny_llama(len(tok) + 8, hidden=32, layers=1, heads=2)  # 8 padding rows, room for the BT too
    bt = add_backtrack_token(tok, model)
    assert bt == len(tok) - 1 and model.get_input_embeddings().weight.shape[0] == len(tok) + 7
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[len(tok):] = 50.0  # untrained padding rows, far from the trained ones
    init_backtrack_embedding(model, tok, bt, "mean")
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        torch.testing.assert_close(w[bt], w[:bt].mean(0))
        every_other_row = torch.cat([w[:bt], w[bt + 1:]]).mean(0)
        assert (w[bt] - every_other_row).abs().max() > 1.0
