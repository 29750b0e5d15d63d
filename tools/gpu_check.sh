#!/usr/bin/env bash
# One command for a GPU machine: install offline, run the CUDA tests and the GPU benchmarks,
# print a table and write everything under $OUT (or ./gpu_check_out).
#
#   tools/gpu_check.sh                 # on the GPU machine (wheels from .gpu_wheels/)
#   tools/gpu_check.sh --dry-run       # on CPU: same steps, CUDA tests collected and skipped,
#                                      # benchmarks in a tiny CPU configuration, no install
# Options:
#   --wheels DIR      wheels made by tools/prepare_gpu_wheels.sh (default .gpu_wheels)
#   --skip-install    use the Python environment as it is
#   --install         install the wheels even with --dry-run (into a temp --target folder)
#   --python PY       interpreter (default: python3 on the GPU machine, .venv/bin/python in dry runs)
#   --quick           GPU: the training benchmark with one variant and 3 steps
#   --only WHAT       tests | newest | bench: one part only (to split the check over calls)
#   --no-newest       skip the second CUDA test pass with the newest megatron-core
#
# The CUDA tests run twice when DIR/newest/ holds a megatron-core wheel (prepare_gpu_wheels.sh
# puts the newest cp312 release there): with the pinned version, then with that one (installed
# into its own --target folder placed before the first), to establish which megatron-core
# versions setup.py may admit. In a dry run the second pass uses the environment's version.
#
# For the device machine of this workplace (one H200, Python 3.12, torch 2.11, no index):
#   tools/prepare_gpu_wheels.sh     # here, once
#   run(command="tools/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
# Exit status: that of the CUDA tests (the benchmarks' failures are reported in the table).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0; INSTALL=auto; WHEELS=.gpu_wheels; PY=""; QUICK=0; ONLY=all; NEWEST=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-install) INSTALL=no ;;
    --install) INSTALL=yes ;;
    --wheels) WHEELS=$2; shift ;;
    --python) PY=$2; shift ;;
    --quick) QUICK=1 ;;
    --only) ONLY=$2; shift; case "$ONLY" in tests|newest|bench) ;; *) echo "gpu_check: --only tests|newest|bench" >&2; exit 2 ;; esac ;;
    --no-newest) NEWEST=0 ;;
    -h|--help) sed -n 2,27p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUTDIR=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1 MCORE_ALIGN_DATA=${MCORE_ALIGN_DATA:-/nonexistent}

# 1. install: carried wheels into a --target folder placed first on PYTHONPATH
if [ $INSTALL = yes ] || { [ $INSTALL = auto ] && [ $DRY = 0 ]; }; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d /tmp/gpu_check_site.XXXX)
    say "== install: $(ls "$WHEELS"/*.whl | xargs -n1 basename | tr '\n' ' ')-> $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl >>"$LOG" 2>&1 || { say "install FAILED (see $LOG)"; exit 3; }
    export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    say "== install: no wheels in $WHEELS (run tools/prepare_gpu_wheels.sh and carry it); using the environment"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  say "== install: skipped"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)'}")
for m in ("megatron.core", "transformers", "huggingface_hub", "tokenizers", "safetensors", "mcore_align"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:16s} {getattr(mod, '__version__', '')}  {mod.__file__}")
    except Exception as e:  # reported, the tests below then fail with the real error
        print(f"  {m:16s} IMPORT FAILED: {e!r}")
PYEOF

# 2. CUDA tests (on CPU: collected and skipped, which checks they import and are marked)
TESTS_RC=0
if [ $ONLY = all ] || [ $ONLY = tests ]; then
say "== CUDA tests"
"$PY" -m pytest -q -rA -m cuda tests/cuda -p no:cacheprovider --junitxml="$OUTDIR/cuda_tests.xml" 2>&1 \
  | tee "$OUTDIR/cuda_tests.log" | tail -25 | tee -a "$LOG"
TESTS_RC=${PIPESTATUS[0]}
else
  echo "(not run: --only $ONLY)" > "$OUTDIR/cuda_tests.log"
fi

