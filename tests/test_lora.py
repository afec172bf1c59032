"""LoRA with the BT token's rows trained and saved (the origin project's bug, fixed), merging."""
import copy
import json

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

from halluc.sources.data import build_sft_dataset
from halluc.sources.errors import ErrorConfig
from halluc.training.lora import LoraSettings, apply_lora, base_identity, load_adapter, save_adapter
from halluc.core.model import init_backtrack_embedding, tiny_llama
from halluc.core.tokens import add_backtrack_token, backtrack_id
from halluc.training.train import make_trainer, training_args

FROZEN_ROW = 7  # an ordinary token: its rows must not move under LoRA


def tiny(vocab: int, tied: bool = False, layers: int = 1, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    if not tied:
        return tiny_llama(vocab, hidden=32, layers=layers, heads=2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=2, initializer_range=0.06,
                                        tie_word_embeddings=True, bos_token_id=None))


def rows(model, bt: int) -> dict[str, torch.Tensor]:
    """The BT and a frozen row of the input and output matrices, as the model computes with them."""
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return {"in_bt": emb[bt].detach().clone(), "out_bt": out[bt].detach().clone(),
            "in_frozen": emb[FROZEN_ROW].detach().clone(), "out_frozen": out[FROZEN_ROW].detach().clone()}


def train_lora(lab_tokenizer, arith_problems, tmp_path, tied=False, train_bt_rows=True, steps=15):
    """Original base (no BT) on disk -> BT added + semantic init -> LoRA SFT. Returns everything."""
    tok = copy.deepcopy(lab_tokenizer)
    base = tiny(len(tok), tied)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    identity = base_identity(model, str(tmp_path / "base"))
    bt = add_backtrack_token(tok, model)
    init_backtrack_embedding(model, tok, bt)
    before = rows(model, bt)
    peft_model = apply_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0,
                                                train_bt_rows=train_bt_rows), bt)
    data = build_sft_dataset(arith_problems[:120], tok, ErrorConfig(example_rate=1.0), bt)
    args = training_args(str(tmp_path / "run"), steps=steps, batch_size=8, lr=1e-2, log_every=5,
                         disable_tqdm=True)
    make_trainer(peft_model, args, data, tb_dir=str(tmp_path / "tb")).train()
    peft_model.eval()
    ids = torch.tensor([data[0]["input_ids"]])
    assert bt in data[0]["input_ids"]
    return peft_model, tok, bt, before, ids, identity


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bt_rows_train_save_reload_and_merge(lab_tokenizer, arith_problems, tmp_path, tied):
    peft_model, tok, bt, before, ids, identity = train_lora(lab_tokenizer, arith_problems, tmp_path, tied)
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    adapter = tmp_path / "adapter"
    save_adapter(peft_model, tok, adapter, {**identity, "halluc": {"backtrack_token_id": bt}})

    # the adapter holds the BT rows (small), not the whole embedding matrices
    saved = load_file(adapter / "adapter_model.safetensors")
    bt_keys = sorted(k for k in saved if "trainable_tokens_delta" in k)
    assert len(bt_keys) == (1 if tied else 2), bt_keys
    assert all(saved[k].shape == (1, 32) for k in bt_keys)
    assert not any("embed_tokens.weight" in k or "lm_head.weight" in k for k in saved)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")

    # reload onto the ORIGINAL base (no BT, resized on load): identical logits
    reloaded, tok2 = load_adapter(adapter)
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=1e-6)

    # merge: a plain checkpoint, same logits, BT id kept
    merge = load_script("tools/merge_adapter.py")
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert type(merged) is LlamaForCausalLM and backtrack_id(merged_tok) == bt == backtrack_id(tok2)
    assert merged.config.halluc["backtrack_token_id"] == bt
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=0, atol=1e-5)

    # what training changed: the BT rows (input AND output) moved; an ordinary row did not
    after = rows(merged, bt)
    assert (after["in_bt"] - before["in_bt"]).abs().max() > 1e-3
    assert (after["out_bt"] - before["out_bt"]).abs().max() > 1e-3
    torch.testing.assert_close(after["in_frozen"], before["in_frozen"], rtol=0, atol=0)
    torch.testing.assert_close(after["out_frozen"], before["out_frozen"], rtol=0, atol=0)
    if tied:
        torch.testing.assert_close(after["in_bt"], after["out_bt"], rtol=0, atol=0)


