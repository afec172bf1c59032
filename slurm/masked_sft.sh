#!/usr/bin/env bash
# Masked-error SFT (recipes/masked_sft.py) on Slurm; see slurm/README.md.
#
#   mkdir -p logs && sbatch slurm/masked_sft.sh
#   RECIPE_ARGS="model=/models/llama-3-8b lora.enabled=true" DEEPSPEED_CONFIG=ds_configs/zero2.json \
#       sbatch --nodes=2 slurm/masked_sft.sh
#
# Same environment as slurm/run_recipe.sh (RECIPE_ARGS, DEEPSPEED_CONFIG, NPROC_PER_NODE,
# OUTPUT_DIR, SAVE_STEPS, PYTHON). sbatch runs a copy of this file from its spool folder, so
# the shared launcher is found through the submit folder (the checkout).
#
#SBATCH --job-name=masked_sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
#SBATCH --output=logs/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail
export RECIPE=recipes/masked_sft.py
exec bash "${HALLUC_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/run_recipe.sh"
