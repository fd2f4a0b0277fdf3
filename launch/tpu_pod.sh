#!/usr/bin/env bash
# Train rvlf_jax on a Cloud TPU pod slice: create the slice, set up every worker, run the recipe on
# all workers at once, follow the log, stop, delete.
#
#   launch/tpu_pod.sh [--dry-run] COMMAND [-- extra launch.train flags]
#
# Commands:
#   create   create the TPU VM slice
#   setup    copy this checkout to every worker and install requirements.txt with jax[tpu]
#   run      start `python -m launch.train --distributed` on every worker (in the background;
#            each worker logs to ~/rvlf_jax/train.log). Flags after `--` go to launch.train.
#   tail     follow worker 0's log (the only one that prints progress)
#   stop     stop training on every worker (the latest checkpoint in WORKDIR stays; `run` resumes)
#   delete   delete the slice
#
# Settings (environment variables; the defaults are examples, set your own):
#   TPU_NAME      slice name                        (rvlf-pod)
#   ZONE          Cloud zone                        (us-east5-a)
#   PROJECT       Cloud project                     (gcloud's default project when empty)
#   ACCELERATOR   slice type, e.g. v5p-128, v5litepod-64 (v5p-32)
#   TPU_VERSION   TPU VM software version           (v2-alpha-tpuv5)
#   SPOT          1: create a spot slice            (0)
#   CONFIG        recipe config                     (configs/phoenix2014t.py)
#   WORKDIR       run folder on a filesystem every worker mounts at the same path (required by
#                 run): a Filestore (NFS) share, or a bucket mounted with gcsfuse. The recipe
#                 writes through the local filesystem; orbax writes each checkpoint from all
#                 hosts together, and process 0 prepares data and features there for all.
#   MESH          e.g. data=-1,fsdp=16,tensor=4: one --config.mesh.<axis> flag per entry
#
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
[[ $# -ge 1 ]] || usage 2
COMMAND="$1"
shift
if [[ "${1:-}" == "--" ]]; then
  shift
fi
EXTRA_FLAGS=("$@")

TPU_NAME="${TPU_NAME:-rvlf-pod}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5p-32}"
TPU_VERSION="${TPU_VERSION:-v2-alpha-tpuv5}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-configs/phoenix2014t.py}"
WORKDIR="${WORKDIR:-}"
MESH="${MESH:-}"
REMOTE_DIR='~/rvlf_jax'
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  COMMON+=(--project="$PROJECT")
fi

# Runs (or, with --dry-run, prints) one command, each word shell-quoted.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKER COMMAND: run COMMAND over ssh on WORKER (all, 0, ...)
  run_cmd "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker="$1" --command="$2"
}

train_command() {
  if [[ -z "$WORKDIR" ]]; then
    echo "tpu_pod.sh run: set WORKDIR to a folder that every worker mounts at the same path" \
         "(the checkpoints are written by all hosts together)." >&2
    exit 2
  fi
  if [[ "$WORKDIR" != /* ]]; then
    echo "tpu_pod.sh run: WORKDIR=$WORKDIR is not an absolute path on a shared mount; for a" \
         "bucket, mount it with gcsfuse on every worker and give the mount's path." >&2
    exit 2
  fi
  local flags=(--config="$CONFIG" --workdir="$WORKDIR" --distributed)
  if [[ -n "$MESH" ]]; then
    local entry
    IFS=',' read -ra entries <<< "$MESH"
    for entry in "${entries[@]}"; do
      if [[ "$entry" != *=* ]]; then
        echo "tpu_pod.sh run: MESH entry '$entry' is not axis=size (MESH=$MESH)." >&2
        exit 2
      fi
      flags+=("--config.mesh.${entry%%=*}=${entry#*=}")
    done
  fi
  flags+=("${EXTRA_FLAGS[@]}")
  local quoted
  quoted="$(printf '%q ' "${flags[@]}")"
  echo "cd $REMOTE_DIR && nohup python3 -m launch.train $quoted> train.log 2>&1 &"
}

case "$COMMAND" in
  create)
    args=("${GCLOUD_TPU[@]}" create "$TPU_NAME" "${COMMON[@]}"
          --accelerator-type="$ACCELERATOR" --version="$TPU_VERSION")
    if [[ "$SPOT" == 1 ]]; then
      args+=(--spot)
    fi
    run_cmd "${args[@]}"
    ;;
  setup)
    on_workers all "mkdir -p $REMOTE_DIR"
    run_cmd "${GCLOUD_TPU[@]}" scp --recurse "${COMMON[@]}" --worker=all \
      "$REPO_ROOT/rvlf_jax" "$REPO_ROOT/configs" "$REPO_ROOT/launch" \
      "$REPO_ROOT/requirements.txt" "$TPU_NAME:$REMOTE_DIR/"
    on_workers all "cd $REMOTE_DIR && python3 -m pip install -U pip && python3 -m pip install -r requirements.txt 'jax[tpu]'"
    ;;
  run)
    command="$(train_command)"
    on_workers all "$command"
    ;;
  tail)
    on_workers 0 "tail -n 100 -f $REMOTE_DIR/train.log"
    ;;
  stop)
    on_workers all "pkill -f 'python3 -m launch.train' || true"
    ;;
  delete)
    run_cmd "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${COMMON[@]}" --quiet
    ;;
  -h|--help|help)
    usage 0
    ;;
  *)
    echo "tpu_pod.sh: unknown command '$COMMAND'; one of create, setup, run, tail, stop, delete." >&2
    exit 2
    ;;
esac
