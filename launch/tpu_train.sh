#!/usr/bin/env bash
# Run `flexmoe train` on every worker of a Cloud TPU VM slice (created if it does not exist).
#
#   launch/tpu_train.sh --tpu NAME --zone ZONE --accelerator v5p-64 [--version tpu-ubuntu2204-base] \
#       [--project P] [--ref HEAD] [--allow_cpu] [--dry-run] \
#       -- --gin_file phase/pretrain.gin --gin_file mesh/tpu_v5p_64.gin --workdir gs://BUCKET/runs/anchor
#
# Ships this checkout's commit (--ref, default HEAD; uncommitted changes are not shipped) to every
# worker as a `git archive` tarball, installs it there with the `tpu` extra (JAX's TPU build) into a
# venv made once per slice (~/flexmoe_jax/venv), then runs the same `flexmoe train --platform tpu`
# on all workers, each joining one jax.distributed job (FLEXMOE_DISTRIBUTED=auto). Everything after
# `--` goes to `flexmoe train` unchanged; the workdir must be one path every worker sees: a gs://
# URL (checkpoints land in the bucket) or a shared disk; RunConfig.data_dir may be a gs:// URL too
# (each worker stages one local copy of it). --dry-run prints every step instead of running it.
set -euo pipefail
TPU="" ZONE="" ACCEL="v5p-64" VERSION="tpu-ubuntu2204-base" PROJECT="" REF="HEAD" DRY=0 ALLOW_CPU=""
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --accelerator) ACCEL="$2"; shift 2;;
    --version) VERSION="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --ref) REF="$2"; shift 2;;
    --allow_cpu) ALLOW_CPU=" --allow_cpu"; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage 0;;
    --) shift; break;;
    *) echo "tpu_train.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ -n "$TPU" ] || { echo "tpu_train.sh: --tpu NAME is required" >&2; exit 2; }
[ -n "$ZONE" ] || { echo "tpu_train.sh: --zone ZONE is required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "tpu_train.sh: give the flexmoe train arguments after --, e.g. -- --gin_file phase/pretrain.gin --workdir DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHA=$(git -C "$HERE" rev-parse --verify "$REF^{commit}" 2>/dev/null) \
  || { echo "tpu_train.sh: $REF is not a commit of $HERE (ship a commit: git commit first)" >&2; exit 2; }
if [ -n "$(git -C "$HERE" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "tpu_train.sh: note: uncommitted changes in $HERE are not shipped; workers run commit ${SHA:0:12}" >&2
fi
PROJ=(); [ -n "$PROJECT" ] && PROJ=(--project "$PROJECT")
TARBALL="${TMPDIR:-/tmp}/flexmoe_jax-${SHA:0:12}.tar.gz"
REMOTE_TAR="flexmoe_jax-${SHA:0:12}.tar.gz"
CODE="\$HOME/flexmoe_jax/${SHA:0:12}"
TRAIN_ARGS=$(printf ' %q' "$@")
INSTALL="set -e; mkdir -p $CODE && tar -xzf \$HOME/$REMOTE_TAR -C $CODE && (test -x \$HOME/flexmoe_jax/venv/bin/pip || python3 -m venv \$HOME/flexmoe_jax/venv) && \$HOME/flexmoe_jax/venv/bin/pip install -q \"$CODE[tpu]\""
TRAIN="export FLEXMOE_DISTRIBUTED=auto; cd $CODE && \$HOME/flexmoe_jax/venv/bin/flexmoe train --platform tpu$ALLOW_CPU$TRAIN_ARGS"

run() { if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

echo "# 1. the code: commit ${SHA:0:12} as a tarball"
run git -C "$HERE" archive --format=tar.gz -o "$TARBALL" "$SHA"
if [ "$DRY" = 1 ] || ! gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" "${PROJ[@]}" >/dev/null 2>&1; then
  echo "# 2. the slice (created only if it does not exist)"
  run gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$VERSION" "${PROJ[@]}"
fi
echo "# 3. copy it to every worker"
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:~/$REMOTE_TAR" --zone "$ZONE" "${PROJ[@]}" --worker=all
echo "# 4. unpack and install with JAX's TPU build (the venv is made once per slice)"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$INSTALL"
echo "# 5. train: the same command on every worker, one jax.distributed job"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$TRAIN"
