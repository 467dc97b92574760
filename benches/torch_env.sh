# Sourced by the benches that run PyTorch beside allcores, from the repository root: checks for
# the release binary (`bin`) and finds a Python with torch (`python`): $TORCH_PYTHON if set, else
# .venv-torch/ in the repository, created and filled with `pip install torch numpy` when missing.
bin=target/release/allcores
if [[ ! -x $bin ]]; then
  echo "no $bin: build it first (cargo build --release -p allcores)" >&2
  exit 1
fi
if [[ -n ${TORCH_PYTHON:-} ]]; then
  python=$TORCH_PYTHON
else
  python=.venv-torch/bin/python
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "creating .venv-torch and installing torch (several GB)..." >&2
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install --quiet torch numpy
  fi
fi
