#!/usr/bin/env bash
# One call on a GPU machine: build, validate, time. Writes benchmarks/results/<date>-<gpu>.txt
# (and a copy under $OUT when run through the device tool).
#   bash benchmarks/gpu_check.sh [STAGE ...]
#   stages: build tests memcheck timing probe_eigh profile_jacobi bench demo train train_step
#           goals_hide goals_infonce goals_col_grad tiles_infonce
#   (bench = bench_hide + bench_losses; demo = python -m himo_fast.demo --preset gpu, its
#   results.json and curves.png copied next to the results file; train = the training
#   command end to end, 2 epochs amp_bf16 on the generated dataset; goals_* = the goal
#   tables of issues 15 (HiDe) and 16 (dual InfoNCE: strips, Triton tiles, CUDA C++ tiles,
#   with Inf-CL; col_grad: a square branch's columns' gradient accumulated or recomputed
#   at N = 2^17 and 2^18), benchmarks/goals.py;
#   tiles_infonce = the fused Triton InfoNCE's tile sweep, benchmarks/infonce_tiles.py)
# No stage named: all of them, in that order; `build` always runs first (the machine is
# bare; BUILD=0 keeps what an earlier call on the same warm machine installed from the
# same source). Each stage has its own time limit, so one that hangs cannot eat the
# others'. All of them take longer than one 10-minute device command, and a session has
# 15 minutes of device time: benchmarks/README.md's runbook picks the stages.
# Packages the machine lacks (open_clip_torch, ftfy, wcwidth, and for
# tests/test_train.py webdataset<=0.2.86, braceexpand) are installed from ./.whl when
# that folder is there (see benchmarks/README.md); so is himo_fast itself when
# .whl/himo_fast holds a wheel built from this source (benchmarks/fetch_wheels.sh).
# TESTS="NAME ..." runs only those tests/test_NAME.py (XDIST=N processes where
# pytest-xdist is there, default 8, 0: one pytest per file); BENCH_K passes `-k` to the
# loss benchmarks; EIGH_SIZES the sizes of probe_eigh.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests memcheck timing probe_eigh bench)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
res="benchmarks/results/${stamp}-${gpu}.txt"
json="benchmarks/results/${stamp}-${gpu}.json"
mkdir -p benchmarks/results
log="${OUT:-/tmp}/gpu_check.log"
here=$PWD

stage_build() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  # What this Python links extensions with (a static libstdc++ here once crashed _C).
  python3 -c "import sysconfig as s; print('LDSHARED:', s.get_config_var('LDSHARED'))"
  # BUILD=0 on a machine still warm from a call that built: keep that install (a minute).
  local prebuilt=(.whl/himo_fast/himo_fast-*.whl)
  if [ "${BUILD:-1}" = 0 ] && (cd /tmp && python3 -c "import himo_fast._C" 2>/dev/null); then
    echo "BUILD=0: the himo_fast installed by an earlier call, not rebuilt"
  elif [ -f "${prebuilt[0]}" ] \
      && [ "$(bash benchmarks/source_hash.sh)" = "$(cat .whl/himo_fast/source.sha256)" ] \
      && python3 -m pip install -q --no-index --no-deps --force-reinstall "${prebuilt[0]}" \
      && (cd /tmp && python3 -c "import himo_fast._C as c; assert c.built_with_cuda()"); then
    # fetch_wheels.sh built it from this very source for this machine's Python and torch
    echo "prebuilt: $(basename "${prebuilt[0]}") (source hash matches), not compiled"
  else
    [ -f "${prebuilt[0]}" ] && echo "prebuilt wheel not used (another source, or it did not import): compiling"
    # Only the GPU at hand's architecture: the build is what a user's `pip install .` does.
    MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps . 2>&1 \
      | grep -E "definition of|static-lib|^error|Error" | cut -c1-300 | head -12
  fi
  (cd /tmp && python3 -c "import himo_fast._C as c, himo_fast; print('built_with_cuda', c.built_with_cuda(), 'sync-free eigh (cuSOLVER)', c.built_with_cusolver(), 'backends', himo_fast.available_backends('cuda'))")
}

