#!/usr/bin/env bash
# LoRA / QLoRA on one node with DeepSpeed ZeRO-2 (FastChat's train_lora.py command form).
# Estimated memory (7B, seq 2048, micro-batch 1, gradient checkpointing): LoRA on a bf16 base ~17 GB
# per GPU; QLoRA (Q_LORA=True) ~8 GB per GPU. ZeRO-3 (ds_configs/zero3.json) works for LoRA and QLoRA.
# Usage: MODEL=... DATA=... Q_LORA=True NGPU=4 bash scripts/train_lora_deepspeed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deepspeed --num_gpus "${NGPU:-4}" train/train_lora.py \
    --model_name_or_path "${MODEL:?set MODEL}" \
    --lora_r 8 --lora_alpha 16 --lora_dropout 0.05 \
    --data_path "${DATA:?set DATA}" \
    --output_dir "${OUT:-outputs/lora}" \
    --num_train_epochs 3 \
    --bf16 True \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --save_strategy steps --save_steps 1200 --save_total_limit 3 \
    --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --logging_steps 1 --tf32 True --model_max_length 2048 \
    --q_lora "${Q_LORA:-False}" \
    --deepspeed ds_configs/zero2.json \
    --gradient_checkpointing True \
    --packing True
