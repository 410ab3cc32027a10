#!/usr/bin/env bash
# Single-GPU QLoRA on a 16 GB NVIDIA T4 (or V100, RTX 20xx): these GPUs have no bf16, so compute is fp16 with
# dynamic loss scaling (--fp16 True); the 4-bit NF4 base stores its blocks in fp16 too. Estimated memory: 7B
# ~7 GB at seq 2048 (micro-batch 1, gradient checkpointing), 13B ~12 GB at seq 1024. sdpa attention (flash-attn
# 2 needs Ampere or newer).
# Usage: MODEL=... DATA=... bash scripts/train_qlora_t4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python train/train_lora.py \
    --model_name_or_path "${MODEL:?set MODEL}" --data_path "${DATA:?set DATA}" --output_dir "${OUT:-outputs/qlora-t4}" \
    --q_lora True --bits 4 --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
    --fp16 True --gradient_checkpointing True --packing True --model_max_length 2048 \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --num_train_epochs 3 \
    --learning_rate 2e-4 --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 10 \
    --save_strategy steps --save_steps 500 --save_total_limit 3 --template "${TEMPLATE:-vicuna_v1.1}"
