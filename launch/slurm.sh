#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes an sbatch script and submits it.
#
#   launch/slurm.sh [--dry-run] [options] -- main.py flags
#
# Options:
#   --nodes N            number of nodes (default 2)
#   --gpus-per-node G    GPUs per node (default 8)
#   --per gpu|node       one JAX process per GPU (default) or one per node driving all
#                        of its GPUs (JAX_LOCAL_DEVICE_IDS=0..G-1)
#   --partition P, --account A, --time HH:MM:SS (default 24:00:00), --job-name J
#   --cpus-per-task C    (default: 8 per GPU-process, 8*G per node-process)
#   --venv PATH          virtualenv on the shared filesystem (default: REPO/.venv)
#   --script PATH        where to write the sbatch script (default: launch/slurm_JOB.sbatch)
#   --dry-run            print the sbatch script and the exact submit command; write nothing
#
# jax.distributed.initialize() (PGM_JAX_DISTRIBUTED=1) reads SLURM_JOB_ID, SLURM_NTASKS,
# SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NODELIST: the coordinator is the first node
# of the step. Every task must run (srun --kill-on-bad-exit stops all if one fails).
#
# Example (OWT PGM 6/6 on 2 nodes x 8 GPUs = the paper's 16 GPUs):
#   launch/slurm.sh --nodes=2 --gpus-per-node=8 --partition=gpu -- \
#     --config=configs/owt.py:pgm_6_6 --workdir=/shared/runs/pgm_6_6 \
#     --config.data.data_dir=/shared/data/owt_gpt2_1024
set -euo pipefail

DRY_RUN=0
NODES=2
GPUS=8
PER=gpu
PARTITION=""
ACCOUNT=""
TIME="24:00:00"
JOB="pgm_jax"
CPUS=""
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
SCRIPT=""
MAIN_ARGS=()

die() { echo "slurm.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes=*) NODES="${1#*=}" ;;         --nodes) NODES="$2"; shift ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;  --gpus-per-node) GPUS="$2"; shift ;;
    --per=*) PER="${1#*=}" ;;             --per) PER="$2"; shift ;;
    --partition=*) PARTITION="${1#*=}" ;; --partition) PARTITION="$2"; shift ;;
    --account=*) ACCOUNT="${1#*=}" ;;     --account) ACCOUNT="$2"; shift ;;
    --time=*) TIME="${1#*=}" ;;           --time) TIME="$2"; shift ;;
    --job-name=*) JOB="${1#*=}" ;;        --job-name) JOB="$2"; shift ;;
    --cpus-per-task=*) CPUS="${1#*=}" ;;  --cpus-per-task) CPUS="$2"; shift ;;
    --venv=*) VENV="${1#*=}" ;;           --venv) VENV="$2"; shift ;;
    --script=*) SCRIPT="${1#*=}" ;;       --script) SCRIPT="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (main.py flags go after --)" ;;
  esac
  shift
done

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got $NODES"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got $GPUS"
[[ ${#MAIN_ARGS[@]} -gt 0 ]] || die "main.py flags are required after --, e.g. -- --config=configs/owt.py:pgm_6_6 --workdir=/shared/run"
case "$PER" in
  gpu) TASKS_PER_NODE=$GPUS; CPUS="${CPUS:-8}"; LOCAL_IDS="" ;;
  node) TASKS_PER_NODE=1; CPUS="${CPUS:-$((8 * GPUS))}"
        LOCAL_IDS="$(seq -s, 0 $((GPUS - 1)))" ;;
  *) die "--per must be gpu or node, got $PER" ;;
esac
SCRIPT="${SCRIPT:-$REPO_ROOT/launch/slurm_${JOB}.sbatch}"

main_cmd="$(printf '%q' "$VENV/bin/python") -m pgm_jax.main"
for a in "${MAIN_ARGS[@]}"; do main_cmd+=" $(printf '%q' "$a")"; done

sbatch_text() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --cpus-per-task=$CPUS"
  echo "#SBATCH --time=$TIME"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --output=$REPO_ROOT/launch/logs/%x_%j.out"
  echo "set -euo pipefail"
  echo "cd $(printf '%q' "$REPO_ROOT")"
  echo "export PGM_JAX_DISTRIBUTED=1"
  if [[ -n "$LOCAL_IDS" ]]; then
    echo "export JAX_LOCAL_DEVICE_IDS=$LOCAL_IDS  # one process drives all GPUs of its node"
  fi
  echo "srun --kill-on-bad-exit=1 --ntasks-per-node=$TASKS_PER_NODE $main_cmd"
}

if [[ $DRY_RUN == 1 ]]; then
  echo "# $SCRIPT"
  sbatch_text
  printf '+ mkdir -p %q\n' "$REPO_ROOT/launch/logs"
  printf '+ sbatch %q\n' "$SCRIPT"
else
  mkdir -p "$REPO_ROOT/launch/logs"
  sbatch_text > "$SCRIPT"
  echo "wrote $SCRIPT"
  sbatch "$SCRIPT"
fi
