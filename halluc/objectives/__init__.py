"""What a training stage minimises beyond token cross-entropy, each bringing its collator and
needs: preference losses (dpo), the PRM's step classification (prm), the verifier head (verifier_head).
Imports core, structure and training.
"""
