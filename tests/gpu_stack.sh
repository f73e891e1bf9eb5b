#!/usr/bin/env bash
# Installs the GPU machine's Python stack into DIR (default build/gpu-stack), as near as a
# CPU machine gets to it: the layout tests/gpu_stack.py describes (the device tool's
# KINDS.md: Python 3.12, torch 2.11 cu130, Triton 3.6, numpy 2.5.2). A Python 3.12 venv
# where this machine has a Python 3.12 (pyenv's here), else torch 2.11 for this Python.
# .ci/run calls it for the suite on that stack; benchmarks/fetch_wheels.sh builds the GPU
# machine's himo_fast wheel with its venv. Exit status 1 where the registry cannot serve it.
set -uo pipefail
gpu_stack() {
  local stack=$1 py312="" cand
  for cand in python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo /none)"/versions/3.12.*/bin/python3.12 2>/dev/null); do
    "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && py312=$cand && break
  done
  rm -rf "$stack"
  if [ -z "$py312" ]; then
    echo "gpu_stack: no Python 3.12 here: the GPU machine's torch on $(python3 -V)"
    python3 -m pip install -q --no-deps --target "$stack/torch" "torch==2.11.0" \
      "torchvision==0.26.0" || return 1
    # torch's CUDA libraries: this Python's torch's (the same CUDA 13); pip --target with
    # --no-deps never writes into them
    ln -sfn "$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')" "$stack/torch/nvidia"
    python3 -m pip install -q --no-deps --target "$stack/triton" "triton==3.6.0" || return 1
    return 0
  fi
  local py="$stack/venv/bin/python"
  "$py312" -m venv "$stack/venv" || return 1
  # torch with its own CUDA wheels, as on the machine (4.7 GB, under a minute here: nothing
  # shared with this Python's, whose versions differ), what the suite needs at the machine's
  # versions where they matter, and this machine's Triton over torch's for the interpreter
  "$py" -m pip install -q "torch==2.11.0" "torchvision==0.26.0" typing-extensions filelock \
    sympy networkx jinja2 fsspec setuptools wheel ninja "numpy==2.5.2" \
    "huggingface_hub==1.33.0" "safetensors==0.8.0" timm "open_clip_torch==3.3.0" pytest \
    pytest-benchmark "webdataset<=0.2.86" pandas braceexpand matplotlib || return 1
  "$py" -m pip install -q --no-deps \
    "triton==$(python3 -c 'import triton; print(triton.__version__)')" || return 1
  "$py" -c "import torch; assert torch.__version__.startswith('2.11.0'), torch.__version__" \
    || return 1
  "$py" -m pip install -q --no-deps --target "$stack/triton" "triton==3.6.0" || return 1
}

gpu_stack "${1:-build/gpu-stack}"
