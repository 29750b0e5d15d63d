#!/usr/bin/env bash
# SFT (token-mean NLL on responses, packed): the warm start before preference training.
#
#   MODEL=/ckpt/qwen2-7b-mcore DATASET=/data/alpaca_en_demo.json SAVE=/ckpt/sft TP=4 PP=2 \
#   NPROC_PER_NODE=8 bash examples/sft_mcore.sh [key=value ...]
#
# Same environment variables as examples/dpo_mcore.sh (NNODES, NPROC_PER_NODE, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, TP, PP, CP, MODEL, DATASET, SAVE; extra arguments are config
# overrides) with examples/configs/sft.yaml. Without MODEL and a GPU: tiny model on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
export ALGO=sft
export DATASET=${DATASET:-${MCORE_ALIGN_DATA:-../shared/data}/alpaca_en_demo.json}
exec bash examples/dpo_mcore.sh "$@"
