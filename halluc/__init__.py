"""halluc: teach language models to correct themselves with a <|BACKTRACK|> token."""
from halluc.example import ROLE_NAMES, Example, Role, apply_backtrack
from halluc.tokens import BACKTRACK_TOKEN, add_backtrack_token, backtrack_id

__all__ = ["apply_backtrack", "Example", "Role", "ROLE_NAMES", "BACKTRACK_TOKEN", "backtrack_id",
           "add_backtrack_token"]
