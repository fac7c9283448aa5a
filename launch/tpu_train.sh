#!/usr/bin/env bash
# Run `flexmoe train` on every worker of a Cloud TPU VM slice (created if it does not exist).
#
#   launch/tpu_train.sh --tpu NAME --zone ZONE --accelerator v5p-64 [--version tpu-ubuntu2204-base] \
#       [--project P] [--repo DIR] [--dry-run] -- --gin_file phase/pretrain.gin --workdir /mnt/disks/persist/run
#
# Everything after `--` goes to `flexmoe train` unchanged. Each worker joins one jax.distributed job
# (TPU VMs are auto-detected by jax), so the same gin files run here as on a CPU or a GPU node.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
TPU="" ZONE="" ACCEL="v5p-64" VERSION="tpu-ubuntu2204-base" PROJECT="" REPO='~/flexmoe_jax' DRY=0
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --accelerator) ACCEL="$2"; shift 2;;
    --version) VERSION="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --repo) REPO="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage 0;;
    --) shift; break;;
    *) echo "tpu_train.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ -n "$TPU" ] || { echo "tpu_train.sh: --tpu NAME is required" >&2; exit 2; }
[ -n "$ZONE" ] || { echo "tpu_train.sh: --zone ZONE is required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "tpu_train.sh: give the flexmoe train arguments after --, e.g. -- --gin_file phase/pretrain.gin --workdir DIR" >&2; exit 2; }
PROJ=(); [ -n "$PROJECT" ] && PROJ=(--project "$PROJECT")
TRAIN_ARGS=$(printf ' %q' "$@")
REMOTE="export FLEXMOE_DISTRIBUTED=auto; cd $REPO && (test -d .venv || (python3 -m venv .venv && .venv/bin/pip install -q -e .)) && .venv/bin/flexmoe train$TRAIN_ARGS"

run() { if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [ "$DRY" = 1 ] || ! gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" "${PROJ[@]}" >/dev/null 2>&1; then
  [ "$DRY" = 1 ] && echo "# create the slice if it does not exist:"
  run gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$VERSION" "${PROJ[@]}"
fi
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$REMOTE"
