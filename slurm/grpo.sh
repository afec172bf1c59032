#!/usr/bin/env bash
# GRPO, reinforcement learning with a backtrack-aware reward (recipes/grpo.py) on Slurm; see slurm/README.md.
#
#   mkdir -p logs && sbatch slurm/grpo.sh
#   RECIPE_ARGS="model=runs/sft/checkpoint rollout.group=16" DEEPSPEED_CONFIG=ds_configs/zero2.json \
#       sbatch --nodes=2 slurm/grpo.sh
#
# Same environment as slurm/run_recipe.sh (RECIPE_ARGS, DEEPSPEED_CONFIG, NPROC_PER_NODE,
# OUTPUT_DIR, SAVE_STEPS, PYTHON). sbatch runs a copy of this file from its spool folder, so
# the shared launcher is found through the submit folder (the checkout).
#
#SBATCH --job-name=grpo
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
export RECIPE=recipes/grpo.py
exec bash "${HALLUC_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/run_recipe.sh"
