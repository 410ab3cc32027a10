#!/usr/bin/env bash
# Vicuna-7B full fine-tune, one node, FSDP (FastChat's scripts/train_vicuna_7b.sh, unchanged flags).
# Estimated memory: ~22 GB per GPU on 8 GPUs (~35 GB on 4), see README "Sharded training".
# Usage: MODEL=/path/to/llama-7b DATA=data.json OUT=outputs/vicuna-7b NGPU=8 bash scripts/train_vicuna_7b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
torchrun --nproc_per_node="${NGPU:-8}" --master_port="${MASTER_PORT:-20001}" train/train_mem.py \
    --model_name_or_path "${MODEL:?set MODEL}" \
    --data_path "${DATA:?set DATA}" \
    --bf16 True \
    --output_dir "${OUT:-outputs/vicuna-7b}" \
    --num_train_epochs 3 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 2 \
    --gradient_accumulation_steps 16 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 1200 \
    --save_total_limit 10 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --fsdp "full_shard auto_wrap" \
    --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --lazy_preprocess True \
    --packing True
