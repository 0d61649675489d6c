#!/usr/bin/env bash
# Runs one `python -m heterrec_jax.train ARGS` job over several GPU processes: one process per
# host (seeing all its GPUs; the default), or one per GPU (--gpus-per-host N). Every process gets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# heterrec_jax/sharding.py's maybe_initialize_distributed() turns into
# jax.distributed.initialize(); a single process gets none of them.
#
#   launch/multi_gpu.sh [--hosts H1,H2,...] [--gpus-per-host N] [--coordinator HOST:PORT]
#       [--repo DIR] [--venv DIR] [--logs DIR] [--dry-run] -- [TRAIN ARGS ...]
#
#   --hosts          machines, in process order (default: localhost). localhost runs here, in
#                    the current Python environment; any other host runs over ssh in REPO with
#                    REPO/VENV activated.
#   --gpus-per-host  0: one process per host with all its GPUs (default); N: N processes per host,
#                    process g sees only GPU g (CUDA_VISIBLE_DEVICES=g).
#   --coordinator    address of process 0 (default: the first host, port 12355).
#   --repo, --venv   the code folder on remote hosts (default heterrec_jax, relative to the home
#                    directory) and the venv inside it (default venv).
#   --logs           one log per process, LOGS/process-I.log (default runs/multi_gpu_logs).
#   --dry-run        print the commands (one per process, one per line) and run nothing (also
#                    DRY_RUN=1).
#
# Example: 2 hosts x 8 GPUs, one process per host:
#   launch/multi_gpu.sh --hosts gpu-a,gpu-b -- --config configs/paper.py \
#       --workdir /shared/runs/paper data.path=/shared/data/amazon
set -euo pipefail

HOSTS="localhost" GPUS_PER_HOST=0 COORDINATOR="" REPO="heterrec_jax" VENV="venv"
LOGS="runs/multi_gpu_logs" DRY_RUN="${DRY_RUN:-0}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, quote, join_quoted

while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --gpus-per-host) GPUS_PER_HOST="$2"; shift 2 ;;
    --coordinator) COORDINATOR="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown flag $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
if ! [[ "$GPUS_PER_HOST" =~ ^[0-9]+$ ]]; then
  echo "error: --gpus-per-host=$GPUS_PER_HOST must be a number >= 0" >&2
  exit 2
fi
IFS=',' read -r -a HOST_LIST <<< "$HOSTS"
PER_HOST=$(( GPUS_PER_HOST > 0 ? GPUS_PER_HOST : 1 ))
N_PROCESSES=$(( ${#HOST_LIST[@]} * PER_HOST ))
COORDINATOR="${COORDINATOR:-${HOST_LIST[0]}:12355}"

# Fills CMD with the command of process $1 on host $2 (GPU $3, or -1 for all of them).
process_command() {
  local pid="$1" host="$2" gpu="$3"
  local -a envs=()
  if (( N_PROCESSES > 1 )); then
    envs+=("JAX_COORDINATOR_ADDRESS=$COORDINATOR" "JAX_NUM_PROCESSES=$N_PROCESSES"
           "JAX_PROCESS_ID=$pid")
  fi
  if (( gpu >= 0 )); then envs+=("CUDA_VISIBLE_DEVICES=$gpu"); fi
  if [[ ${#envs[@]} -gt 0 ]]; then envs=(env "${envs[@]}"); fi
  local -a train=("${envs[@]}" python -m heterrec_jax.train "${TRAIN_ARGS[@]}")
  if [[ "$host" == localhost ]]; then
    CMD=("${train[@]}")
  else
    local setup="cd $(quote "$REPO") && . $(quote "$VENV")/bin/activate"
    CMD=(ssh "$host" "$setup && $(join_quoted "${train[@]}")")
  fi
}

TRAIN_ARGS=("$@")
pids=()
for h in "${!HOST_LIST[@]}"; do
  for (( g = 0; g < PER_HOST; g++ )); do
    pid=$(( h * PER_HOST + g ))
    gpu=$(( GPUS_PER_HOST > 0 ? g : -1 ))
    process_command "$pid" "${HOST_LIST[$h]}" "$gpu"
    join_quoted "${CMD[@]}"
    printf '\n'
    if [[ "$DRY_RUN" != 1 ]]; then
      mkdir -p "$LOGS"
      "${CMD[@]}" > "$LOGS/process-$pid.log" 2>&1 &
      pids+=($!)
    fi
  done
done

status=0
for p in "${pids[@]}"; do
  wait "$p" || status=1
done
if [[ "$DRY_RUN" != 1 ]]; then
  echo "logs: $LOGS/process-*.log" >&2
fi
exit "$status"
