#!/usr/bin/env bash
# allcores against PyTorch on the character-level GPT: tokens/s of the same model, recipe and
# text, measured side by side in alternating rounds.
#
#   benches/vs_pytorch_gpt.sh [--threads 1,2] [--backends ndarray,flex] [--precision f32|bf16]
#                             [--steps N] [--warmup W] [--rounds R] [--out results.json]
#
# PyTorch's side is ../shared/bench/torch_gpt.py (or --torch-gpt PATH). Python: $TORCH_PYTHON
# if set, else .venv-torch/ in the repository, created and filled with `pip install torch`
# when missing. Needs the release binary: cargo build --release -p allcores. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/torch_env.sh
exec "$python" benches/vs_pytorch_gpt.py --bin "$bin" --python "$python" "$@"
