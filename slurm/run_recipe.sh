#!/usr/bin/env bash
# Any halluc recipe on Slurm: one torchrun agent per node (srun), NPROC_PER_NODE workers each.
#
#   mkdir -p logs && RECIPE=recipes/masked_sft.py sbatch slurm/run_recipe.sh
#   RECIPE_ARGS="lora.enabled=true sft.steps=2000" DEEPSPEED_CONFIG=ds_configs/zero3.json \
#       sbatch --nodes=4 --partition=big slurm/run_recipe.sh
#
# Environment (all optional; sbatch passes the submitting shell's environment to the job):
#   RECIPE            recipe file, relative to the checkout (default recipes/masked_sft.py)
#   RECIPE_ARGS       extra `key=value` settings for the recipe (word-split)
#   DEEPSPEED_CONFIG  e.g. ds_configs/zero3.json (passed as deepspeed=...)
#   NPROC_PER_NODE    processes per node (default: GPUs on the node, else 1)
#   OUTPUT_DIR        default runs/<job name>-<job id>: a requeued job keeps its id, so it
#                     finds its own checkpoints and resumes from the newest one
#   SAVE_STEPS        checkpoint every this many steps (default 200)
#   PYTHON            default .venv/bin/python in the checkout
#   HALLUC_ROOT       the checkout (default: the folder sbatch was called from)
#   MASTER_PORT       rendezvous port on the first node (default derived from the job id)
# Logs: logs/slurm-<job id>.out (appended across requeues; `mkdir -p logs` before sbatch,
# Slurm does not create it). The #SBATCH lines below are defaults: sbatch options override them.
#
#SBATCH --job-name=halluc
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

ROOT=${HALLUC_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$ROOT"
RECIPE=${RECIPE:-${1:-recipes/masked_sft.py}}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
[ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1  # a node without GPUs (SLURM_GPUS_ON_NODE=0): one process
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-halluc}-${SLURM_JOB_ID:-local}}
SAVE_STEPS=${SAVE_STEPS:-200}
# One agent per srun task (normally one per node); the first node hosts the rendezvous.
AGENTS=${SLURM_NTASKS:-1}
HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}")  # whole: `| head` can die of SIGPIPE under pipefail
MASTER_ADDR=${HOSTS%%$'\n'*}
# 10000-29999: below Linux's ephemeral ports (32768+), where an outgoing connection may hold it
MASTER_PORT=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}
# CPU threads per worker: the task's CPUs shared by its workers (2 cores / 2 workers -> 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE : 1 ))}

ARGS=("output_dir=$OUTPUT_DIR" "save_steps=$SAVE_STEPS" "resume=true")
[ -n "${DEEPSPEED_CONFIG:-}" ] && ARGS+=("deepspeed=$DEEPSPEED_CONFIG")
# shellcheck disable=SC2206  # word splitting of RECIPE_ARGS is the interface; no globbing (lora.targets=[q,v])
set -f
[ -n "${RECIPE_ARGS:-}" ] && ARGS+=($RECIPE_ARGS)
set +f

echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $AGENTS agent(s) x $NPROC_PER_NODE" \
     "process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, $RECIPE ${ARGS[*]}"

# Static rendezvous: agent i (SLURM_PROCID, evaluated inside each task) is node_rank i.
status=0
# --cpus-per-task again: srun no longer inherits sbatch's (Slurm >= 22.05), and each agent would get one CPU;
# only when the job has one (inside `salloc` without -c, forcing 1 would pin every agent to one core)
# shellcheck disable=SC2086  # empty when unset: no argument
srun --kill-on-bad-exit=1 --ntasks="$AGENTS" --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-1}" \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
    bash -c 'exec "$0" -m torch.distributed.run --nnodes "$1" --nproc_per_node "$2" \
             --node_rank "$SLURM_PROCID" --master_addr "$3" --master_port "$4" "${@:5}"' \
    "$PYTHON" "$AGENTS" "$NPROC_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" "$RECIPE" "${ARGS[@]}" || status=$?
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} finished with status $status"
exit $status
