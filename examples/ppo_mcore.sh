#!/usr/bin/env bash
# PPO on Megatron-Core: policy (from SFT), frozen reference, reward model and/or reward
# functions, and a critic (value model, initialised from the reward model) trained beside the
# policy. Rollouts use megatron-core's inference engine on the policy's own TP/PP chunks.
#
#   MODEL=/ckpt/qwen7b-sft REWARD_MODEL=/ckpt/qwen7b-rm DATASET=/data/prompts.jsonl SAVE=/ckpt/qwen7b-ppo \
#   TP=4 PP=2 NPROC_PER_NODE=8 bash examples/ppo_mcore.sh kl_coef=0.05 response_length=512
#
# REWARD_MODEL: a reward-model checkpoint of this project (rlhf_type=rm). Reward functions:
# reward_funcs=module:fn (summed with the reward model's score when both are given).
# Same environment variables as examples/dpo_mcore.sh; config examples/configs/ppo.yaml.
# With no MODEL (and no GPU): a tiny built-in default on 2 CPU ranks: SFT and a reward model
# are trained on the spot on the demo task, then PPO, then a summary with the score at the
# start and the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
EXTRA=()
if [ -z "${MODEL:-}" ]; then
  TINY=runs/online_tiny
  "$PYTHON" -m mcore_align.online_demo prepare --out "$TINY"
  SMALL=(max_length=96 max_tokens_per_micro_batch=1024 eval_interval=null val_fraction=0 save_interval=null
         lr_decay_style=constant global_batch_size=8)
  # SFT on the chosen responses, then a reward model on the pairs: what PPO starts from.
  ALGO=sft CONFIG=examples/configs/sft.yaml MODEL=$TINY/mcore DATASET=$TINY/prefs.jsonl SAVE=$TINY/sft \
    bash examples/dpo_mcore.sh "${SMALL[@]}" train_iters=${SFT_STEPS:-12} learning_rate=2e-3
  ALGO=rm CONFIG=examples/configs/rm.yaml MODEL=$TINY/sft DATASET=$TINY/prefs.jsonl SAVE=$TINY/rm \
    bash examples/dpo_mcore.sh "${SMALL[@]}" train_iters=${RM_STEPS:-12} learning_rate=2e-3
  MODEL=$TINY/sft REWARD_MODEL=${REWARD_MODEL:-$TINY/rm} DATASET=${DATASET:-$TINY/prompts.jsonl}
  EXTRA=("${SMALL[@]}" response_length=24 train_iters=${PPO_STEPS:-16} learning_rate=1e-3
         num_ppo_epochs=2 num_mini_batches=2)
fi
: "${DATASET:?set DATASET to a prompt dataset}"
[ -z "${REWARD_MODEL:-}" ] || EXTRA+=("reward_model=$REWARD_MODEL")
export ALGO=ppo CONFIG=${CONFIG:-examples/configs/ppo.yaml} MODEL DATASET SAVE=${SAVE:-runs/ppo}
bash examples/dpo_mcore.sh ${EXTRA[@]+"${EXTRA[@]}"} "$@"
"$PYTHON" -m mcore_align.online_demo summary --save "$SAVE"
