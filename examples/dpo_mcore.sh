#!/usr/bin/env bash
# DPO on Megatron-Core with torchrun, driven by environment variables.
#
#   MODEL=/ckpt/qwen2-7b-mcore DATASET=/data/prefs.jsonl SAVE=/ckpt/dpo TP=4 PP=2 \
#   NPROC_PER_NODE=8 bash examples/dpo_mcore.sh [key=value ...]
#
# MODEL is a checkpoint written by tools/convert_hf_to_mcore.py (or a previous run).
# With no MODEL and no GPU it builds the tiny demo model and runs on CPU with 2 ranks.
# Extra arguments are config overrides (beta=0.2 learning_rate=1e-6 ...).
#
# PYTHON: the interpreter that runs the job (default .venv/bin/python if present, else
#   python3). It also probes the GPUs, so the probe sees the torch the job will use; a
#   probe that fails is an error (shown), never "no GPU".
# DEVICE (cuda|cpu) and NPROC_PER_NODE: default from the probe (all visible GPUs, or 2 CPU ranks).
# SHUTDOWN_TIMEOUT (240 s): after SIGTERM/SIGUSR1, how long torchrun lets the ranks finish
#   the step and write the checkpoint before it kills them. Keep it below the time between
#   the signal and the hard kill (Slurm: see examples/slurm/dpo.sbatch for the arithmetic).
# DRY_RUN=1: print the torchrun command and exit.
#
# Exit status: torchrun's, except after SIGTERM/SIGUSR1/SIGINT/SIGHUP/SIGQUIT: torchrun then
# always exits 1, so this script exits 0 when a checkpoint completed after the signal (the
# run can be relaunched to resume) and torchrun's status otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ME=dpo_mcore.sh
ALGO=${ALGO:-dpo}
CONFIG=${CONFIG:-examples/configs/${ALGO}.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# ---- device: probed with the job's own interpreter, errors visible -----------------------
probe_gpus() {  # prints the number of GPUs torch sees under $PYTHON
  local n
  if ! n=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"); then
    echo "$ME: probing the GPUs with PYTHON=$PYTHON failed (error above). Set PYTHON to the interpreter" \
         "that has torch, or set DEVICE and NPROC_PER_NODE." >&2
    return 1
  fi
  case "$n" in
    ''|*[!0-9]*) echo "$ME: the GPU probe with PYTHON=$PYTHON printed '$n', not a GPU count" >&2; return 1 ;;
  esac
  echo "$n"
}
NGPU=
if [ -z "${DEVICE:-}" ] || { [ "$DEVICE" = cuda ] && [ -z "${NPROC_PER_NODE:-}" ]; }; then
  NGPU=$(probe_gpus) || exit 1
  DEVICE=${DEVICE:-$([ "$NGPU" -gt 0 ] && echo cuda || echo cpu)}
fi
if [ "$DEVICE" = cuda ]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$NGPU}
  if [ "$NPROC_PER_NODE" -lt 1 ]; then
    echo "$ME: DEVICE=cuda but $PYTHON sees no GPU; set NPROC_PER_NODE or DEVICE=cpu" >&2
    exit 1
  fi
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
TP=${TP:-$([ "$DEVICE" = cpu ] && echo 2 || echo 1)}
PP=${PP:-1}
CP=${CP:-1}
echo "$ME: DEVICE=$DEVICE NPROC_PER_NODE=$NPROC_PER_NODE TP=$TP PP=$PP CP=$CP" \
     "(PYTHON=$PYTHON${NGPU:+, $NGPU GPUs visible})" >&2
SAVE=${SAVE:-runs/${ALGO}}
TINY_ARGS=()
if [ -z "${MODEL:-}" ]; then
  # The tiny model's 512-token vocabulary makes real records long: keep them by truncating.
  TINY_ARGS=(max_length=512 truncation_strategy=right max_tokens_per_micro_batch=1024 global_batch_size=8)
  MODEL=runs/tiny/mcore
  if [ ! -f "$MODEL/metadata.json" ] && [ -z "${DRY_RUN:-}" ]; then
    "$PYTHON" tools/make_tiny_model.py --family qwen2 --out runs/tiny/hf
    "$PYTHON" tools/convert_hf_to_mcore.py --hf runs/tiny/hf --out "$MODEL" --overwrite
  fi
