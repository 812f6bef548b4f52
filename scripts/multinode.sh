#!/usr/bin/env bash
# bash scripts/multinode.sh HOSTFILE [extra sts-train arguments]
# Stage 2 of LLaVA-1.5 with STS (as scripts/finetune.sh) on several machines: the deepspeed launcher, ZeRO-3, and a
# hostfile with one line per node, e.g. for 2 nodes of 8 GPUs:
#     node1 slots=8
#     node2 slots=8
# With passwordless ssh between the nodes, run this once, on the first node (the launcher starts the others). Without
# ssh, run it on every node with NODE_RANK set (0 on the first, 1, ...): each launcher then starts its own node's
# processes (deepspeed --no_ssh --node_rank). MASTER_ADDR: the first node's address, reachable from every node.
# LLaVA-1.5's global batch of 128 on 16 GPUs: 8 per device. No --group_by_modality_length: under ZeRO-3 a rank whose
# batch has no image runs a blank image (sts_blank_image, README), so ranks never wait on each other for the vision tower.
# What must be the same on every node is in the README ("Several machines"): the code and its versions, these
# arguments (STS decides which layers to skip and tokens to keep from them, on every rank: a run whose ranks differ
# stops at its start with an error naming the option), the data and the checkpoints at the same paths.
set -euo pipefail
HOSTFILE=${1:?usage: bash scripts/multinode.sh HOSTFILE [extra sts-train arguments]}
shift
DATA=${DATA:-./playground/data}
STAGE1=${STAGE1:-./checkpoints/llava-v1.5-7b-sts-pretrain}
OUT=${OUT:-./checkpoints/llava-v1.5-7b-sts}
LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}"
        --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
    LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
fi
"${LAUNCH[@]}" --module sts_trainer.llava.train \
    --deepspeed configs/zero3.json \
    --model_name_or_path "$STAGE1" \
    --training_stage instruction \
    --data_path "$DATA/llava_v1_5_mix665k.json" \
    --image_folder "$DATA" \
    --model_max_length 2048 \
    --sts_stage auto --lds_alpha 0.5 --lds_epsilon 0.5 --lds_schedule quadratic \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-5 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --save_strategy steps --save_steps 500 --save_total_limit 2 \
    --logging_steps 10 \
    --activation_checkpointing True \
    --dataloader_num_workers 4 \
    --report_to none \
    "$@"
