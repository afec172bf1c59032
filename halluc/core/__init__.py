"""The representation and what everything stands on: examples and roles, the BT token, settings
(checked before any ML library loads), the artifact store, processes, statistics, model loading and
the pure losses. Imports nothing else of halluc but halluc.tasks.
"""
