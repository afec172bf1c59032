"""Generation with backtracking and how it is judged: the decoding loop (generate) and its policies
(token_choice, guided_decoding, kv_slots; settings in decoding), verifiers that guide it,
judging and evaluation, the lm-evaluation-harness model. Imports the layers below it.
"""
