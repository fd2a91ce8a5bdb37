#!/usr/bin/env bash
# GPU parity and throughput, run once on a lent GPU machine (torch, JAX and timm
# installed; no TensorFlow, no network). Carry keras and its pure-Python/binary
# dependencies as wheels, downloaded here first (not committed):
#   pip download keras==3.15.1 -d benchmarks/wheels --only-binary=:all: \
#       --platform manylinux_2_28_x86_64 --python-version 3.12   # per Python version
#   bash benchmarks/gpu.sh [PHASE...]  -> $OUT/ (or benchmarks/results/)
# PHASE: parity, inference, train (default: all three). A lent machine's 15
# minutes fit `parity inference` and `train` as two calls of at most 8 minutes
# each (timeout_s 540). ENGINES="timm keras-torch ..." picks engines (default:
# all, see gpu_bench.ENGINES); ENGINE_LIMIT caps each engine's worker in seconds
# (JAX compiles every training cell for tens of seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
# --no-deps with the list: numpy and ml_dtypes come with the image's torch/JAX.
KERAS_BACKEND=torch python -c "import keras" 2>/dev/null ||
    python -m pip install -q --no-index --no-deps --find-links benchmarks/wheels keras==3.15.1 \
        absl-py h5py namex optree rich markdown-it-py mdurl pygments 2>&1 | tail -3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  KERAS_BACKEND=torch python -c "import sys, torch, jax, timm, keras; print(sys.version.split()[0], 'torch', torch.__version__, 'jax', jax.__version__, 'timm', timm.__version__, 'keras', keras.__version__, jax.devices())"
} 2>&1 | tee "$OUT_DIR/gpu_device.txt"
PHASES="${*:-parity inference train}"
SELECT=(--engine-limit "${ENGINE_LIMIT:-100}")
[[ -n "${ENGINES:-}" ]] && SELECT+=(--engines $ENGINES)
# Parity: Keras on the GPU (every route) vs timm fp32; bf16 vs fp32; route gradients.
if [[ " $PHASES " == *" parity "* ]]; then
    for backend in torch jax; do
        KERAS_BACKEND=$backend timeout 120 python benchmarks/gpu_bench.py parity 2>&1 |
            grep -v "^WARNING\|^I0000\|^W0000" | tee -a "$OUT_DIR/gpu_parity.txt"
    done
fi
# Throughput at batch 64 and 256, fp32 and bf16 (timm with autocast for bf16).
if [[ " $PHASES " == *" inference "* ]]; then
    timeout "${THROUGHPUT_TIMEOUT:-300}" python benchmarks/gpu_bench.py throughput "${SELECT[@]}" --out "$OUT_DIR/gpu.json" 2>&1 |
        grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT_DIR/gpu_throughput.txt"
fi
# Training steps, the same engines and cells.
if [[ " $PHASES " == *" train "* ]]; then
    timeout "${TRAIN_TIMEOUT:-480}" python benchmarks/gpu_bench.py throughput --train --seconds 2 "${SELECT[@]}" \
        --out "$OUT_DIR/gpu_train.json" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT_DIR/gpu_train.txt"
fi
