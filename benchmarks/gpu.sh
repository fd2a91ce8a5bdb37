#!/usr/bin/env bash
# GPU benchmark, run once on a lent GPU machine (torch, JAX and timm installed; no
# TensorFlow). Carry a keras wheel in benchmarks/wheels/ (pip download keras --no-deps
# -d benchmarks/wheels) since the machine has no network.
#   bash benchmarks/gpu.sh            -> $OUT/gpu.json (or benchmarks/results/gpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
python -c "import keras" 2>/dev/null || pip install --no-index --no-deps benchmarks/wheels/keras-*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu_device.txt"
# Parity on the GPU: Keras (cuDNN LSTM) vs timm with random weights, both backends.
for backend in torch jax; do
    KERAS_BACKEND=$backend python benchmarks/gpu_bench.py parity | tee -a "$OUT_DIR/gpu_parity.txt"
done
# Throughput at batch 64 and 256, fp32 and bf16; timm with AMP for bf16.
python benchmarks/gpu_bench.py throughput --out "$OUT_DIR/gpu.json"
