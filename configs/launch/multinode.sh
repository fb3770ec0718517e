#!/bin/bash
# Lynx 70B on N plain machines (no scheduler): run this on every node, with the same MASTER (any one of the nodes,
# reachable from the others on port 29500).
#
#   MASTER=node0 NNODES=4 bash configs/launch/multinode.sh                  # on each of the 4 nodes
#   MASTER=node0 NNODES=4 bash configs/launch/multinode.sh optim.lr=1e-6    # extra args: train.py overrides
#   MASTER=node0 NNODES=4 bash configs/launch/multinode.sh --dry-run        # print the command
#
# run_dir, data.train and model.init_from must be on a shared filesystem. A failed worker restarts the group (up to
# MAX_RESTARTS times) and train.py resumes from the newest complete checkpoint; rerunning the script resumes too.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
: "${MASTER:?set MASTER to the host name of one node (the rendezvous)}"
: "${NNODES:?set NNODES to the number of nodes}"
CONFIG=${CONFIG:-configs/lynx-70b.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_ID=${RDZV_ID:-lynx70b}

# Restarted workers must not reuse the rendezvous store of the group they replace (their peers would read the dead
# workers' addresses: pytorch/pytorch#135712), so torchrun gets a fresh store per restart.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d
     --rdzv_endpoint "$MASTER:29500" --rdzv_id "$RDZV_ID" --max-restarts "$MAX_RESTARTS"
     train.py --config "$CONFIG" "$@")
if (( dry_run )); then
    echo TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
