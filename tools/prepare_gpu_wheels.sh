#!/usr/bin/env bash
# Download the wheels the GPU machine lacks, for tools/gpu_check.sh to install offline.
#
# The device machine (Python 3.12, torch 2.11 CUDA, no package index) has torch, numpy,
# packaging and most utilities, but not megatron-core, and other versions of transformers
# and huggingface_hub than constraints.txt pins. This fetches, for CPython 3.12 on
# x86-64 manylinux, binary wheels only, WITHOUT dependencies (each needed one is named):
#
#   tools/prepare_gpu_wheels.sh [DIR]        # DIR defaults to .gpu_wheels (git-ignored)
#
# Versions come from constraints.txt where it pins them. Also, into DIR/newest/, the NEWEST
# megatron-core wheel for CPython 3.12 (0.17+ require Python >= 3.12; set NEWEST_MCORE=0 to
# skip, or NEWEST_MCORE=0.19.2 for a given one): tools/gpu_check.sh runs the CUDA tests a
# second time with it, to establish which versions setup.py may admit. Then carry DIR:
#   run(command="tools/gpu_check.sh", carry=[".gpu_wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# What torch 2.11's image lacks (megatron-core) or holds at another version than
# constraints.txt (transformers 5.17 there; 5.23 needs regex >= 2025.10.22). NOT carried:
# huggingface_hub 2.x (needs httpx2 and click >= 8.4.2, not on the image; the image's 1.33
# satisfies transformers 5.23's >= 1.31), and what the image has at a compatible version
# (tokenizers, safetensors, PyYAML, tqdm, psutil, einops, numpy, packaging). Add more with
# EXTRA="tokenizers psutil" tools/prepare_gpu_wheels.sh.
PACKAGES=(megatron-core transformers regex ${EXTRA:-})
pin() {  # "name==version" from constraints.txt, or the bare name
  local v
  v=$(grep -i -E "^$1==" constraints.txt | head -1 || true)
  echo "${v:-$1}"
}
mkdir -p "$DIR"
specs=()
for p in "${PACKAGES[@]}"; do specs+=("$(pin "$p")"); done
echo "downloading into $DIR: ${specs[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" "${specs[@]}"
NEWEST=${NEWEST_MCORE:-latest}
if [ "$NEWEST" != 0 ]; then
  spec=megatron-core; [ "$NEWEST" != latest ] && spec="megatron-core==$NEWEST"
  rm -rf "$DIR/newest"; mkdir -p "$DIR/newest"
  echo "downloading into $DIR/newest: $spec (newest for cp312)"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR/newest" "$spec"
  ls "$DIR/newest"
fi
du -sh "$DIR"
echo "ok: carry $DIR (limit: 64 MiB together with the working tree)"
