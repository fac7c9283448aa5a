#!/usr/bin/env bash
# Run `flexmoe train` on a GPU node, or on several nodes under SLURM (one process per node, all GPUs).
#
#   launch/gpu_train.sh [--nodes N] [--gpus_per_node G] [--partition P] [--port 12355] [--venv DIR] \
#       [--no-install] [--allow_cpu] [--dry-run] \
#       -- --gin_file phase/pretrain.gin --gin_file mesh/h100x8.gin --workdir /shared/run
#
# The code: this checkout, which under SLURM must be on the filesystem every node mounts (your home
# or a project directory). It is installed once with the `cuda` extra (JAX's CUDA 12 plugin) into
# --venv (default: <checkout>/.venv-cuda), unless --no-install (then `flexmoe` from PATH, or $FLEXMOE).
# One node: runs `flexmoe train --platform gpu` directly. --nodes > 1: submits an sbatch script whose
# srun starts one process per node with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# set (read by flexmoe_jax.distributed). --dry-run prints every step instead of running it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
NODES=1 GPUS=8 PARTITION="" PORT=12355 DRY=0 VENV="$HERE/.venv-cuda" INSTALL=1 ALLOW_CPU=""
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2;;
    --gpus_per_node) GPUS="$2"; shift 2;;
    --partition) PARTITION="$2"; shift 2;;
    --port) PORT="$2"; shift 2;;
    --venv) VENV="$2"; shift 2;;
    --no-install) INSTALL=0; shift;;
    --allow_cpu) ALLOW_CPU=" --allow_cpu"; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage 0;;
    --) shift; break;;
    *) echo "gpu_train.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ $# -gt 0 ] || { echo "gpu_train.sh: give the flexmoe train arguments after --, e.g. -- --gin_file phase/pretrain.gin --workdir DIR" >&2; exit 2; }
case "$NODES" in ''|*[!0-9]*|0) echo "gpu_train.sh: --nodes must be a positive integer, got '$NODES'" >&2; exit 2;; esac
TRAIN_ARGS=$(printf ' %q' "$@")

run() { if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [ "$INSTALL" = 1 ]; then
  FLEXMOE="$VENV/bin/flexmoe"
  if [ "$DRY" = 1 ] || [ ! -x "$FLEXMOE" ]; then
    echo "# install (once): $HERE with JAX's CUDA 12 plugin into $VENV"
    run python3 -m venv "$VENV"
    run "$VENV/bin/pip" install -q -e "$HERE[cuda]"
  fi
else
  FLEXMOE="${FLEXMOE:-flexmoe}"
fi
CMD="$FLEXMOE train --platform gpu$ALLOW_CPU$TRAIN_ARGS"

if [ "$NODES" = 1 ]; then
  echo "# train on this node"
  if [ "$DRY" = 1 ]; then echo "$CMD"; else eval "$CMD"; fi
  exit 0
fi
PART=""; [ -n "$PARTITION" ] && PART="#SBATCH --partition=$PARTITION"
SCRIPT=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=flexmoe
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
$PART
head=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c 'JAX_COORDINATOR_ADDRESS='"\$head"':$PORT JAX_NUM_PROCESSES=\$SLURM_NNODES JAX_PROCESS_ID=\$SLURM_PROCID exec $CMD'
SBATCH
)
echo "# submit: one process per node"
if [ "$DRY" = 1 ]; then echo "$SCRIPT"; else echo "$SCRIPT" | sbatch; fi
