#!/usr/bin/env bash
# Before a GPU call, here (where pip reaches PyPI): the packages the GPU machine lacks, as
# wheels in ./.whl (git-ignored), for its Python 3.12. Name `.whl` in the call's `carry`;
# gpu_check.sh's build stage installs them there.
# Then himo_fast itself, built here for that machine (Python 3.12, torch 2.11 cu130,
# sm_90a) into .whl/himo_fast/ with the source hash it was built from: the build stage
# installs it instead of compiling (a minute of device time) when the tree it gets has
# that hash and the wheel imports there. Built in the venv of tests/gpu_stack.sh, which
# needs a Python 3.12 here (pyenv's); without one it is left out and the GPU call compiles.
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

rm -rf .whl/himo_fast
# The GPU machine's Python stack (tests/gpu_stack.sh), unless an earlier run left it
stack=build/gpu-stack
[ -x $stack/venv/bin/python ] || bash tests/gpu_stack.sh $stack || true
if [ -x $stack/venv/bin/python ]; then
  py="$PWD/$stack/venv/bin/python"
  # From a copy of what travels to the GPU machine (tracked and untracked-not-ignored files):
  # setup.py writes _build_info.py into the tree it builds.
  src=$(mktemp -d)
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src"
  (cd "$src" && HIMO_FAST_CUDA_ARCHS=90a MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel -q \
     --no-build-isolation --no-deps . -w "$OLDPWD/.whl/himo_fast")
  bash "$src/benchmarks/source_hash.sh" > .whl/himo_fast/source.sha256
  rm -rf "$src"
  # It imports there (into a folder of its own: the stack's venv stays without himo_fast)
  "$py" -m pip install -q --no-deps --target build/prebuilt-check --upgrade .whl/himo_fast/himo_fast-*.whl
  (cd /tmp && PYTHONPATH="$OLDPWD/build/prebuilt-check" "$py" -c "import himo_fast._C as c; assert c.built_with_cuda(); print('prebuilt himo_fast imports on', __import__('torch').__version__)")
else
  echo "no Python 3.12 here: no prebuilt himo_fast (the GPU call compiles it, about a minute)"
fi
ls -la .whl .whl/himo_fast 2>/dev/null
du -sh .whl