fi
DATASET=${DATASET:-${MCORE_ALIGN_DATA:-../shared/data}/dpo_en_demo.json}
# torchrun forwards SIGUSR1 (Slurm's early warning) as well as SIGTERM to the ranks, and
# gives them SHUTDOWN_TIMEOUT seconds to finish the step and write the checkpoint.
CMD=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT"
  -m mcore_align.train --config "$CONFIG"
  rlhf_type="$ALGO" model.load="$MODEL" "data.dataset=[$DATASET]" train.save="$SAVE" train.device="$DEVICE"
  tensor_model_parallel_size="$TP" pipeline_model_parallel_size="$PP" context_parallel_size="$CP"
  ${TINY_ARGS[@]+"${TINY_ARGS[@]}"} "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

# ---- run torchrun as a child, so a signal-initiated clean stop can exit 0 ----------------
# torchrun exits 1 after any signal it forwards, even when every rank checkpointed and
# exited 0. A stop counts as clean when latest_checkpointed_iteration.txt (written last,
# atomically, once a checkpoint is complete) changed and was written after the signal.
SAVE_DIR=$SAVE
for arg in "$@"; do case "$arg" in train.save=*|save=*) SAVE_DIR=${arg#*=} ;; esac; done
LATEST="$SAVE_DIR/latest_checkpointed_iteration.txt"
LATEST_BEFORE=$(cat "$LATEST" 2>/dev/null || true)
SIGNAL_NAME= SIGNAL_TIME=0 TORCHRUN_PID=
on_signal() {
  if [ -n "$SIGNAL_NAME" ]; then  # a second signal would cut torchrun's wait for the checkpoint short
    echo "$ME: SIG$1 ignored: already stopping after SIG$SIGNAL_NAME" >&2
    return
  fi
  SIGNAL_NAME=$1 SIGNAL_TIME=$(date +%s)
  echo "$ME: SIG$1: forwarding to torchrun; the ranks finish the step and checkpoint" \
       "(up to SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT}s)" >&2
  [ -z "$TORCHRUN_PID" ] || kill -s "$1" "$TORCHRUN_PID" 2>/dev/null || true
}
for sig in TERM INT HUP QUIT USR1; do trap "on_signal $sig" "$sig"; done
"${CMD[@]}" &
TORCHRUN_PID=$!
[ -z "$SIGNAL_NAME" ] || kill -s "$SIGNAL_NAME" "$TORCHRUN_PID" 2>/dev/null || true  # arrived during start
while :; do
  rc=0; wait "$TORCHRUN_PID" || rc=$?
  # A trapped signal interrupts `wait` (status > 128) while torchrun runs on: wait again.
  if [ "$rc" -gt 128 ] && kill -0 "$TORCHRUN_PID" 2>/dev/null; then continue; fi
  break
done
if [ "$rc" -ne 0 ] && [ -n "$SIGNAL_NAME" ]; then
  LATEST_AFTER=$(cat "$LATEST" 2>/dev/null || true)
  WRITTEN=$(stat -c %Y "$LATEST" 2>/dev/null || echo 0)
  if [ -n "$LATEST_AFTER" ] && [ "$LATEST_AFTER" != "$LATEST_BEFORE" ] && [ "$WRITTEN" -ge "$SIGNAL_TIME" ]; then
    echo "$ME: stopped by SIG$SIGNAL_NAME with a complete checkpoint at iteration $LATEST_AFTER in $SAVE_DIR" \
         "(torchrun exited $rc, as it does after any signal); exiting 0, relaunch to resume" >&2
    exit 0
  fi
  echo "$ME: stopped by SIG$SIGNAL_NAME but no checkpoint completed after it in $SAVE_DIR" \
       "(latest: ${LATEST_AFTER:-none}); exiting $rc" >&2
fi
exit "$rc"
