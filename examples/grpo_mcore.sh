#!/usr/bin/env bash
# GRPO (or RLOO: ALGO=rloo) on Megatron-Core: the policy samples num_generations responses per
# prompt with megatron-core's inference engine on its own TP/PP chunks, reward functions score
# them, group-relative advantages train it.
#
#   MODEL=/ckpt/qwen7b-sft DATASET=/data/prompts.jsonl SAVE=/ckpt/qwen7b-grpo TP=4 NPROC_PER_NODE=8 \
#   bash examples/grpo_mcore.sh reward_funcs=my_module:my_reward num_generations=8 response_length=512
#
# Prompt-only data in any format the data pipeline reads (TRL `prompt`, `messages` without a
# final assistant turn, ms-swift `query`/`history`/`system`, the prompt of a pair). Same
# environment variables as examples/dpo_mcore.sh (NNODES, NPROC_PER_NODE, TP, PP, SAVE,
# SHUTDOWN_TIMEOUT, PYTHON, ...), config examples/configs/grpo.yaml. Extra arguments are
# config overrides.
# With no MODEL (and no GPU): a tiny built-in default on 2 CPU ranks with a rule reward
# (mcore_align.rewards:even_token_fraction), then a summary with the score at the start and the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export ALGO=${ALGO:-grpo}
export CONFIG=${CONFIG:-examples/configs/grpo.yaml}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export SAVE=${SAVE:-runs/$ALGO}
EXTRA=()
if [ -z "${MODEL:-}" ]; then
  TINY=runs/online_tiny
  "$PYTHON" -m mcore_align.online_demo prepare --out "$TINY"
  export MODEL=$TINY/mcore DATASET=${DATASET:-$TINY/prompts.jsonl}
  EXTRA=(reward_funcs=mcore_align.rewards:even_token_fraction max_length=96 response_length=24
         num_generations=4 global_batch_size=4 train_iters=14 learning_rate=1e-2 lr_decay_style=constant
         max_tokens_per_micro_batch=1024 eval_interval=null val_fraction=0 save_interval=null)
fi
: "${DATASET:?set DATASET to a prompt dataset}"
export DATASET
bash examples/dpo_mcore.sh ${EXTRA[@]+"${EXTRA[@]}"} "$@"
"$PYTHON" -m mcore_align.online_demo summary --save "$SAVE"
