"""Where training data with errors comes from: synthetic errors (errors), SFT examples (data), the
model's own errors (own_errors), step labels (step_labels), MCTS traces (mcts). Imports the layers
below it.
"""
