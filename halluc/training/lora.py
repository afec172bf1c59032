"""LoRA through PEFT, with the BT token's own rows trained and saved with the adapter.

The origin project's LoRA runs left the new token's input and output rows frozen and did not
save the semantic initialisation (notes/research.md), so evaluation ran with an untrained,
random token. Here PEFT's `trainable_token_indices` trains exactly the BT rows:
- tied embeddings: `[bt]`, PEFT wraps the input embedding and ties the LM head to it;
- untied: `{"<input embedding>": [bt], "<LM head>": [bt]}`, both rows wrapped and trained.
The wrapper starts from the row as it is when the adapter is applied (the semantic init) and
`save_pretrained` stores the trained rows (`trainable_tokens_delta`) in the adapter, a few KB,
with `save_embedding_layers=False` (PEFT would otherwise add both full matrices because the
vocabulary grew). So an adapter folder + the ORIGINAL base (without BT) resized to the
tokenizer's length reproduce the trained model exactly (`load_adapter`).

The adapter folder also holds the tokenizer (with BT) and `halluc_adapter.json`: the base path
and what must match it (architecture, sizes, a fingerprint of its weights) so a wrong base is
refused with the difference named instead of loading into garbage.

DeepSpeed: works under ZeRO-2 and ZeRO-3 (the LoRA matrices and BT rows are sharded like the
rest; tests/test_deepspeed.py) when the adapter is applied BEFORE the ZeRO-3 TrainingArguments
exist, as the recipe does; otherwise PEFT copies the BT rows out of the sharded matrix with a
CUDA-only collective, refused here on CPU with that explanation.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

# re-exported: the settings live in the torch-free halluc.core.config, read before torch loads
from halluc.core.config import DEFAULT_TARGETS, LoraSettings  # noqa: F401

log = logging.getLogger(__name__)

ADAPTER_INFO = "halluc_adapter.json"


class BaseMismatch(ValueError):
    """The base model is not the one the adapter was trained on."""


def embeddings_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def bt_row_targets(model, bt_id: int) -> list[int] | dict[str, list[int]]:
    """PEFT's `trainable_token_indices` that trains the BT row of the input AND output matrix."""
    if embeddings_tied(model):
        return [bt_id]
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(model.get_input_embeddings())]: [bt_id],
            names[id(model.get_output_embeddings())]: [bt_id]}


def apply_lora(model, settings: LoraSettings, bt_id: int | None, task_type: str = "CAUSAL_LM"):
    """Wrap `model` (already resized, BT row initialised) in a PeftModel; returns it. A PRM
    (task_type="TOKEN_CLS") trains its new classification head whole (PEFT's modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and not torch.cuda.is_available():
        # PEFT then copies the BT rows out of the sharded matrix with a CUDA-only collective.
        raise RuntimeError("apply LoRA before creating ZeRO-3 TrainingArguments (or after "
                           "halluc.core.distributed.release_deepspeed_config()): PEFT's ZeRO-3 path "
                           "for trainable token rows is CUDA-only")
    bt_rows = bt_row_targets(model, bt_id) if settings.train_bt_rows and bt_id is not None else None
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), task_type=task_type,
                        trainable_token_indices=bt_rows)
    peft_model = get_peft_model(model, config)
    # No base path while training: with one, PEFT sees the vocabulary grew and adds BOTH full
    # embedding matrices to every checkpoint-N (GBs on a large vocabulary). save_adapter sets it.
    peft_model.peft_config["default"].base_model_name_or_path = None
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s; BT rows %s; %d of %d parameters trainable (%.2f%%)",
             settings.r, settings.alpha, ",".join(settings.targets),
             f"trained ({bt_rows})" if bt_rows else "FROZEN", trainable, total, 100 * trainable / total)
    return peft_model


# --------------------------------------------------------------------------- base identity

def base_identity(model, path: str | None) -> dict:
    """What an adapter needs from its base, taken BEFORE the BT token resizes it."""
    cfg = model.config
    local = path is not None and Path(path).exists()  # a hub name stays as it is
    return {"base_path": str(Path(path).resolve()) if local else path,
            "architectures": list(cfg.architectures or [type(model).__name__]),
            "model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "base_vocab_size": cfg.vocab_size,
            "fingerprint": fingerprint(model), "fingerprint_version": 2}


@torch.no_grad()
def fingerprint(model, samples: int = 4096) -> str:
    """sha256 over every parameter (sorted by name): its shape and `samples` evenly strided
    entries as float32. A training step moves every layer, so it changes; the same weights give
    the same value in whatever dtype they were stored and loaded in (bf16 or fp16 convert to
    float32 exactly). Reads ~4k entries per tensor, not the whole model."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        picked = flat[::step][:samples].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(p.shape)}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def fingerprint_v1(model, rows: int = 16) -> str:
    """The fingerprint of adapters saved before version 2: the first embedding rows only (it
    cannot tell apart bases that differ past them; kept so those adapters still load)."""
    emb = model.get_input_embeddings().weight[:rows].detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(emb.numpy().tobytes()).hexdigest()[:16]


