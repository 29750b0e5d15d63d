#!/usr/bin/env bash
# DPO on Megatron-Core with torchrun, driven by environment variables.
#
#   MODEL=/ckpt/qwen2-7b-mcore DATASET=/data/prefs.jsonl SAVE=/ckpt/dpo TP=4 PP=2 \
#   NPROC_PER_NODE=8 bash examples/dpo_mcore.sh [key=value ...]
#
# MODEL is a checkpoint written by tools/convert_hf_to_mcore.py (or a previous run).
# With no MODEL and no GPU it builds the tiny demo model and runs on CPU with 2 ranks.
# Extra arguments are config overrides (beta=0.2 learning_rate=1e-6 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ALGO=${ALGO:-dpo}
CONFIG=${CONFIG:-examples/configs/${ALGO}.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=${DEVICE:-cuda}; NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
else
  DEVICE=${DEVICE:-cpu}; NPROC_PER_NODE=${NPROC_PER_NODE:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
TP=${TP:-$([ "$DEVICE" = cpu ] && echo 2 || echo 1)}
PP=${PP:-1}
CP=${CP:-1}
SAVE=${SAVE:-runs/${ALGO}}
TINY_ARGS=()
if [ -z "${MODEL:-}" ]; then
  # The tiny model's 512-token vocabulary makes real records long: keep them by truncating.
  TINY_ARGS=(max_length=512 truncation_strategy=right max_tokens_per_micro_batch=1024 global_batch_size=8)
  MODEL=runs/tiny/mcore
  if [ ! -f "$MODEL/metadata.json" ]; then
    "$PYTHON" tools/make_tiny_model.py --family qwen2 --out runs/tiny/hf
    "$PYTHON" tools/convert_hf_to_mcore.py --hf runs/tiny/hf --out "$MODEL" --overwrite
  fi
fi
DATASET=${DATASET:-${MCORE_ALIGN_DATA:-../shared/data}/dpo_en_demo.json}
# torchrun forwards SIGUSR1 (Slurm's early warning) as well as SIGTERM to the ranks, and
# gives them SHUTDOWN_TIMEOUT seconds to finish the step and write the checkpoint.
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}" \
  -m mcore_align.train --config "$CONFIG" \
  rlhf_type="$ALGO" model.load="$MODEL" "data.dataset=[$DATASET]" train.save="$SAVE" train.device="$DEVICE" \
  tensor_model_parallel_size="$TP" pipeline_model_parallel_size="$PP" context_parallel_size="$CP" \
  ${TINY_ARGS[@]+"${TINY_ARGS[@]}"} "$@"
