"""The tiny default model (built from a config in code) and technique 2, semantic initialisation."""
from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

# Words whose embeddings say "undo" in an ordinary vocabulary (used when they are single tokens).
BACKTRACK_WORDS = ("back", "undo", "delete", "erase", "remove", "wrong", "oops", "no", "sorry",
                   "Ġback", "Ġundo", "Ġdelete", "Ġerase", "Ġremove", "Ġwrong", "Ġno", "▁back",
                   "▁undo", "▁delete", "▁erase", "▁wrong", "▁no")


def tiny_llama(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4,
               max_positions: int = 512, init_range: float = 0.06, pad_token_id: int | None = None,
               eos_token_id: int | None = None) -> LlamaForCausalLM:
    """A small Llama; init_range 0.06 because 0.02 leaves the loss flat for ~600 steps (lab.md)."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_positions,
                         initializer_range=init_range, tie_word_embeddings=False,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


from halluc.core.inputs import check_model_path  # noqa: E402 (re-exported: where loaders look for it)


def load_causal_lm(path: str, dtype=torch.float32, attn_implementation: str = "sdpa"):
    check_model_path(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)


@torch.no_grad()
def init_backtrack_embedding(model, tokenizer, bt_id: int, method: str = "semantic",
                             words=BACKTRACK_WORDS, random_scale: float = 1.0) -> list[str]:
    """Set the BT row of the input embedding (and of the LM head when untied).

    semantic: mean of the rows of `words` that are single tokens in this vocabulary, else the
      mean of all the tokenizer's other rows (padding rows past len(tokenizer) left out) (Hewitt: the mean bounds how far the next-token distribution
      can move, whereas a random row can take near-all probability mass).
    mean: the mean of the tokenizer's other rows.
    random: normal rows with std `random_scale` (an ablation, and the negative control).
    Returns the words used (empty for a fallback to the mean).
    """
    vocab = tokenizer.get_vocab()
    used = [w for w in words if w in vocab and vocab[w] != bt_id] if method == "semantic" else []
    for matrix in _bt_matrices(model):
        if method == "random":
            matrix[bt_id] = torch.randn_like(matrix[bt_id]) * random_scale
        elif used:
            matrix[bt_id] = matrix[[vocab[w] for w in used]].mean(0)
        elif method in ("semantic", "mean"):
            # the tokenizer's rows only: a padded vocabulary (Qwen: 151,936 rows for 151,665 tokens) has
            # rows no token uses, never trained, which would pull the mean off the trained ones
            real = torch.arange(min(len(tokenizer), matrix.shape[0]), device=matrix.device)
            matrix[bt_id] = matrix[real[real != bt_id]].mean(0)
        else:
            raise ValueError(f"init method must be semantic, mean or random, not {method!r}")
    log.info("initialised the %s row (%s): %s", "BT", method,
             f"mean of {used}" if used else ("random" if method == "random" else "mean of the tokenizer's rows"))
    return used


def _bt_matrices(model) -> list[torch.Tensor]:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() == emb.data_ptr():
        return [emb.data]
    return [emb.data, out.weight.data]
