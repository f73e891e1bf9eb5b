"""HiDe alone, forward+backward: each backend's HiDe against the authors' SVD-based one
(issue 4), at the paper's per-rank batch (N=128) and at N=1024, d=768.

On a GPU every backend runs (``triton``: the kernels of himo_fast.kernels; ``cuda``/
``reference``: torch's products; each with the eigensolver backends.py picks). On the CPU
the Triton interpreter is far too slow to time, so only the compiled-free torch paths run.
HIMO_BENCH_QUICK=1 shrinks d.
"""
import os

import pytest
import torch

import himo_fast
from himo_fast.synthetic import clip_like_pairs
from official import official_hide

QUICK = os.environ.get("HIMO_BENCH_QUICK") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 64 if QUICK else 768
SIZES = [32, 96] if QUICK else [128, 1024]
BACKENDS = [b for b in himo_fast.available_backends(DEVICE) if DEVICE == "cuda" or b != "triton"]
IMPLS = ["official_svd"] + BACKENDS


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", SIZES)
def test_hide_forward_backward(benchmark, n, impl):
    benchmark.group = f"HiDe N={n} d={D} {DEVICE}"
    g = torch.Generator().manual_seed(0)
    sets = [clip_like_pairs(n, D, torch.float32, DEVICE, g)[1].requires_grad_() for _ in range(3)]
    weight = torch.randn(n, D, device=DEVICE)  # a fixed upstream gradient
    if impl == "official_svd":
        fn = lambda u: official_hide(u, 0.9)
    else:
        fn = lambda u: himo_fast.hide(u, 0.9, backend=impl)
    state = {"i": 0}

    def step():
        u = sets[state["i"] % len(sets)]
        state["i"] += 1
        u.grad = None
        (fn(u) * weight).sum().backward()
        _sync()

    step()  # warm-up (Triton compiles here)
    benchmark.pedantic(step, rounds=3 if QUICK else 10, warmup_rounds=1, iterations=1)
    benchmark.extra_info["samples_per_s"] = n / benchmark.stats.stats.median  # texts
