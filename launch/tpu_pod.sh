#!/usr/bin/env bash
# Runs the same `python -m heterrec_jax.train ARGS` on every worker of a Cloud TPU VM (a pod
# slice: one process per host; JAX finds the other hosts itself, see heterrec_jax/sharding.py).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--project PROJECT] [--repo DIR] [--venv DIR]
#       [--sync] [--setup] [--dry-run] -- [TRAIN ARGS ...]
#
#   --sync     copy heterrec_jax/, configs/, launch/ and requirements.txt to REPO on every worker
#   --setup    create the venv REPO/VENV on every worker and install the requirements and
#              jax[tpu]==JAX_VERSION
#   --dry-run  print the gcloud commands (one per line) and run nothing (also DRY_RUN=1)
#   --repo     the code folder on the workers, relative to the home directory (default heterrec_jax)
#   --venv     the venv folder inside REPO (default venv)
#
# Example (the README shows the command it prints):
#   launch/tpu_pod.sh --name my-pod --zone us-central2-b --sync --setup -- \
#       --config configs/paper.py --workdir /mnt/shared/runs/paper data.path=/mnt/shared/data/amazon
#
# The data folder must exist on every worker (each host reads its own slice of it) and the
# workdir must be one folder shared by all workers (e.g. a Filestore/NFS or gcsfuse mount): every
# process writes its shards of the checkpoints there.
set -euo pipefail

JAX_VERSION=0.10.2
NAME="" ZONE="" PROJECT="" REPO="heterrec_jax" VENV="venv"
SYNC=0 SETUP=0 DRY_RUN="${DRY_RUN:-0}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, quote, join_quoted

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --sync) SYNC=1; shift ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown flag $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
if [[ -z "$NAME" || -z "$ZONE" ]]; then
  echo "error: --name and --zone are required" >&2
  exit 2
fi

# Prints the command, then runs it unless this is a dry run.
run() {
  join_quoted "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

GCLOUD_FLAGS=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project "$PROJECT"); fi
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$1"
}

cd "$(dirname "$0")/.."
IN_REPO="cd $(quote "$REPO")"
ACTIVATE=". $(quote "$VENV")/bin/activate"
if [[ "$SYNC" == 1 ]]; then
  on_all_workers "mkdir -p $(quote "$REPO")"
  run gcloud compute tpus tpu-vm scp --recurse "${GCLOUD_FLAGS[@]}" --worker=all \
    heterrec_jax configs launch requirements.txt "$NAME:$REPO/"
fi
if [[ "$SETUP" == 1 ]]; then
  INSTALL="pip install -q -r requirements.txt && pip install -q -U \"jax[tpu]==$JAX_VERSION\""
  on_all_workers "$IN_REPO && python3 -m venv $(quote "$VENV") && $ACTIVATE && $INSTALL"
fi
on_all_workers "$IN_REPO && $ACTIVATE && $(join_quoted python -m heterrec_jax.train "$@")"