stage_tests() {  # the whole suite: GPU tests and the Triton kernels run compiled on CUDA
  local files=("$here"/tests/test_*.py)
  [ -n "${TESTS:-}" ] && files=($(for t in $TESTS; do echo "$here/tests/test_$t.py"; done))
  if [ "${XDIST:-8}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
    # pytest-xdist (the machine has it): the tests in XDIST processes, so that Triton's
    # compiles (one per kernel variant, seconds each) run side by side on the 16 cores;
    # a crash costs one worker, which is replaced, not the others' results.
    (cd /tmp && timeout ${TESTS_TIMEOUT:-400} python3 -X faulthandler -m pytest "${files[@]}" \
      -n "${XDIST:-8}" -q -rfEsxX --tb=short -p no:cacheprovider --timeout 180 2>&1 \
      | grep -v "_pytest/\|pluggy/\|^Extension modules" | tail -80)
    return
  fi
  # One pytest per file, so that a crash in one file cannot hide the others' results.
  for f in "${files[@]}"; do
    echo "### $(basename "$f")"
    (cd /tmp && timeout 300 python3 -X faulthandler -m pytest "$f" -q -rfEsxX --tb=short \
      -p no:cacheprovider --timeout 180 2>&1 | grep -v "_pytest/\|pluggy/\|^Extension modules" \
      | tail -60)
  done
}

stage_memcheck() {  # cuda: its strips, and in bf16 its CUDA C++ tiles (d=96: 16-byte
  # loads, d=100: scalar ones; the driver's in-place bf16 addmm_out); triton d=96: the
  # fused InfoNCE's recompute route, d=300: its strip route (bf16: the in-place addmm)
  for run in "cuda 96 float32 strips" "cuda 96 bfloat16 tiles" "cuda 100 float16 tiles" \
      "triton 96 float32 strips" "triton 300 float32 strips" "triton 300 bfloat16 strips"; do
    set -- $run
    (cd /tmp && HIMO_FAST_CUDA_ROUTE=$4 timeout 150 compute-sanitizer --tool memcheck \
      --error-exitcode 1 python3 -m himo_fast --device cuda --n 257 --d $2 --dtype $3 --steps 1 \
      --backend $1 2>&1 | tail -4
     echo "memcheck $1 d=$2 $3 (cuda route $4): rc=${PIPESTATUS[0]}")
  done
}

stage_timing() {  # forward+backward per step, median (python -m himo_fast)
  cd /tmp
  for dt in float32 bfloat16; do
    timeout 120 python3 -m himo_fast --device cuda --n 1024 --d 768 --dtype $dt --steps 20
  done
  timeout 150 python3 -m himo_fast --device cuda --n 65536 --d 768 --dtype bfloat16 --steps 5 \
    --backend cuda --backend triton
  echo "the cuda backend with HIMO_FAST_CUDA_ROUTE=tiles (its CUDA C++ tiles):"
  HIMO_FAST_CUDA_ROUTE=tiles timeout 150 python3 -m himo_fast --device cuda --n 65536 --d 768 \
    --dtype bfloat16 --steps 5 --backend cuda
  # The step as one CUDA graph (HiDe's eigensolver: Jacobi kernels while capturing).
  for n in 1024 65536; do
    timeout 150 python3 -m himo_fast --device cuda --n $n --d 768 --dtype bfloat16 --steps 10 \
      --backend triton --graph
  done
  cd "$here"
}

stage_profile_jacobi() {  # the capture-time Jacobi solver: per-launch kernel time, graph replay
  (cd /tmp && timeout 120 python3 "$here/benchmarks/jacobi_profile.py" --sizes 128 768)
}

stage_probe_eigh() {  # each eigensolver: accuracy, time, host sync, CUDA-graph capture
  (cd /tmp && timeout 300 python3 "$here/benchmarks/eigh_probe.py" \
    --sizes ${EIGH_SIZES:-128 256 512 768 1024} --profile --json "$here/${json%.json}-eigh.json")
}

# From /tmp, so that `import himo_fast` is the installed package, not the source tree.
stage_bench_hide() {  # HiDe alone per backend vs the SVD-based HiDe
  (cd /tmp && timeout 300 python3 -m pytest "$here/benchmarks/test_hide.py" --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$here/${json%.json}-hide.json" 2>&1 | tail -30)
}

stage_bench_losses() {  # himo_fast vs the authors' loss (eager, compiled), ClipLoss
  (cd /tmp && timeout ${BENCH_TIMEOUT:-420} python3 -m pytest "$here/benchmarks/test_losses.py" --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$here/$json" ${BENCH_K:+-k "$BENCH_K"} 2>&1 | tail -60)
}

stage_bench() { stage_bench_hide; stage_bench_losses; }

stage_goals_hide() {  # issue 15's table: HiDe N=128/1024, paper-rank, single-1k, graph, syncs;
  # then each GPU backend's HiDe kernel by kernel (where the time goes)
  (cd /tmp && timeout ${GOALS_TIMEOUT:-420} python3 "$here/benchmarks/goals.py" hide \
    --profile --json "$here/${json%.json}-goals-hide.json" 2>&1 | tail -20)
}

stage_goals_infonce() {  # issue 16's table: 64k vs ClipLoss and Inf-CL, TFLOP/s, 256k memory
  (cd /tmp && timeout ${GOALS_TIMEOUT:-420} python3 "$here/benchmarks/goals.py" infonce \
    --json "$here/${json%.json}-goals-infonce.json" 2>&1 | tail -12)
}

stage_goals_col_grad() {  # issue 16: the columns' gradient accumulated vs recomputed, N=2^17, 2^18
  (cd /tmp && timeout ${GOALS_TIMEOUT:-420} python3 "$here/benchmarks/goals.py" col_grad \
    --rounds 3 --json "$here/${json%.json}-goals-col-grad.json" 2>&1 | tail -6)
}

stage_tiles_infonce() {  # the fused Triton InfoNCE's tile sweep (pick FWD/BWD_BLOCKS from it)
  (cd /tmp && timeout ${TILES_TIMEOUT:-300} python3 "$here/benchmarks/infonce_tiles.py" \
    --json "$here/${json%.json}-tiles-infonce.json" 2>&1 | tail -30)
}

stage_demo() {  # MoLo vs ClipLoss, paired over seeds, on the GPU preset (DEMO_ARGS: more flags)
  (cd /tmp && timeout ${DEMO_TIMEOUT:-540} python3 -m himo_fast.demo --preset gpu \
    --out "$here/${res%.txt}-demo" ${DEMO_ARGS:-} 2>&1 | grep -v "step/s" | tail -20)
}

stage_train_step() {  # open_clip step with ClipLoss / MoLo / the authors' loss (issue 17's table)
  (cd /tmp && PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$here/tests" \
    timeout ${TRAIN_STEP_TIMEOUT:-540} python3 -m himo_fast.bench train-step \
    --json "$here/${json%.json}-train-step.json" ${TRAIN_STEP_ARGS:-} 2>&1 | grep -v "step/s" | tail -20)
}

stage_train() {  # python -m himo_fast.train on the GPU: 2 epochs of the generated dataset
  local data=/tmp/himo_train_data
  (cd /tmp && python3 -c "from himo_fast.train import shapes_dataset as s; from pathlib import Path; s.write_split(Path('$data'), 'train', 2048, seed=0)" \
    && timeout 300 python3 -m himo_fast.train --train-data "$data/train.csv" --dataset-type csv \
      --csv-separator $'\t' --model HiMo-Tiny --batch-size 256 --epochs 2 --lr 1e-3 --warmup 10 \
      --workers 2 --precision amp_bf16 --device cuda --logs /tmp/himo_train_logs --name gpu-check \
      --log-every-n-steps 4 2>&1 | grep -E "Train Epoch|Error|error" | tail -12)
}

{
  echo "# himo_fast GPU check  $stamp"
  echo "command: bash benchmarks/gpu_check.sh ${stages[*]}"
  for v in TESTS XDIST BUILD TESTS_TIMEOUT GOALS_TIMEOUT TRAIN_STEP_TIMEOUT BENCH_K BENCH_TIMEOUT \
      EIGH_SIZES LDFLAGS; do [ -n "${!v:-}" ] && echo "  $v=${!v}"; done
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  for s in build "${stages[@]/#build/}"; do
    [ -z "$s" ] && continue  # `build` named: it already ran first
    echo "## $s"
    t0=$(date +%s)
    "stage_$s"
    echo "## $s done in $(( $(date +%s) - t0 )) s"
    # After every stage, so that a call cut off at its limit still brings back the JSON of
    # each stage that finished (then: python -m himo_fast.bench report)
    [ -n "${OUT:-}" ] && cp "$here/${res%.txt}"*.json "$OUT/" 2>/dev/null
  done
} 2>&1 | tee "$res" "$log"
if [ -n "${OUT:-}" ]; then
  cp "$res" "$OUT/" 2>/dev/null
  [ -d "${res%.txt}-demo" ] && cp -r "${res%.txt}-demo" "$OUT/"
fi
true
