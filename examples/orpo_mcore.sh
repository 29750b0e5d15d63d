#!/usr/bin/env bash
# ORPO (reference-free, SFT + odds-ratio term; no reference model is built).
#
#   MODEL=/ckpt/qwen2-7b-mcore DATASET=/data/dpo_en_demo.json SAVE=/ckpt/orpo TP=4 PP=2 \
#   NPROC_PER_NODE=8 bash examples/orpo_mcore.sh [key=value ...]
#
# Same environment variables as examples/dpo_mcore.sh (NNODES, NPROC_PER_NODE, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, TP, PP, CP, MODEL, DATASET, SAVE; extra arguments are config
# overrides) with examples/configs/orpo.yaml. Without MODEL and a GPU: tiny model on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
export ALGO=orpo
export DATASET=${DATASET:-${MCORE_ALIGN_DATA:-../shared/data}/dpo_en_demo.json}
exec bash examples/dpo_mcore.sh "$@"
