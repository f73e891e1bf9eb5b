#!/usr/bin/env bash
# One call on a GPU machine: build, validate, time. Writes benchmarks/results/<date>-<gpu>.txt
# (and a copy under $OUT when run through the device tool). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
stamp=$(date -u +%Y%m%dT%H%M%SZ)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
res="benchmarks/results/${stamp}-${gpu}.txt"
mkdir -p benchmarks/results
{
  echo "# himo_fast GPU check  $stamp"
  echo "command: bash benchmarks/gpu_check.sh"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "## build"
  MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
  (cd /tmp && python3 -c "import himo_fast._C as c; print('built_with_cuda', c.built_with_cuda(), 'sync-free eigh (cuSOLVER)', c.built_with_cusolver())")
  echo "## tests (the whole suite; GPU tests and the Triton kernels run compiled on CUDA)"
  (cd /tmp && python3 -m pytest "$OLDPWD/tests" -q -rfEsxX 2>&1 | tail -30)
  echo "## compute-sanitizer memcheck"
  for b in cuda triton; do
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m himo_fast --device cuda --n 257 --d 96 --steps 1 --backend $b 2>&1 | tail -4
  done
  echo "## timing (forward+backward, median)"
  for n in 1024 65536; do python3 -m himo_fast --device cuda --n $n --d 768 --dtype bfloat16 --steps 10 --backend cuda; done
  python3 -m himo_fast --device cuda --n 1024 --d 768 --steps 10 --backend reference --backend triton
  echo "## benchmark suite (himo_fast vs authors' loss, compiled, ClipLoss; HiDe per backend vs SVD)"
  python3 -m pytest benchmarks --benchmark-only -q --benchmark-json="benchmarks/results/${stamp}-${gpu}.json" 2>&1 | tail -60
} 2>&1 | tee "$res"
[ -n "${OUT:-}" ] && cp "$res" benchmarks/results/${stamp}-${gpu}.json "$OUT/" 2>/dev/null
