#!/usr/bin/env bash
# Single-GPU QLoRA for a 24 GB workstation: 4-bit NF4 base + LoRA on all linear layers, packing,
# gradient checkpointing. Estimated memory: 7B ~8 GB, 13B ~13 GB at seq 2048 (micro-batch 1); raise
# --per_device_train_batch_size while it fits.
# Usage: MODEL=... DATA=... bash scripts/train_qlora_24gb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python train/train_lora.py \
    --model_name_or_path "${MODEL:?set MODEL}" --data_path "${DATA:?set DATA}" --output_dir "${OUT:-outputs/qlora}" \
    --q_lora True --bits 4 --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
    --bf16 True --gradient_checkpointing True --packing True --model_max_length 2048 \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --num_train_epochs 3 \
    --learning_rate 2e-4 --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 10 \
    --save_strategy steps --save_steps 500 --save_total_limit 3 --template "${TEMPLATE:-vicuna_v1.1}"
