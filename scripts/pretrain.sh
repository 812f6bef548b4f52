#!/usr/bin/env bash
# bash scripts/pretrain.sh [extra sts-train arguments]
# Stage 1 of LLaVA-1.5 (feature alignment) with STS: Vicuna-7B + CLIP ViT-L/14-336, only the projector trains, the
# Visual Token Compressor keeps half of each image's 576 visual tokens. LLaVA-1.5's hyperparameters: global batch 256
# (8 GPUs x 32), lr 1e-3, 1 epoch, warmup 3%, cosine. Data: LLaVA-Pretrain (blip_laion_cc_sbu_558k.json + images/).
set -euo pipefail
DATA=${DATA:-./playground/data/LLaVA-Pretrain}
OUT=${OUT:-./checkpoints/llava-v1.5-7b-sts-pretrain}
deepspeed --num_gpus "${NUM_GPUS:-8}" --module sts_trainer.llava.train \
    --deepspeed configs/zero2.json \
    --language_model lmsys/vicuna-7b-v1.5 \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --vision_feature_layer -2 \
    --training_stage alignment \
    --data_path "$DATA/blip_laion_cc_sbu_558k.json" \
    --image_folder "$DATA/images" \
    --model_max_length 2048 \
    --sts_stage auto --vtc_keep_ratio 0.5 --vtc_strategy uniform \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --gradient_accumulation_steps 1 \
    --learning_rate 1e-3 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --save_strategy steps --save_steps 500 --save_total_limit 2 \
    --logging_steps 10 \
    --activation_checkpointing True \
    --dataloader_num_workers 4 \
    --report_to none \
    "$@"
