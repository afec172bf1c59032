"""The backtrack token: adding it, finding its id, and the tiny default tokenizer.

The origin project took the id from `tokenizer.encode(tok)[0]`, which is BOS on Llama-3, so
deletions never happened. Here the id is looked up by name and checked to be one dedicated id.
"""
from __future__ import annotations

import logging

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BACKTRACK_TOKEN = "<|BACKTRACK|>"
log = logging.getLogger(__name__)


def backtrack_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The BT token's id, checked: present, a single dedicated id, not another special token."""
    tid = tokenizer.convert_tokens_to_ids(BACKTRACK_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id or tid >= len(tokenizer):
        raise KeyError(f"{BACKTRACK_TOKEN} is not in the tokenizer's vocabulary")
    encoded = tokenizer.encode(BACKTRACK_TOKEN, add_special_tokens=False)
    if encoded != [tid]:
        raise ValueError(f"{BACKTRACK_TOKEN} encodes to {encoded}, not the single id {tid}")
    others = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    if tid in others:
        raise ValueError(f"{BACKTRACK_TOKEN} id {tid} collides with a bos/eos/pad id")
    return tid


def has_backtrack(tokenizer: PreTrainedTokenizerBase) -> bool:
    return BACKTRACK_TOKEN in tokenizer.get_vocab()


def add_backtrack_token(tokenizer: PreTrainedTokenizerBase, model=None) -> int:
    """Add <|BACKTRACK|> as an additional special token if missing; resize the model to match."""
    if not has_backtrack(tokenizer):
        tokenizer.add_special_tokens({"additional_special_tokens": [BACKTRACK_TOKEN]},
                                     replace_extra_special_tokens=False)
        log.info("tokenizer had no %s: added it as id %d", BACKTRACK_TOKEN, backtrack_id(tokenizer))
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        log.info("resized the model's embeddings from %d to %d rows", old, len(tokenizer))
    return backtrack_id(tokenizer)


SENTINEL = "\n"  # what continuation_ids encodes a piece after (its ids are then dropped)


def continuation_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """The ids of texts that continue earlier text (a step after the prompt, a completion after its
    prompt), each encoded on its own, without special tokens. A SentencePiece tokenizer in legacy mode
    (Llama-2, Mistral v0.1) starts every call at a word boundary, so each piece would begin with a
    space the text does not have ("May.\\n Natalia"): for such a tokenizer each piece is encoded after
    a newline whose ids are then dropped. Which kind a tokenizer is, is measured once and cached."""
    if not texts:
        return []
    def encode(pieces):
        return tokenizer(list(pieces), add_special_tokens=False, return_attention_mask=False)["input_ids"]

    if not _adds_a_word_boundary(tokenizer):
        return [list(ids) for ids in encode(texts)]
    head = list(encode([SENTINEL])[0])
    out = [list(ids[len(head):]) if list(ids[:len(head)]) == head else None
           for ids in encode([SENTINEL + t for t in texts])]
    # where the newline merged into the piece's first token, the piece alone is all there is
    return [ids if ids is not None else list(encode([t])[0]) for ids, t in zip(out, texts)]


def _adds_a_word_boundary(tokenizer) -> bool:
    """Whether encoding "a" then "b" separately decodes to something other than "ab" (a space between)."""
    cached = getattr(tokenizer, "_halluc_word_boundary", None)
    if cached is None:
        a, b = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("x=1", "y=2"))
        cached = tokenizer.decode(list(a) + list(b), skip_special_tokens=True) != "x=1y=2"
        try:
            tokenizer._halluc_word_boundary = cached
        except AttributeError:
            pass
        if cached:
            log.warning("this tokenizer starts every encoded text at a word boundary (SentencePiece legacy mode): "
                        "steps are encoded after a newline whose ids are dropped, so no step gains a space")
    return cached


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token (GPT-2, Llama, Mistral) one, and say which: its EOS
    (pad positions are never attended or trained, so any id works; EOS adds no new row)."""
    if tokenizer.pad_token_id is None:
        # any id works (pad positions are never attended or trained): EOS if there is one, else id 0
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None \
            else tokenizer.convert_ids_to_tokens(0)
        log.warning("the tokenizer has no pad token: padding with %s %r (id %d)",
                    "its EOS token" if tokenizer.eos_token is not None else "token", tokenizer.pad_token,
                    tokenizer.pad_token_id)
    return tokenizer


def load_tokenizer(path) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local folder, with a clear error when the folder holds no tokenizer,
    and a pad token chosen when it has none (`ensure_pad_token`)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Path(path)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    if folder.is_dir() and not any((folder / f).exists() for f in files):
        hint = ""
        if folder.name.startswith("checkpoint-"):
            hint = " (an intermediate checkpoint: the tokenizer is in the run's checkpoint/ or adapter/ folder)"
        raise FileNotFoundError(f"{path} holds no tokenizer files ({', '.join(files)}){hint}")
    return ensure_pad_token(AutoTokenizer.from_pretrained(path))


def train_tokenizer(texts, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` with digits split one by one (" 12" -> " 1", "2").

    All 256 bytes are in the alphabet, so any text encodes; merges above that learn the task.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)


def check_same_vocab(name: str, folder: str, tokenizer) -> None:
    """A model that reads the policy's token ids as they are (a PRM, a process-reward verifier) must have
    the policy's tokenizer."""
    if load_tokenizer(folder).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{name}={folder} has another tokenizer than the policy: it reads the policy's "
                         "token ids (use a model started from a checkpoint with the policy's tokenizer)")
