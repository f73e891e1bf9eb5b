#!/usr/bin/env bash
# The sha256 of what `pip install .` builds himo_fast from (the package, the kernels, the
# C++/CUDA sources, setup.py, pyproject.toml), generated and compiled files left out.
# fetch_wheels.sh stores it beside the prebuilt wheel; gpu_check.sh installs that wheel
# only where the tree at hand gives the same hash.
set -euo pipefail
cd "$(dirname "$0")/.."
find himo_fast kernels csrc setup.py pyproject.toml -type f \
    -not -path "*/__pycache__/*" -not -name "*.so" -not -name "_build_info.py" -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d" " -f1