def check_base(model, info: dict) -> None:
    """Raise BaseMismatch naming every difference between `model` (unresized) and `info`."""
    here = base_identity(model, None)
    if info.get("fingerprint_version", 1) == 1 and info.get("fingerprint"):
        log.warning("the adapter records an old (v1, first-16-rows) fingerprint of its base: a weaker check")
        here["fingerprint"] = fingerprint_v1(model)
    fields = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "base_vocab_size",
              "fingerprint")
    diffs = [f"{k}: adapter trained on {info.get(k)!r}, this base has {here[k]!r}"
             for k in fields if info.get(k) is not None and info.get(k) != here[k]]
    if diffs:
        raise BaseMismatch("the base model does not match the adapter (trained on "
                           f"{info.get('base_path')}):\n  " + "\n  ".join(diffs))


# --------------------------------------------------------------------------- save / load

def save_adapter(peft_model, tokenizer, out_dir, info: dict, state_dict: dict | None = None) -> None:
    """Adapter weights (LoRA + the BT rows), tokenizer (with BT) and halluc_adapter.json.

    `state_dict`: the full state gathered from ZeRO-3 shards (the model itself holds only a
    shard then); None reads the model."""
    out = Path(out_dir)
    peft_model.peft_config["default"].base_model_name_or_path = info.get("base_path")  # PEFT's own record
    peft_model.save_pretrained(out, state_dict=state_dict, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
    log.info("saved the adapter, tokenizer and %s to %s (base: %s)", ADAPTER_INFO, out, info.get("base_path"))


def read_adapter_info(adapter_dir) -> dict:
    path = Path(adapter_dir) / ADAPTER_INFO
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_INFO}: not an adapter saved by halluc")
    return json.loads(path.read_text())


def load_adapter(adapter_dir, base_dir=None, dtype=torch.float32):
    """(PeftModel, tokenizer): the base (default: the path recorded at training), checked against
    the adapter, resized to the adapter's tokenizer, with the adapter (LoRA + BT rows) on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_adapter_info(adapter_dir)
    base_dir = base_dir or info.get("base_path")
    if not base_dir:
        raise ValueError(f"{adapter_dir} records no base path: pass the base folder")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    check_base(base, info)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        # mean_resizing off: the BT rows come from the adapter, nothing else is new
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if info.get("halluc"):
        base.config.halluc = info["halluc"]  # generation reads the training semantics here
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def merge_adapter(adapter_dir, base_dir=None, dtype=torch.float32):
    """(plain transformers model, tokenizer): LoRA and the BT rows merged into the base."""
    peft_model, tokenizer = load_adapter(adapter_dir, base_dir, dtype)
    return peft_model.merge_and_unload(), tokenizer  # config.halluc came with load_adapter
