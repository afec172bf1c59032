"""The trainer seam: the HF Trainer with an objective (train), checkpoints, saving and resuming
(checkpoint), LoRA adapters with the BT rows (lora). Imports core and structure.
"""