# 2b. the same CUDA tests with the newest megatron-core (informational: not in the exit status)
NEWEST_RC="not run"; NEWEST_WHL=$(ls "$WHEELS"/newest/megatron_core-*.whl 2>/dev/null | tail -1)
if [ $NEWEST = 1 ] && { [ $ONLY = all ] || [ $ONLY = newest ]; }; then
  NEWEST_PP=$PYTHONPATH
  if [ -n "$NEWEST_WHL" ] && [ $DRY = 0 -o $INSTALL = yes ] && [ $INSTALL != no ]; then
    SITE_NEW=$(mktemp -d /tmp/gpu_check_newest.XXXX)
    say "== CUDA tests with the newest megatron-core: $(basename "$NEWEST_WHL") -> $SITE_NEW"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE_NEW" "$WHEELS"/newest/*.whl \
      >>"$LOG" 2>&1 || say "install of $NEWEST_WHL FAILED (see $LOG)"
    NEWEST_PP=$REPO:$SITE_NEW:$PYTHONPATH  # before the pinned wheels' folder
  else
    say "== CUDA tests with the newest megatron-core: no wheel installed ($( [ $DRY = 1 ] && echo 'dry run' || echo "none in $WHEELS/newest" )); the environment's version"
  fi
  PYTHONPATH=$NEWEST_PP "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__, m.__file__)" 2>&1 \
    | tee "$OUTDIR/cuda_tests_newest.log" | tee -a "$LOG"
  PYTHONPATH=$NEWEST_PP "$PY" -m pytest -q -rA -m cuda tests/cuda -p no:cacheprovider \
    --junitxml="$OUTDIR/cuda_tests_newest.xml" 2>&1 | tee -a "$OUTDIR/cuda_tests_newest.log" | tail -25 | tee -a "$LOG"
  NEWEST_RC=${PIPESTATUS[0]}
else
  echo "(not run: --only $ONLY / --no-newest)" > "$OUTDIR/cuda_tests_newest.log"
fi

# 3. benchmarks
say "== benchmarks"
declare -A BENCH_RC
if [ $DRY = 1 ]; then
  TRAIN_ARGS=(--size tiny --device cpu --variants fp32 --steps 2 --global-batch 4 --words 30 --max-length 256
              --tokens-per-micro-batch 1024)
  HEAD_ARGS=(--device cpu --tokens 256 --hidden 64 --vocab 4096)
elif [ $QUICK = 1 ]; then
  TRAIN_ARGS=(--size 0.5b --variants bf16 --steps 3)
  HEAD_ARGS=(--device cuda)
else
  TRAIN_ARGS=(--size 0.5b)
  HEAD_ARGS=(--device cuda)
fi
if [ $ONLY = all ] || [ $ONLY = bench ]; then
  "$PY" benchmarks/gpu/bench_train.py "${TRAIN_ARGS[@]}" --work /tmp/gpu_check_work --out "$OUTDIR" \
    > "$OUTDIR/bench_train.log" 2>&1; BENCH_RC[train]=$?
  "$PY" benchmarks/bench_logprobs.py "${HEAD_ARGS[@]}" > "$OUTDIR/bench_logprobs.log" 2>&1; BENCH_RC[logprobs]=$?
else
  BENCH_RC[train]="not run"; BENCH_RC[logprobs]="not run"
  echo "(not run: --only $ONLY)" | tee "$OUTDIR/bench_train.log" > "$OUTDIR/bench_logprobs.log"
fi

# 4. the table (also written as $OUTDIR/summary.md)
{
  echo "# gpu_check $( [ $DRY = 1 ] && echo '(DRY RUN on CPU)' ) $(date -u +%FT%TZ)"
  echo
  echo "CUDA tests: exit $TESTS_RC; $(grep -E '(passed|failed|skipped|error|not run)' "$OUTDIR/cuda_tests.log" | tail -1)"
  grep -E '^(PASSED|FAILED|SKIPPED|ERROR)' "$OUTDIR/cuda_tests.log" | sed 's/^/    /'
  echo
  echo "CUDA tests again, $(grep -m1 '^megatron-core' "$OUTDIR/cuda_tests_newest.log" | cut -d' ' -f1-2 || echo 'newest megatron-core'): exit $NEWEST_RC; $(grep -E '(passed|failed|skipped|error|not run)' "$OUTDIR/cuda_tests_newest.log" | tail -1)"
  grep -E '^(PASSED|FAILED|SKIPPED|ERROR)' "$OUTDIR/cuda_tests_newest.log" | sed 's/^/    /'
  echo
  echo "bench_train (exit ${BENCH_RC[train]}):"
  if [ -f "$OUTDIR/bench_train.md" ] && [ ${BENCH_RC[train]} = 0 ]; then cat "$OUTDIR/bench_train.md"; else tail -5 "$OUTDIR/bench_train.log"; fi
  echo
  echo "bench_logprobs (exit ${BENCH_RC[logprobs]}):"
  tail -8 "$OUTDIR/bench_logprobs.log"
} > "$OUTDIR/summary.md"
cat "$OUTDIR/summary.md" | tee -a "$LOG"
exit $TESTS_RC
