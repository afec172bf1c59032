"""The edit tree made concrete: attention masks and positions (attention), packing (packing),
preference pairs laid out with the prompt once (pairs) and the attention backends that run them
(backends). Imports only halluc.core.
"""
