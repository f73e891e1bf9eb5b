#!/usr/bin/env bash
# Before a GPU call, here (where pip reaches PyPI): the packages the GPU machine lacks, as
# wheels in ./.whl (git-ignored), for its Python 3.12. Name `.whl` in the call's `carry`;
# gpu_check.sh's build stage installs them there.
# Then himo_fast itself, built here for that machine (Python 3.12, torch 2.11 cu130,
# sm_90a) into .whl/himo_fast/ with the source hash it was built from: the build stage
# installs it instead of compiling (a minute of device time) when the tree it gets has
# that hash and the wheel imports there. Needs a Python 3.12 here (python3.12 on the PATH,
# or pyenv's); without one it is left out and the GPU call compiles.
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

py312=
for cand in python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo /none)"/versions/3.12.*/bin/python3.12 2>/dev/null); do
  "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && py312=$cand && break
done
rm -rf .whl/himo_fast
if [ -n "$py312" ]; then
  venv=build/gpu-venv  # the GPU machine's torch for Python 3.12 (build/ is git-ignored)
  [ -x $venv/bin/python ] || "$py312" -m venv $venv
  $venv/bin/python -m pip install -q --no-deps "torch==2.11.0" typing-extensions filelock \
    sympy mpmath networkx jinja2 markupsafe fsspec setuptools wheel numpy ninja
  # torch's CUDA libraries: the same CUDA 13 packages as the torch installed here
  nvidia=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
  ln -sfn "$nvidia" "$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia"
  # From a copy of what travels to the GPU machine (tracked and untracked-not-ignored files):
  # setup.py writes _build_info.py into the tree it builds.
  src=$(mktemp -d)
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src"
  (cd "$src" && HIMO_FAST_CUDA_ARCHS=90a MAX_JOBS=${MAX_JOBS:-2} "$OLDPWD/$venv/bin/python" \
     -m pip wheel -q --no-build-isolation --no-deps . -w "$OLDPWD/.whl/himo_fast")
  bash "$src/benchmarks/source_hash.sh" > .whl/himo_fast/source.sha256
  rm -rf "$src"
  $venv/bin/python -m pip install -q --no-deps --force-reinstall .whl/himo_fast/himo_fast-*.whl
  (cd /tmp && "$OLDPWD/$venv/bin/python" -c "import himo_fast._C as c; assert c.built_with_cuda(); print('prebuilt himo_fast imports on', __import__('torch').__version__)")
else
  echo "no Python 3.12 here: no prebuilt himo_fast (the GPU call compiles it, about a minute)"
fi
ls -la .whl .whl/himo_fast 2>/dev/null
du -sh .whl
