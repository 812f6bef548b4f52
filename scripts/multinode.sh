#!/usr/bin/env bash
# bash scripts/multinode.sh HOSTFILE [extra sts-train arguments]
# Stage 2 of LLaVA-1.5 with STS (scripts/finetune.sh's settings) on several machines: the deepspeed launcher, ZeRO-3,
# and a hostfile with one line per node, e.g. for 2 nodes of 8 GPUs:
#     node1 slots=8
#     node2 slots=8
# With passwordless ssh between the nodes, run this once, on the first node (the launcher starts the others). Without
# ssh, run it on every node with NODE_RANK set (0 on the first, 1, ...): each launcher then starts its own node's
# processes (deepspeed --no_ssh --node_rank). MASTER_ADDR: the first node's address, reachable from every node.
# LLaVA-1.5's global batch of 128 on 16 GPUs: 8 per device. Under ZeRO-3 a rank whose batch has no image runs a blank
# image (sts_blank_image, README), so the ranks never wait on each other for the vision tower.
# What must be the same on every node is in the README ("Several machines"): the code and its versions, these
# arguments (STS decides which layers to skip and tokens to keep from them, on every rank: a run whose ranks differ
# stops at its start with an error naming the option), the data and the checkpoints at the same paths.
set -euo pipefail
HOSTFILE=${1:?usage: bash scripts/multinode.sh HOSTFILE [extra sts-train arguments]}
shift
LAUNCHER="deepspeed --hostfile $HOSTFILE --master_addr ${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
LAUNCHER+=" --master_port ${MASTER_PORT:-29500}"
if [ -n "${NODE_RANK:-}" ]; then
    LAUNCHER+=" --no_ssh --node_rank $NODE_RANK"
fi
LAUNCHER=$LAUNCHER exec bash "$(dirname "$0")/finetune.sh" --per_device_train_batch_size 8 "$@"
