"""halluc: teach language models to correct themselves with a <|BACKTRACK|> token."""

# The public names load on first use (PEP 562): halluc.tokens imports transformers, and a recipe
# imports `halluc.config` to check its settings before any ML library loads.
_PUBLIC = {"apply_backtrack": "halluc.example", "Example": "halluc.example", "Role": "halluc.example",
           "ROLE_NAMES": "halluc.example", "BACKTRACK_TOKEN": "halluc.tokens", "backtrack_id": "halluc.tokens",
           "add_backtrack_token": "halluc.tokens"}

__all__ = ["apply_backtrack", "Example", "Role", "ROLE_NAMES", "BACKTRACK_TOKEN", "backtrack_id",
           "add_backtrack_token"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'halluc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
