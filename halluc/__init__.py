"""halluc: teach language models to correct themselves with a <|BACKTRACK|> token.

The library is layered; each package imports only those above it in this list:

    halluc.core        examples and roles, the BT token, settings, artifacts, processes, losses
    halluc.tasks       the problems (arith, GSM8K, any jsonl) and their verifiers
    halluc.structure   the edit tree: masks, positions, packing, preference pairs, attention backends
    halluc.training    the trainer seam, checkpoints, LoRA
    halluc.objectives  preference losses (DPO/TDPO), the PRM's step classification, the verifier head
    halluc.inference   the backtracking decoding loop and its policies, verifiers, evaluation
    halluc.sources     where errors come from: synthetic, the model's own, step labels, MCTS
    halluc.pipeline    the lab, run settings, stages, masked SFT, rounds: what recipes/ are made of

The names users reach for most are importable from `halluc` itself (`from halluc import generate_text`).
"""

# The public names load on first use (PEP 562): halluc.core.tokens imports transformers, and a recipe
# imports `halluc.core.config` to check its settings before any ML library loads.
_PUBLIC = {
    "halluc.core.example": ("apply_backtrack", "Example", "Role", "ROLE_NAMES"),
    "halluc.core.tokens": ("BACKTRACK_TOKEN", "backtrack_id", "add_backtrack_token", "load_tokenizer"),
    "halluc.core.config": ("load_config", "LayoutSettings", "LoraSettings", "Stage"),
    "halluc.core.model": ("load_causal_lm", "tiny_llama"),
    "halluc.structure.attention": ("edit_tree", "dense_mask", "position_ids"),
    "halluc.structure.packing": ("layout_example", "pack_examples"),
    "halluc.training.train": ("make_trainer", "training_args", "TreeCollator", "TokenCrossEntropy"),
    "halluc.objectives.dpo": ("PreferenceObjective",),
    "halluc.inference.decoding": ("Sampling", "LoopGuards", "Guide", "Guided", "Forcing"),
    "halluc.inference.generate": ("generate", "generate_text", "Generation", "semantics_for"),
    "halluc.inference.evaluate": ("evaluate_problems",),
    "halluc.inference.verifiers": ("make_verifier",),
    "halluc.pipeline.run_config": ("RunConfig",),
    "halluc.pipeline.stages": ("train_stage", "RunSettings"),
    "halluc.pipeline.sft": ("SFTConfig", "train_sft"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'halluc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
