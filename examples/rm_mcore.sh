#!/usr/bin/env bash
# Reward model: the LM head replaced by a value head (hidden -> 1), Bradley-Terry loss.
#
#   MODEL=/ckpt/qwen2-7b-mcore DATASET=/data/dpo_en_demo.json SAVE=/ckpt/rm TP=4 PP=2 \
#   NPROC_PER_NODE=8 bash examples/rm_mcore.sh [key=value ...]
#
# Same environment variables as examples/dpo_mcore.sh (NNODES, NPROC_PER_NODE, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, TP, PP, CP, MODEL, DATASET, SAVE; extra arguments are config
# overrides) with examples/configs/rm.yaml. Without MODEL and a GPU: tiny model on 2 CPU ranks.
#
# Then export and score:
#   python tools/convert_mcore_to_hf.py --ckpt "$SAVE" --out /models/rm --sequence-classification
#   python -m mcore_align.score --hf /models/rm --dataset convs.jsonl --out scores.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
export ALGO=rm
export DATASET=${DATASET:-${MCORE_ALIGN_DATA:-../shared/data}/dpo_en_demo.json}
exec bash examples/dpo_mcore.sh "$@"
