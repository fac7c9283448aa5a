#!/usr/bin/env bash
# Run `flexmoe train` on a GPU node, or on several nodes under SLURM (one process per node, all GPUs).
#
#   launch/gpu_train.sh [--nodes N] [--gpus_per_node G] [--partition P] [--port 12355] [--dry-run] \
#       -- --gin_file phase/pretrain.gin --gin_file mesh/h100x8.gin --workdir /shared/run
#
# One node without SLURM: runs flexmoe directly. With --nodes > 1: submits an sbatch script whose
# srun starts one process per node with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# set (read by flexmoe_jax.distributed). --dry-run prints what it would run or submit.
set -euo pipefail
NODES=1 GPUS=8 PARTITION="" PORT=12355 DRY=0 FLEXMOE="${FLEXMOE:-flexmoe}"
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2;;
    --gpus_per_node) GPUS="$2"; shift 2;;
    --partition) PARTITION="$2"; shift 2;;
    --port) PORT="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage 0;;
    --) shift; break;;
    *) echo "gpu_train.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ $# -gt 0 ] || { echo "gpu_train.sh: give the flexmoe train arguments after --, e.g. -- --gin_file phase/pretrain.gin --workdir DIR" >&2; exit 2; }
case "$NODES" in ''|*[!0-9]*|0) echo "gpu_train.sh: --nodes must be a positive integer, got '$NODES'" >&2; exit 2;; esac
TRAIN_ARGS=$(printf ' %q' "$@")

if [ "$NODES" = 1 ]; then
  CMD="$FLEXMOE train$TRAIN_ARGS"
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
srun bash -c 'JAX_COORDINATOR_ADDRESS='"\$head"':$PORT JAX_NUM_PROCESSES=\$SLURM_NNODES JAX_PROCESS_ID=\$SLURM_PROCID exec $FLEXMOE train$TRAIN_ARGS'
SBATCH
)
if [ "$DRY" = 1 ]; then echo "$SCRIPT"; else echo "$SCRIPT" | sbatch; fi
