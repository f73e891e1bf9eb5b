#!/usr/bin/env bash
# Before a GPU call, here (where pip reaches PyPI): the packages the GPU machine lacks, as
# wheels in ./.whl (git-ignored), for its Python 3.12. Name `.whl` in the call's `carry`;
# gpu_check.sh's build stage installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || grep -qx "/.whl/" .gitignore \
  || echo "/.whl/" >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
# open_clip and what it needs that the machine's image lacks; webdataset and braceexpand
# for tests/test_train.py; inf_cl, the peer of issue 16's table (benchmarks/goals.py)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  open_clip_torch==3.3.0 ftfy wcwidth "webdataset==0.2.86" braceexpand inf_cl==1.2.1
ls -la .whl
du -sh .whl
