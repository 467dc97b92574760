#!/usr/bin/env bash
# Gradient accumulation: memory and speed, measured side by side in one run.
#
#   benches/accumulation.sh [THREADS]      (default: all available)
#
# Memory: the CNN with (batch 32, 8 micro-batches a step) against (batch 256, 1): the same
#   256-sample steps; peak RSS from each run's summary.
# Speed: (batch 32, k = 8) against (batch 32, k = 1): the same micro-batch size, so the
#   difference is what accumulation itself costs per sample.
# Needs the release binary: cargo build --release
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/allcores
threads=${1:-auto}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # name config steps batch k
  local name=$1 config=$2 steps=$3 batch=$4 k=$5
  "$bin" train "$config" --out "$out/$name" --json --quiet \
    --set training.max_steps="$steps" --set training.batch_size="$batch" \
    --set training.accumulation_steps="$k" --set training.threads="$threads" \
    --set checkpoint.every_epochs=0 | tail -n 1 |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"$name\t{d['batch_size']}\t{d['accumulation_steps']}\t{d['steps']}\t{d['samples_per_second']:.0f}\t{d['peak_rss_bytes']/2**20:.1f}\")"
}

echo -e "run\tbatch\tk\tsteps\tsamples/s\tpeak RSS MiB"
# Memory: equal effective batch (256), steps of equal samples.
run cnn-256x1 examples/mnist-cnn.toml 12 256 1
run cnn-32x8 examples/mnist-cnn.toml 12 32 8
# Speed at the same micro-batch size (32): 768 micro-batches either way.
run mlp-32x1-speed examples/mnist-mlp.toml 768 32 1
run mlp-32x8-speed examples/mnist-mlp.toml 96 32 8
run cnn-32x1-speed examples/mnist-cnn.toml 192 32 1
run cnn-32x8-speed examples/mnist-cnn.toml 24 32 8
