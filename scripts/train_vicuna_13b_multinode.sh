#!/usr/bin/env bash
# Vicuna-13B full fine-tune on several nodes with torchrun + FSDP. Run this script on every node.
# Estimated memory: ~24 GB per GPU on 2 nodes x 8 GPUs (~40 GB on one node of 8), see README.
# Usage on node k of N:  NNODES=N NODE_RANK=k MASTER_ADDR=<node 0 address> MODEL=... DATA=... \
#                        bash scripts/train_vicuna_13b_multinode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
torchrun --nnodes="${NNODES:?set NNODES}" --node_rank="${NODE_RANK:?set NODE_RANK}" \
    --nproc_per_node="${NGPU:-8}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-20001}" \
    train/train_mem.py \
    --model_name_or_path "${MODEL:?set MODEL}" --data_path "${DATA:?set DATA}" --output_dir "${OUT:-outputs/vicuna-13b}" \
    --bf16 True --tf32 True --num_train_epochs 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --save_strategy steps --save_steps 1200 --save_total_limit 10 --learning_rate 2e-5 --weight_decay 0. \
    --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
    --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
    --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True --packing True
