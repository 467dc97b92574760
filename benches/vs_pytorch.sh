#!/usr/bin/env bash
# allcores against PyTorch: samples/s of the same models, measured side by side in one run.
#
#   benches/vs_pytorch.sh [--threads 1,2,4] [--models mlp,cnn] [--backends ndarray,flex] [--steps N]
#                         [--warmup W] [--rounds R] [--out results.json]
#
# Cells: MLP 784-512-512-10 at batch 128 and 256, the CNN of examples/mnist-cnn.toml at batch
# 128; backends ndarray and flex; each thread count (default 1,2, or $BENCH_THREADS). Each
# cell runs `allcores bench` and then PyTorch (benches/torch_steps.py), alternating, R times
# (default 3; medians, and the median of the rounds' ratios). Adam,
# lr 1e-3, f32. Prints a Markdown table: both samples/s, their ratio, and each side's
# parallel efficiency per model. Not part of CI.
#
# PyTorch: $TORCH_PYTHON if set, else .venv-torch/ in the repository, created and filled with
# `pip install torch` when missing (a download of several GB). Needs the release binary:
# cargo build --release -p allcores
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/torch_env.sh
exec "$python" benches/vs_pytorch.py --bin "$bin" "$@"