def test_negative_control_without_trainable_tokens_the_bt_rows_stay_frozen(lab_tokenizer, arith_problems,
                                                                           tmp_path):
    """The origin project's setting: LoRA alone never changes the BT rows (nor saves them)."""
    peft_model, tok, bt, before, _, identity = train_lora(lab_tokenizer, arith_problems, tmp_path,
                                                          train_bt_rows=False, steps=5)
    after = rows(peft_model, bt)
    torch.testing.assert_close(after["in_bt"], before["in_bt"], rtol=0, atol=0)
    torch.testing.assert_close(after["out_bt"], before["out_bt"], rtol=0, atol=0)
    save_adapter(peft_model, tok, tmp_path / "adapter", identity)
    assert not any("trainable_tokens" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


def test_merge_refuses_a_base_that_does_not_match(lab_tokenizer, arith_problems, tmp_path):
    peft_model, tok, bt, _, _, identity = train_lora(lab_tokenizer, arith_problems, tmp_path, steps=2)
    save_adapter(peft_model, tok, tmp_path / "adapter", identity)
    merge = load_script("tools/merge_adapter.py")
    wrong = {"layers": (tiny(len(lab_tokenizer), layers=2), "num_hidden_layers"),
             "vocab": (tiny(len(lab_tokenizer) + 3), "base_vocab_size"),
             "weights": (tiny(len(lab_tokenizer), seed=1), "fingerprint"),
             "architecture": (MistralForCausalLM(MistralConfig(
                 vocab_size=len(lab_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)), "architectures")}
    for name, (model, named) in wrong.items():
        model.save_pretrained(tmp_path / name)
        with pytest.raises(SystemExit, match=f"(?s)refused: .*{named}"):
            merge.main(["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / name),
                        "--out", str(tmp_path / f"merged-{name}")])
        assert not (tmp_path / f"merged-{name}").exists()
    with pytest.raises(SystemExit, match="refused: .*halluc_adapter.json"):
        merge.main(["--adapter", str(tmp_path / "base"), "--out", str(tmp_path / "merged-x")])


def test_the_fingerprint_tells_apart_bases_that_differ_only_past_the_first_embedding_rows(lab_tokenizer, tmp_path):
    """A base trained a little more keeps its first embedding rows (the lab never uses those
    tokens) but moves its layers: the fingerprint must change (the old 16-row fingerprint did not),
    and must not change with the dtype the same weights are stored in."""
    from halluc.training.lora import fingerprint

    base = tiny(len(lab_tokenizer))
    trained = copy.deepcopy(base)
    with torch.no_grad():
        trained.model.layers[0].mlp.down_proj.weight.add_(1e-3)
        trained.lm_head.weight[40:].add_(1e-3)
    assert torch.equal(base.get_input_embeddings().weight[:16], trained.get_input_embeddings().weight[:16])
    assert fingerprint(base) != fingerprint(trained)
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    as_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    as_fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert fingerprint(as_bf16) == fingerprint(as_fp32)


def test_decoding_a_lora_model_passes_the_cache_by_its_current_name_and_equals_the_merged_model(monkeypatch):
    """PeftModel.forward takes **kwargs, so the cache argument's name is read from the wrapped model:
    no deprecated `past_key_values` on every step, and the same traces as the merged model.
    Negative control: forcing the old name brings the deprecation warning back."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from halluc.inference import kv_slots
    from halluc.inference.generate import generate

    torch.manual_seed(0)
    peft = get_peft_model(tiny(40), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    kw = dict(max_new_tokens=12, backtrack_id=39, eos_token_id=None, semantics="rewind")

    def deprecations():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traces = [g.trace for g in generate(peft, [[5, 6, 7], [8, 9]], **kw)]
        return traces, [w for w in caught if "past_key_values" in str(w.message)]

    traces, warned = deprecations()
    current = kv_slots._cache_kwarg(peft.get_base_model())
    assert kv_slots._cache_kwarg(peft) == current and not warned
    if current == "past_key_values":
        pytest.skip("this transformers names the cache past_key_values: no old name to tell apart")
    with monkeypatch.context() as m:
        m.setattr(kv_slots, "_cache_kwarg", lambda model: "past_key_values")
        assert deprecations()[1]
    merged = copy.deepcopy(peft).merge_and_unload()
    assert traces == [g.trace for g in generate(merged, [[5, 6, 7], [8, 9]], **kw)]
