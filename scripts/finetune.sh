#!/usr/bin/env bash
# bash scripts/finetune.sh [extra sts-train arguments]     (add --lora_enable True --merge_lora True for LoRA)
# Stage 2 of LLaVA-1.5 (visual instruction tuning) with STS, from stage 1's output: projector and language model
# train, the Layer Dynamic Skipper skips decoder layers with the paper's schedule (alpha 0.5, epsilon 0.5, quadratic
# decay to dense at the end). LLaVA-1.5's hyperparameters: global batch 128 (8 GPUs x 16), lr 2e-5, 1 epoch, warmup
# 3%, cosine. Data: llava_v1_5_mix665k.json with its image folders.
# Beyond the paper: `bash scripts/finetune.sh --sts_preset sts_plus` adds VTC in the same forwards (the preset's
# instruction section); it saves far more FLOPs and costs accuracy: see docs/accuracy.md before choosing it.
set -euo pipefail
DATA=${DATA:-./playground/data}
STAGE1=${STAGE1:-./checkpoints/llava-v1.5-7b-sts-pretrain}
OUT=${OUT:-./checkpoints/llava-v1.5-7b-sts}
# LAUNCHER: the launcher's command (scripts/multinode.sh sets it for several machines)
${LAUNCHER:-deepspeed --num_gpus ${NUM_GPUS:-8}} --module sts_trainer.llava.train \
    --deepspeed configs/zero3.json \
    --model_name_or_path "$STAGE1" \
    --training_stage instruction \
    --data_path "$DATA/llava_v1_5_mix665k.json" \
    --image_folder "$DATA" \
    --model_max_length 2048 \
    --group_by_modality_length True \
    --sts_stage auto --lds_alpha 0.5 --lds_epsilon 0.5 --lds_schedule quadratic \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-5 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --save_strategy steps --save_steps 500 --save_total_limit 2 \
    --logging_steps 10 \
    --activation_checkpointing True \
    --dataloader_num_workers 4 \
    --report_to none \
    "$@"
