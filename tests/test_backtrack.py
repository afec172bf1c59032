"""apply_backtrack semantics and the BT token id (looked up by name, never encode()[0])."""
import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers.processors import TemplateProcessing

from halluc import apply_backtrack
from halluc.core.tokens import BACKTRACK_TOKEN, add_backtrack_token, backtrack_id

BT = 0
seqs = st.lists(st.integers(0, 5), max_size=40)  # 0 is the BT id here


def reference(ids):
    """The obvious string-editor version: a cursor at the end, BT = backspace."""
    text = ""
    for t in ids:
        text = text[:-1] if t == BT else text + chr(ord("a") + t)
    return [ord(c) - ord("a") for c in text]


@given(seqs)
def test_matches_backspace_editor(ids):
    assert apply_backtrack(ids, BT) == reference(ids)


@given(seqs, seqs)
def test_prefix_can_be_applied_first(a, b):
    assert apply_backtrack(a + b, BT) == apply_backtrack(apply_backtrack(a, BT) + b, BT)


@given(seqs, st.integers(1, 5))
def test_token_then_bt_is_a_no_op(a, t):
    assert apply_backtrack(a + [t, BT], BT) == apply_backtrack(a, BT)


@given(st.integers(0, 10))
def test_bt_on_nothing_deletes_nothing(n):
    assert apply_backtrack([BT] * n + [3], BT) == [3]


def test_examples():
    assert apply_backtrack([1, 2, 9, BT, 3], BT) == [1, 2, 3]
    assert apply_backtrack([1, BT, BT, 2], BT) == [2]


def test_bt_id_is_looked_up_by_name_not_from_encode(lab_tokenizer):
    """A tokenizer that prepends BOS (like Llama-3): encode(tok)[0] is BOS, not the BT id."""
    tok = copy.deepcopy(lab_tokenizer)
    tok.add_special_tokens({"bos_token": "<|begin|>"})
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", tok.bos_token_id)])
    bt = add_backtrack_token(tok)
    assert tok.encode(BACKTRACK_TOKEN)[0] == tok.bos_token_id != bt  # the origin project's bug
    assert tok.convert_ids_to_tokens(bt) == BACKTRACK_TOKEN
    assert tok.encode(BACKTRACK_TOKEN, add_special_tokens=False) == [bt]
    assert bt not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_missing_bt_is_an_error(lab_tokenizer):
    with pytest.raises(KeyError, match="BACKTRACK"):
        backtrack_id(lab_tokenizer)


def test_adding_twice_keeps_one_id(lab_tokenizer):
    tok = copy.deepcopy(lab_tokenizer)
    a, n = add_backtrack_token(tok), len(tok)
    assert add_backtrack_token(tok) == a and len(tok) == n
    # BT inside text is one token between ordinary ones, and decodes back to its name
    ids = tok.encode(f"a = 1{BACKTRACK_TOKEN} 2", add_special_tokens=False)
    assert ids.count(a) == 1 and BACKTRACK_TOKEN in tok.decode(ids)
